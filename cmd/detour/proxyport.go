package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/proxyport"
	"go.yaml.in/yaml/v3"
)

// proxyFlags are the explicit proxy port's settings: --proxy-listen,
// --proxy-allow and --proxy-users, or the config file's proxy section.
type proxyFlags struct {
	listen []string
	allow  []netip.Prefix // nil: tunnel.DefaultProxyAllow
	users  proxyport.Users
	// usersErr is a bad --proxy-users value, reported after parsing: the
	// flag package's own message would quote the password.
	usersErr error
}

// proxyConfig is the config file's proxy section.
type proxyConfig struct {
	Listen stringList `yaml:"listen"`
	Allow  stringList `yaml:"allow"`
	// Users are "name:password" pairs.
	Users stringList `yaml:"users"`
	line  int
}

func (p *proxyConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "proxy", "listen", "allow", "users"); err != nil {
		return err
	}
	type plain proxyConfig
	p.line = n.Line
	return n.Decode((*plain)(p))
}

func (pf *proxyFlags) register(fs *flag.FlagSet) {
	fs.Func("proxy-listen", "serve the explicit proxy port (HTTP forward proxy, CONNECT, SOCKS5 and SOCKS4a on one port) at `ADDR` host:port (repeatable)", func(s string) error {
		if err := checkListen(s); err != nil {
			return err
		}
		pf.listen = append(pf.listen, s)
		return nil
	})
	fs.Func("proxy-allow", "proxy-port clients allowed, a `CIDR` (repeatable; default the private ranges 10/8, 172.16/12, 192.168/16, 100.64/10, 198.18/15, loopback, link-local, fc00::/7)", func(s string) error {
		p, err := parseAllow(s)
		if err != nil {
			return err
		}
		pf.allow = append(pf.allow, p)
		return nil
	})
	fs.Func("proxy-users", "require proxy-port credentials `name:password` (repeatable; Basic for HTTP, RFC 1929 for SOCKS5; prefer the config file, the command line is visible to other users)", func(s string) error {
		if err := pf.addUser(s); err != nil && pf.usersErr == nil {
			pf.usersErr = err
		}
		return nil
	})
}

func parseAllow(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		if a, aerr := netip.ParseAddr(strings.TrimSpace(s)); aerr == nil {
			return netip.PrefixFrom(a, a.BitLen()), nil
		}
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR (like 192.168.0.0/16 or fd00::/8)", s)
	}
	return p.Masked(), nil
}

func (pf *proxyFlags) addUser(s string) error {
	name, pass, ok := strings.Cut(s, ":")
	switch {
	case !ok || name == "":
		return fmt.Errorf("%q is not name:password", redactUser(s))
	case len(name) > 255 || len(pass) > 255:
		return fmt.Errorf("user %q: name and password must be at most 255 bytes each (SOCKS5 limit)", name)
	}
	if pf.users == nil {
		pf.users = proxyport.Users{}
	}
	if _, dup := pf.users[name]; dup {
		return fmt.Errorf("user %q given twice", name)
	}
	pf.users[name] = pass
	return nil
}

// redactUser shows a malformed user entry without what may be a password.
func redactUser(s string) string {
	if name, _, ok := strings.Cut(s, ":"); ok {
		return name + ":xxxxx"
	}
	if len(s) > 3 {
		return s[:3] + "…"
	}
	return s
}

// applyFile takes the config file's proxy section for every flag not given.
func (pf *proxyFlags) applyFile(pc *proxyConfig, set map[string]bool) error {
	if pc == nil {
		return nil
	}
	where := fmt.Sprintf("proxy (line %d)", pc.line)
	if !set["proxy-listen"] {
		for _, l := range pc.Listen {
			if err := checkListen(l); err != nil {
				return fmt.Errorf("%s: listen: %v", where, err)
			}
			pf.listen = append(pf.listen, l)
		}
	}
	if !set["proxy-allow"] && pc.Allow != nil {
		pf.allow = []netip.Prefix{}
		for _, a := range pc.Allow {
			p, err := parseAllow(a)
			if err != nil {
				return fmt.Errorf("%s: allow: %v", where, err)
			}
			pf.allow = append(pf.allow, p)
		}
	}
	if !set["proxy-users"] {
		for _, u := range pc.Users {
			if err := pf.addUser(u); err != nil {
				return fmt.Errorf("%s: users: %v", where, err)
			}
		}
	}
	return nil
}

// listenProxy opens the proxy port's listening sockets, or adopts those a
// previous process handed over (named "proxy ADDR"), and registers them
// for the next upgrade.
func listenProxy(inh *inherited, pass *handover, addrs []string, log *slog.Logger) ([]*net.TCPListener, error) {
	var out []*net.TCPListener
	for _, a := range addrs {
		name := fdProxyPrefix + a
		ln, err := inh.listenTCP(name, a, log)
		if err != nil {
			for _, l := range out {
				l.Close()
			}
			return nil, fmt.Errorf("--proxy-listen %s: %w", a, err)
		}
		tl := ln.(*net.TCPListener)
		pass.add(name, tl)
		out = append(out, tl)
	}
	return out, nil
}

// fdProxyPrefix and the address name a proxy-port listener handed over in
// an upgrade.
const fdProxyPrefix = "proxy "

// port is the tunnel's configuration for the proxy port, with obs as its
// observer (nil: none) and udp the limits of its SOCKS5 UDP sessions.
func (pf *proxyFlags) port(obs tunnel.Observer, udp tunnel.UDPOptions) *tunnel.ProxyPort {
	return &tunnel.ProxyPort{Allow: pf.allow, Users: pf.users, Observer: obs, UDP: udp}
}

// allowString lists the allowed client ranges for the log.
func allowString(allow []netip.Prefix) string {
	if allow == nil {
		return "private ranges"
	}
	var b strings.Builder
	for i, p := range allow {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(p.String())
	}
	return b.String()
}
