//go:build unix

package tunnel

import (
	"net/netip"
	"syscall"
)

// sockName is the local address of the socket behind rc (getsockname(2)),
// false once it is closed.
func sockName(rc syscall.RawConn) (netip.AddrPort, bool) {
	var sa syscall.Sockaddr
	var serr error
	if err := rc.Control(func(fd uintptr) { sa, serr = syscall.Getsockname(int(fd)) }); err != nil || serr != nil {
		return netip.AddrPort{}, false
	}
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)), true
	case *syscall.SockaddrInet6:
		return unmap(netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))), true
	}
	return netip.AddrPort{}, false
}
