//go:build !unix

package tunnel

import (
	"net/netip"
	"syscall"
)

// sockName: in-flight sockets are not asked on this OS.
func sockName(rc syscall.RawConn) (netip.AddrPort, bool) { return netip.AddrPort{}, false }
