//go:build linux

package redirect

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file is the kernel side of UDP in TPROXY mode: the transparent socket
// that receives every captured datagram with its original destination, and
// the transparent reply sockets that answer clients from the address they
// sent to. Reading payload is the caller's (package tunnel's) job.

// UDPListener receives the UDP datagrams TPROXY hands to detour; the
// original destination of each comes with it, in a control message.
type UDPListener struct {
	conn  *net.UDPConn
	rc    syscall.RawConn
	addr  netip.AddrPort // the bound address, unmapped
	self  selfAddrs
	batch *udpBatch // made by the first ReadDatagram
	bmu   sync.Mutex
}

// udpBatchSize is how many datagrams one recvmmsg(2) reads at most.
const udpBatchSize = 16

// udpBatch holds the datagrams one recvmmsg(2) read that ReadDatagram has
// not handed out yet. Its buffers take a whole datagram each; pages are
// touched only as far as datagrams fill them.
type udpBatch struct {
	hdrs    [udpBatchSize]unix.Mmsghdr
	iovs    [udpBatchSize]unix.Iovec
	names   [udpBatchSize]unix.RawSockaddrInet6
	oobs    [udpBatchSize][OOBSize]byte
	bufs    [udpBatchSize][]byte
	n, next int
}

// OOBSize is enough control-message space for ReadDatagram: one
// IP(V6)_ORIGDSTADDR message holding a sockaddr_in6.
const OOBSize = 64

// ListenUDP opens the transparent UDP socket on addr ("host:port"; like
// Listen, "[::]:port" or ":port" is one dual-stack socket, "0.0.0.0:port"
// IPv4 only). It sets IP_TRANSPARENT and IP_RECVORIGDSTADDR, and on an IPv6
// socket IPV6_TRANSPARENT and IPV6_RECVORIGDSTADDR as well, so that a
// dual-stack socket gets the original destination of IPv4 datagrams too.
// It needs CAP_NET_ADMIN.
func ListenUDP(ctx context.Context, addr string) (*UDPListener, error) {
	lc := net.ListenConfig{Control: udpListenControl}
	pc, err := lc.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening on udp %s (tproxy mode): %w", addr, err)
	}
	l, err := NewUDPListener(pc.(*net.UDPConn))
	if err != nil {
		pc.Close()
		return nil, err
	}
	return l, nil
}

// NewUDPListener makes a UDPListener of an open UDP socket, such as one
// inherited from another detour process (net.FilePacketConn of its fd). The
// socket options are set again, which is harmless on a socket that has them.
func NewUDPListener(c *net.UDPConn) (*UDPListener, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	la := c.LocalAddr().(*net.UDPAddr)
	fam, err := socketFamily(rc)
	if err != nil {
		return nil, fmt.Errorf("reading SO_DOMAIN of udp %s: %w", la, err)
	}
	network := "udp6"
	if fam == unix.AF_INET {
		network = "udp4"
	}
	if err := udpListenControl(network, la.String(), rc); err != nil {
		return nil, err
	}
	bound := la.AddrPort()
	return &UDPListener{conn: c, rc: rc, addr: netip.AddrPortFrom(bound.Addr().Unmap(), bound.Port())}, nil
}

// socketFamily reads SO_DOMAIN.
func socketFamily(rc syscall.RawConn) (int, error) {
	var fam int
	var serr error
	if err := rc.Control(func(fd uintptr) { fam, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN) }); err != nil {
		return 0, err
	}
	return fam, serr
}

// udpListenBuffer is the receive buffer of the UDP listener (the kernel
// doubles it for its bookkeeping).
const udpListenBuffer = 4 << 20

// udpListenControl sets the receiving socket's options (see ListenUDP).
func udpListenControl(network, address string, c syscall.RawConn) error {
	type opt struct {
		level, name int
		what        string
	}
	opts := []opt{
		{unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"},
		{unix.SOL_IP, unix.IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"},
	}
	if network != "udp4" {
		opts = append(opts,
			opt{unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"},
			opt{unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR, "IPV6_RECVORIGDSTADDR"})
	}
	var serr error
	err := c.Control(func(fd uintptr) {
		for _, o := range opts {
			if err := unix.SetsockoptInt(int(fd), o.level, o.name, 1); err != nil {
				serr = fmt.Errorf("setting %s on udp %s: %w (needs CAP_NET_ADMIN)", o.what, address, err)
				return
			}
		}
		// Every client's datagrams queue here while sessions are made
		// and while this process waits for a CPU: room for bursts beyond
		// net.core.rmem_max (CAP_NET_ADMIN may go past it).
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, udpListenBuffer) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, udpListenBuffer)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// ErrNoOrigDst is returned by ReadDatagram for a datagram that came without
// an original-destination control message (it did not come through the
// socket options ListenUDP sets, or was truncated).
var ErrNoOrigDst = errors.New("datagram without an original destination")

// ErrTruncated is returned by ReadDatagram for a datagram larger than the
// buffer; it is dropped.
var ErrTruncated = errors.New("datagram larger than the buffer")

// ReadDatagram reads one datagram into b, with oob (OOBSize bytes) as
// scratch space for its control message, and returns its length, its
// sender (the client) and its original destination, both unmapped. A
// datagram without an original destination returns ErrNoOrigDst, one too
// large for b ErrTruncated, one sent to detour's own port on one of this
// host's addresses ErrNotRedirected (with dst): the caller drops them and
// reads on. Other errors are the socket's.
//
// Under load one recvmmsg(2) reads up to 16 datagrams, which later calls
// hand out (copied into b) without a system call; oob is then unused.
func (l *UDPListener) ReadDatagram(b, oob []byte) (n int, client, dst netip.AddrPort, err error) {
	l.bmu.Lock()
	defer l.bmu.Unlock()
	bt := l.batch
	if bt == nil {
		bt = &udpBatch{}
		for i := range bt.bufs {
			bt.bufs[i] = make([]byte, 64<<10)
		}
		l.batch = bt
	}
	for bt.next >= bt.n {
		if err := l.fill(bt); err != nil {
			return 0, netip.AddrPort{}, netip.AddrPort{}, err
		}
	}
	i := bt.next
	bt.next++
	h := &bt.hdrs[i]
	n = int(h.Len)
	src, ok := sockaddrPort(&bt.names[i])
	if ok {
		client = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	}
	if h.Hdr.Flags&unix.MSG_TRUNC != 0 || n > len(b) {
		return copy(b, bt.bufs[i][:n]), client, netip.AddrPort{}, ErrTruncated
	}
	copy(b, bt.bufs[i][:n])
	dst, ok = origDstFromCmsg(bt.oobs[i][:h.Hdr.Controllen])
	if !ok {
		return n, client, netip.AddrPort{}, ErrNoOrigDst
	}
	if dst.Port() == l.addr.Port() && l.self.is(l.addr, dst) {
		return n, client, dst, ErrNotRedirected
	}
	return n, client, dst, nil
}

// fill reads the next batch with recvmmsg(2), waiting in the runtime's
// poller (deadlines apply) while there is nothing to read.
func (l *UDPListener) fill(bt *udpBatch) error {
	for i := range bt.hdrs {
		bt.iovs[i].Base = &bt.bufs[i][0]
		bt.iovs[i].SetLen(len(bt.bufs[i]))
		h := &bt.hdrs[i]
		h.Hdr = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&bt.names[i])), Namelen: unix.SizeofSockaddrInet6,
			Iov: &bt.iovs[i], Control: &bt.oobs[i][0]}
		h.Hdr.SetIovlen(1)
		h.Hdr.SetControllen(OOBSize)
		h.Len = 0
	}
	var got int
	var serr error
	err := l.rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&bt.hdrs[0])), udpBatchSize, unix.MSG_DONTWAIT, 0, 0)
			switch e {
			case 0:
				got = int(r)
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait until readable
			default:
				serr = e
			}
			return true
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return err
	}
	bt.n, bt.next = got, 0
	return nil
}

// sockaddrPort reads a sockaddr_in or sockaddr_in6 that recvmmsg filled.
func sockaddrPort(sa *unix.RawSockaddrInet6) (netip.AddrPort, bool) {
	switch sa.Family {
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), ntohs(sa.Port)), true
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), ntohs(sa4.Port)), true
	}
	return netip.AddrPort{}, false
}

// IsSelf reports whether dst is this listener's own address and port.
func (l *UDPListener) IsSelf(dst netip.AddrPort) bool {
	return dst.Port() == l.addr.Port() && l.self.is(l.addr, dst)
}

// origDstFromCmsg finds IP_ORIGDSTADDR or IPV6_ORIGDSTADDR in the control
// messages of one datagram, without allocating.
func origDstFromCmsg(oob []byte) (netip.AddrPort, bool) {
	const hdrLen = unix.SizeofCmsghdr
	for len(oob) >= hdrLen {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		mlen := int(h.Len)
		if mlen < hdrLen || mlen > len(oob) {
			return netip.AddrPort{}, false
		}
		data := oob[unix.CmsgLen(0):mlen]
		switch {
		case h.Level == unix.SOL_IP && h.Type == unix.IP_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet4:
			sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&data[0]))
			return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), true
		case h.Level == unix.SOL_IPV6 && h.Type == unix.IPV6_ORIGDSTADDR && len(data) >= unix.SizeofSockaddrInet6:
			sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&data[0]))
			a := netip.AddrFrom16(sa.Addr)
			return netip.AddrPortFrom(a.Unmap(), ntohs(sa.Port)), true
		}
		step := unix.CmsgSpace(mlen - unix.CmsgLen(0))
		if step > len(oob) {
			break
		}
		oob = oob[step:]
	}
	return netip.AddrPort{}, false
}

// Conn is the socket, for handing it to another process (its File).
func (l *UDPListener) Conn() *net.UDPConn { return l.conn }

// Close closes the socket; a blocked ReadDatagram returns net.ErrClosed.
func (l *UDPListener) Close() error { return l.conn.Close() }

// LocalAddr is the bound address.
func (l *UDPListener) LocalAddr() net.Addr { return l.conn.LocalAddr() }

// selfAddrs remembers this host's addresses for a second, so that telling
// a datagram to detour's own port from one to another host's same port
// costs no netlink dump per datagram.
type selfAddrs struct {
	mu    sync.Mutex
	at    time.Time
	addrs map[netip.Addr]struct{}
}

// is reports whether dst (whose port is bound's) is the listener itself.
func (s *selfAddrs) is(bound, dst netip.AddrPort) bool {
	ip := dst.Addr()
	if ip == bound.Addr() || ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	if !bound.Addr().IsUnspecified() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if now := time.Now(); s.addrs == nil || now.Sub(s.at) > time.Second {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return true // cannot tell: refusing is the safe side
		}
		s.at, s.addrs = now, make(map[netip.Addr]struct{}, len(addrs))
		for _, a := range addrs {
			if p, ok := a.(*net.IPNet); ok {
				if local, ok := netip.AddrFromSlice(p.IP); ok {
					s.addrs[local.Unmap()] = struct{}{}
				}
			}
		}
	}
	_, ok := s.addrs[ip]
	return ok
}

// ReplyPool hands out transparent UDP sockets bound to the addresses
// clients sent datagrams to, so replies reach each client from the address
// it expects. A socket is shared by every session with the same original
// destination; sockets no session holds are kept for reuse, the least
// recently released closed beyond MaxIdle. A failure to bind one address
// (EADDRINUSE: something on the gateway holds it) fails only the replies
// of that address and is counted; it does not stop UDP.
//
// The sockets are never read. Their receive buffer is set to the minimum.
type ReplyPool struct {
	// Mark is set as SO_MARK on every reply socket (zero sets none), so
	// the capture rules leave the replies alone.
	Mark uint32
	// MaxIdle is how many sockets no session holds are kept open. Zero
	// means 256.
	MaxIdle int

	mu     sync.Mutex
	socks  map[netip.AddrPort]*ReplySocket
	idle   list.List // of *ReplySocket with refs == 0, most recently released first
	closed bool

	addrInUse atomic.Int64
	opened    atomic.Int64
}

// ReplySocket is one transparent socket bound to an original destination.
type ReplySocket struct {
	pool *ReplyPool
	from netip.AddrPort
	conn *net.UDPConn
	rc   syscall.RawConn
	v4   bool
	refs int           // guarded by pool.mu
	elem *list.Element // in pool.idle while refs == 0
}

// Acquire returns the reply socket bound to from, opening it if needed;
// the caller calls Release when its session ends. from is unmapped.
func (p *ReplyPool) Acquire(from netip.AddrPort) (*ReplySocket, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, net.ErrClosed
	}
	if s := p.socks[from]; s != nil {
		if s.refs == 0 && s.elem != nil {
			p.idle.Remove(s.elem)
			s.elem = nil
		}
		s.refs++
		p.mu.Unlock()
		return s, nil
	}
	p.mu.Unlock()

	// Bind outside the lock: other destinations need not wait.
	s, err := p.open(from)
	if err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			p.addrInUse.Add(1)
		}
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		s.conn.Close()
		return nil, net.ErrClosed
	}
	if other := p.socks[from]; other != nil {
		// Opened meanwhile by another session (SO_REUSEADDR let both
		// bind): use that one.
		s.conn.Close()
		if other.refs == 0 && other.elem != nil {
			p.idle.Remove(other.elem)
			other.elem = nil
		}
		other.refs++
		return other, nil
	}
	if p.socks == nil {
		p.socks = make(map[netip.AddrPort]*ReplySocket)
	}
	p.socks[from] = s
	s.refs = 1
	p.opened.Add(1)
	return s, nil
}

func (p *ReplyPool) open(from netip.AddrPort) (*ReplySocket, error) {
	network := "udp6"
	if from.Addr().Is4() {
		network = "udp4"
	}
	lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
		return replyControl(network, address, c, p.Mark)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, from.String())
	if err != nil {
		return nil, fmt.Errorf("binding reply socket to %s: %w", from, err)
	}
	conn := pc.(*net.UDPConn)
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, err
	}
	return &ReplySocket{pool: p, from: from, conn: conn, rc: rc, v4: network == "udp4"}, nil
}

// replyControl makes a socket that may bind a foreign address and share it.
func replyControl(network, address string, c syscall.RawConn, mark uint32) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		level, opt, name := unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"
		if network == "udp6" {
			level, opt, name = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
		}
		if err := unix.SetsockoptInt(int(fd), level, opt, 1); err != nil {
			serr = fmt.Errorf("setting %s on reply socket %s: %w (needs CAP_NET_ADMIN)", name, address, err)
			return
		}
		if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			serr = fmt.Errorf("setting SO_REUSEADDR on reply socket %s: %w", address, err)
			return
		}
		// Never read: the smallest receive buffer the kernel allows.
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 1)
		if mark != 0 {
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
				serr = fmt.Errorf("setting SO_MARK %#x on reply socket %s: %w", mark, address, err)
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// AddrInUse is how many binds failed with EADDRINUSE.
func (p *ReplyPool) AddrInUse() int64 { return p.addrInUse.Load() }

// Open is how many reply sockets are open (held or idle).
func (p *ReplyPool) Open() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.socks)
}

// Close closes every socket; Acquire fails from then on. Sockets still
// held are closed too: their WriteTo fails.
func (p *ReplyPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, s := range p.socks {
		s.conn.Close()
	}
	p.socks = nil
	p.idle.Init()
}

// Release gives the socket back; the last release makes it idle.
func (s *ReplySocket) Release() {
	p := s.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if s.refs--; s.refs > 0 || p.closed {
		return
	}
	s.elem = p.idle.PushFront(s)
	max := p.MaxIdle
	if max == 0 {
		max = 256
	}
	for p.idle.Len() > max {
		old := p.idle.Remove(p.idle.Back()).(*ReplySocket)
		old.elem = nil
		delete(p.socks, old.from)
		old.conn.Close()
	}
}

// From is the address the socket sends from.
func (s *ReplySocket) From() netip.AddrPort { return s.from }

// WriteTo sends b to the client to (unmapped) from the socket's address.
// It never blocks: when the socket's send buffer is full the datagram is
// dropped and EAGAIN returned, as a router would drop it.
func (s *ReplySocket) WriteTo(b []byte, to netip.AddrPort) error {
	var serr error
	err := s.rc.Write(func(fd uintptr) bool {
		serr = sendTo(int(fd), b, to, s.v4)
		return true
	})
	if err != nil {
		return err
	}
	return serr
}

// sendTo is sendto(2) without the allocation of a unix.Sockaddr.
func sendTo(fd int, b []byte, to netip.AddrPort, v4 bool) error {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	var e syscall.Errno
	if v4 {
		if !to.Addr().Is4() {
			return fmt.Errorf("sending to %s from an IPv4 address", to)
		}
		sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: to.Addr().As4()}
		sa.Port = htons(to.Port())
		_, _, e = syscall.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(p), uintptr(len(b)), 0,
			uintptr(unsafe.Pointer(&sa)), unix.SizeofSockaddrInet4)
	} else {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: to.Addr().As16()}
		sa.Port = htons(to.Port())
		_, _, e = syscall.RawSyscall6(unix.SYS_SENDTO, uintptr(fd), uintptr(p), uintptr(len(b)), 0,
			uintptr(unsafe.Pointer(&sa)), unix.SizeofSockaddrInet6)
	}
	if e != 0 {
		return e
	}
	return nil
}

// htons converts a port to network byte order as stored in a sockaddr.
func htons(p uint16) uint16 {
	var b [2]byte
	b[0], b[1] = byte(p>>8), byte(p)
	return *(*uint16)(unsafe.Pointer(&b))
}
