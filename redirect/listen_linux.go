//go:build linux

package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
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

// ListenFile makes a Listener of an inherited listening socket: a binary
// upgrade hands the running process's socket to its successor as an open
// descriptor, so no connection is refused in between. It checks that f is a
// listening TCP socket bound where Listen(mode, addr) would bind, and sets or
// clears IP_TRANSPARENT for mode. f is closed in any case (the Listener holds
// its own descriptor). An error means the socket cannot serve as asked (the
// address changed, say); the caller then listens anew.
func ListenFile(f *os.File, mode Mode, addr string) (*Listener, error) {
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("inherited listener %s: %w", f.Name(), err)
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("inherited listener %s: not a TCP socket", f.Name())
	}
	bound := tl.Addr().(*net.TCPAddr).AddrPort()
	if err := checkInherited(tl, mode, bound, addr); err != nil {
		tl.Close()
		return nil, fmt.Errorf("inherited listener %s on %s: %w", f.Name(), bound, err)
	}
	return &Listener{ln: tl, mode: mode, addr: netip.AddrPortFrom(bound.Addr().Unmap(), bound.Port())}, nil
}

// checkInherited tells whether tl (bound to bound) is what Listen(mode,
// addr) would make, and sets IP_TRANSPARENT as mode needs.
func checkInherited(tl *net.TCPListener, mode Mode, bound netip.AddrPort, addr string) error {
	if !SameAddr(bound, addr) {
		return fmt.Errorf("bound to %s, not %s", bound, addr)
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return err
	}
	on := 0
	if mode == TProxy {
		on = 1
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v == 0 {
			serr = errors.New("not a listening socket")
			return
		}
		level, opt := unix.SOL_IPV6, unix.IPV6_TRANSPARENT
		if bound.Addr().Is4() {
			level, opt = unix.SOL_IP, unix.IP_TRANSPARENT
		}
		if v, err := unix.GetsockoptInt(int(fd), level, opt); err == nil && v == on {
			return
		}
		if err := unix.SetsockoptInt(int(fd), level, opt, on); err != nil {
			serr = fmt.Errorf("setting IP_TRANSPARENT to %d for %s mode: %w (needs CAP_NET_ADMIN)", on, mode, err)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// SameAddr tells whether a socket bound to bound is what listening on addr
// ("host:port", host empty, an IP or a name) makes: the same port and
// address, where an empty host or "::" is the dual-stack wildcard and
// "0.0.0.0" the IPv4-only one.
func SameAddr(bound netip.AddrPort, addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port != fmt.Sprint(bound.Port()) {
		return false
	}
	if host == "" {
		host = "::"
	}
	want, err := netip.ParseAddr(host)
	if err != nil {
		ips, err := net.LookupIP(host)
		if err != nil || len(ips) == 0 {
			return false
		}
		want, _ = netip.AddrFromSlice(ips[0])
	}
	got := bound.Addr()
	return got == want || (!want.IsUnspecified() && got.Unmap() == want.Unmap())
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

// SyscallConn gives access to the listening socket, to hand it to a
// successor process (see ListenFile).
func (l *Listener) SyscallConn() (syscall.RawConn, error) { return l.ln.SyscallConn() }

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

// OriginalDstFD is OriginalDst for a bare accepted socket (detour's event
// loop takes connections as descriptors): fd, whose peer is peer (as
// accept4 reported it, unmapped or not).
func (l *Listener) OriginalDstFD(fd int, peer netip.AddrPort) (netip.AddrPort, error) {
	var dst netip.AddrPort
	var err error
	switch {
	case l.mode == TProxy:
		dst, err = sockName(fd)
	case peer.Addr().Is4() || peer.Addr().Is4In6():
		dst, err = getsockoptSockaddr(uintptr(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
		err = origDstErr("SO_ORIGINAL_DST", err)
	default:
		dst, err = getsockoptSockaddr(uintptr(fd), unix.SOL_IPV6, ip6tSOOriginalDst)
		err = origDstErr("IP6T_SO_ORIGINAL_DST", err)
	}
	if err != nil {
		return netip.AddrPort{}, err
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if l.isSelf(dst) {
		return dst, ErrNotRedirected
	}
	return dst, nil
}

// sockName is getsockname(2) as an address.
func sockName(fd int) (netip.AddrPort, error) {
	var raw unix.RawSockaddrAny
	size := uint32(unsafe.Sizeof(raw))
	_, _, errno := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&raw)), uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return netip.AddrPort{}, fmt.Errorf("getsockname: %w", errno)
	}
	return sockaddrAddr(&raw)
}

// origDstErr names the option that could not be read, and why.
func origDstErr(name string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("reading %s: no conntrack entry (connection not NATed): %w", name, err)
	}
	return fmt.Errorf("reading %s: %w", name, err)
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
		return netip.AddrPort{}, origDstErr(name, serr)
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
	_, _, errno := unix.RawSyscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&raw)), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	return sockaddrAddr(&raw)
}

// sockaddrAddr reads an IPv4 or IPv6 struct sockaddr.
func sockaddrAddr(raw *unix.RawSockaddrAny) (netip.AddrPort, error) {
	switch raw.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), nil
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), ntohs(sa.Port)), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unexpected address family %d", raw.Addr.Family)
}

// ntohs converts a port as stored in a sockaddr (network byte order).
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}
