module github.com/detour-proxy/detour

go 1.26.0

require golang.org/x/sys v0.50.0

require github.com/vishvananda/netns v0.0.5 // indirect
