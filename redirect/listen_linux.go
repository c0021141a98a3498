//go:build linux

package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Listener accepts redirected connections and tells where each was going.
type Listener struct {
	ln   *net.TCPListener
	mode Mode
	addr netip.AddrPort // the bound address; its IP is unspecified for a wildcard listener
}

// Listen opens the listening socket for mode on addr ("host:port"). An
// address with an unspecified IPv6 host ("[::]:port") or no host (":port")
// serves IPv4 and IPv6 on one dual-stack socket; "0.0.0.0:port" serves IPv4
// only. TPROXY mode sets IP_TRANSPARENT / IPV6_TRANSPARENT, which needs
// CAP_NET_ADMIN.
func Listen(ctx context.Context, mode Mode, addr string) (*Listener, error) {
	// No TCP keepalive on accepted connections: the relay's idle timeout
	// already ends dead ones, and it saves four setsockopts per accept.
	lc := net.ListenConfig{KeepAlive: -1}
	if mode == TProxy {
		lc.Control = transparentControl
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s (%s mode): %w", addr, mode, err)
	}
	tl := ln.(*net.TCPListener)
	bound := tl.Addr().(*net.TCPAddr).AddrPort()
	return &Listener{ln: tl, mode: mode, addr: netip.AddrPortFrom(bound.Addr().Unmap(), bound.Port())}, nil
}

// transparentControl sets IP_TRANSPARENT (IPv4) or IPV6_TRANSPARENT (IPv6 and
// dual-stack; the kernel keeps one flag for both) on a listening socket so it
// may accept connections addressed to any IP, as TPROXY requires.
func transparentControl(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if network == "tcp4" {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			if serr != nil {
				serr = fmt.Errorf("setting IP_TRANSPARENT on %s: %w (needs CAP_NET_ADMIN)", address, serr)
			}
			return
		}
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
		if serr != nil {
			serr = fmt.Errorf("setting IPV6_TRANSPARENT on %s: %w (needs CAP_NET_ADMIN)", address, serr)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// Accept waits for the next connection.
func (l *Listener) Accept() (*net.TCPConn, error) { return l.ln.AcceptTCP() }

// Close stops accepting; connections already accepted are not affected.
func (l *Listener) Close() error { return l.ln.Close() }

// Addr is the listening address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Mode is the mode the listener was opened in.
func (l *Listener) Mode() Mode { return l.mode }

// OriginalDst returns where the client of c was connecting before the kernel
// redirected it, with IPv4-mapped IPv6 addresses unmapped. It returns
// ErrNotRedirected (with the address) when that destination is detour's own
// listener, and another error when the kernel knows no original destination.
func (l *Listener) OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	var dst netip.AddrPort
	switch l.mode {
	case TProxy:
		// A transparent socket's local address is the address the client
		// dialled.
		dst = c.LocalAddr().(*net.TCPAddr).AddrPort()
	default:
		var err error
		if dst, err = originalDst(c); err != nil {
			return netip.AddrPort{}, err
		}
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if l.isSelf(dst) {
		return dst, ErrNotRedirected
	}
	return dst, nil
}

// isSelf reports whether dst is this listener: its port and one of this
// host's addresses. Interface addresses are only listed for connections to
// the listener's port, so the common path costs nothing.
func (l *Listener) isSelf(dst netip.AddrPort) bool {
	if dst.Port() != l.addr.Port() {
		return false
	}
	ip := dst.Addr()
	if ip == l.addr.Addr() || ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	if !l.addr.Addr().IsUnspecified() {
		// Bound to one address: only that address reaches the listener
		// without a redirection rule.
		return false
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		// Cannot tell: refusing is the safe side of an open proxy.
		return true
	}
	for _, a := range addrs {
		if p, ok := a.(*net.IPNet); ok {
			if local, ok := netip.AddrFromSlice(p.IP); ok && local.Unmap() == ip {
				return true
			}
		}
	}
	return false
}

// originalDst reads the pre-NAT destination of a REDIRECTed connection from
// conntrack: SO_ORIGINAL_DST at SOL_IP for IPv4 (also on a dual-stack socket
// carrying an IPv4-mapped connection), IP6T_SO_ORIGINAL_DST at SOL_IPV6 for
// IPv6. The option is read inside Control, never through a dup'ed fd.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	level, opt, name := unix.SOL_IP, unix.SO_ORIGINAL_DST, "SO_ORIGINAL_DST"
	if local := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); local.Is6() && !local.Is4In6() {
		level, opt, name = unix.SOL_IPV6, ip6tSOOriginalDst, "IP6T_SO_ORIGINAL_DST"
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading %s: %w", name, err)
	}
	var dst netip.AddrPort
	var serr error
	if err := rc.Control(func(fd uintptr) { dst, serr = getsockoptSockaddr(fd, level, opt) }); err != nil {
		return netip.AddrPort{}, fmt.Errorf("reading %s: %w", name, err)
	}
	if serr != nil {
		if errors.Is(serr, unix.ENOENT) {
			return netip.AddrPort{}, fmt.Errorf("reading %s: no conntrack entry (connection not NATed): %w", name, serr)
		}
		return netip.AddrPort{}, fmt.Errorf("reading %s: %w", name, serr)
	}
	return dst, nil
}

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h
// (x/sys/unix has only the IPv4 name; the value is the same, 80).
const ip6tSOOriginalDst = 80

// getsockoptSockaddr reads a socket option whose value is a struct sockaddr.
func getsockoptSockaddr(fd uintptr, level, opt int) (netip.AddrPort, error) {
	var raw unix.RawSockaddrAny
	size := uint32(unsafe.Sizeof(raw))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&raw)), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	switch raw.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&raw))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), nil
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&raw))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), ntohs(sa.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unexpected address family %d", raw.Addr.Family)
}

// ntohs converts a port as stored in a sockaddr (network byte order).
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// MarkControl returns a Dialer.Control function that sets SO_MARK to mark on
// every socket it sees, so that the redirection rules, which exempt the mark,
// leave detour's own connections alone. Setting a mark needs CAP_NET_ADMIN.
func MarkControl(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting SO_MARK %#x on socket to %s: %w (needs CAP_NET_ADMIN)", mark, address, serr)
		}
		return nil
	}
}
