package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"

	"github.com/detour-proxy/detour/internal/socksudp"
)

// UDP: the ways out that can carry a UDP session. Direct sends from a
// connected socket of its own; SOCKS5 asks the proxy for a UDP association
// (RFC 1928 §7), one per session: a UDP ASSOCIATE request on a TCP
// connection of its own declares the client address 0.0.0.0:0 (the socket
// that will send does not exist yet, and strict servers tie the association
// to what is declared), the reply names the relay, and a connected UDP
// socket sends each datagram there with a request header (RSV, FRAG 0, the
// target as ATYP and address, port) and receives the replies with the same
// header naming their sender. The association lives as long as its TCP
// connection, which the PacketConn holds, idle, until closed.
//
// Sessions are not multiplexed over one association per upstream: a reply
// names only its sender, so two clients talking to the same destination
// could not be told apart. HTTP CONNECT cannot carry UDP.

// PacketDialer is an upstream that can carry UDP sessions.
type PacketDialer interface {
	// DialUDP opens a way out for one session whose datagrams go to
	// target ("host:port": a SOCKS5 proxy is asked for it, a name as ATYP
	// domain) and whose original destination is dst (where Direct sends).
	DialUDP(ctx context.Context, target string, dst netip.AddrPort) (*PacketConn, error)
}

var (
	_ PacketDialer = (*Direct)(nil)
	_ PacketDialer = (*SOCKS5)(nil)
)

// PacketConn is one UDP session's way out: a connected UDP socket, and for
// a SOCKS5 association its TCP connection and datagram header.
//
// A direct session's socket is a bare non-blocking descriptor on Linux
// (rawUDP), outside the runtime's poller: a new session then costs socket,
// setsockopt (the mark) and connect, not also the poller's registration and
// the local and peer address lookups net.Dial makes. Its users hold mu for
// reading while they use the descriptor and Close holds it for writing, so
// a descriptor number is never used after it was closed and reused.
type PacketConn struct {
	conn   *net.UDPConn // nil for a bare descriptor
	rc     syscall.RawConn
	ctrl   *net.TCPConn // SOCKS5: keeps the association
	header []byte       // SOCKS5: RSV RSV FRAG ATYP DST.ADDR DST.PORT

	fd     int // the bare descriptor when conn is nil
	mu     sync.RWMutex
	closed bool
}

// MaxHeader is the room Send needs in front of a datagram for the largest
// SOCKS5 UDP request header (a 255-byte name).
const MaxHeader = 3 + 1 + 1 + 255 + 2

// Send sends buf[off:off+n]; buf[:off] is free room for a header (at least
// MaxHeader bytes), which it may overwrite. It never blocks: when the
// socket's send buffer is full the datagram is dropped, as a router would.
func (p *PacketConn) Send(buf []byte, off, n int) error {
	b := buf[off : off+n]
	if h := len(p.header); h > 0 {
		if off < h {
			return errors.New("no room for the SOCKS5 UDP header")
		}
		copy(buf[off-h:off], p.header)
		b = buf[off-h : off+n]
	}
	if p.conn == nil {
		p.mu.RLock()
		defer p.mu.RUnlock()
		if p.closed {
			return net.ErrClosed
		}
		return writeNow(p.fd, b)
	}
	var werr error
	err := p.rc.Write(func(fd uintptr) bool {
		werr = writeNow(int(fd), b)
		return true
	})
	if err != nil {
		return err
	}
	return werr
}

// Unwrap returns the payload of a datagram received on the socket: as it is
// from a direct socket, without its header from a SOCKS5 relay. Fragments
// (FRAG ≠ 0) and malformed headers return false: drop them.
func (p *PacketConn) Unwrap(b []byte) ([]byte, bool) {
	if p.header == nil {
		return b, true
	}
	_, name, _, h, err := socksudp.Parse(b)
	if err != nil || (b[3] == 3 && len(name) == 0) { // an empty name too
		return nil, false
	}
	return b[h:], true
}

// Control calls f with the UDP socket's descriptor, which f must not keep.
func (p *PacketConn) Control(f func(fd uintptr)) error {
	if p.conn == nil {
		p.mu.RLock()
		defer p.mu.RUnlock()
		if p.closed {
			return net.ErrClosed
		}
		f(uintptr(p.fd))
		return nil
	}
	return p.rc.Control(f)
}

// ReadNow calls f with the UDP socket's descriptor to read what it holds
// without blocking (the caller knows it is readable); f must not keep it.
func (p *PacketConn) ReadNow(f func(fd uintptr)) error {
	if p.conn == nil {
		return p.Control(f)
	}
	return p.rc.Read(func(fd uintptr) bool { f(fd); return true })
}

// Close closes the socket and, for SOCKS5, the association.
func (p *PacketConn) Close() error {
	if p.conn == nil {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.closed {
			return net.ErrClosed
		}
		p.closed = true
		return syscall.Close(p.fd)
	}
	err := p.conn.Close()
	if p.ctrl != nil {
		p.ctrl.Close()
	}
	return err
}

func newPacketConn(c net.Conn) (*PacketConn, error) {
	uc, ok := c.(*net.UDPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("got a %T, want a *net.UDPConn", c)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		uc.Close()
		return nil, err
	}
	return &PacketConn{conn: uc, rc: rc}, nil
}

// DialUDP opens a UDP socket connected to dst (the session's original
// destination), marked by the Forward template's Control. Its errors are
// the destination's.
func (d *Direct) DialUDP(ctx context.Context, target string, dst netip.AddrPort) (*PacketConn, error) {
	if dst.IsValid() {
		if p, err, ok := dialUDPBare(forwardOf(d.Forward).Control, dst); ok {
			if err != nil {
				return nil, targetError{err}
			}
			return p, nil
		}
	}
	address := target
	if dst.IsValid() {
		address = dst.String()
	}
	nd := net.Dialer{Control: forwardOf(d.Forward).Control}
	c, err := nd.DialContext(ctx, "udp", address)
	if err != nil {
		return nil, targetError{err}
	}
	return newPacketConn(c)
}

// DialUDP sets up a UDP association for datagrams to target.
func (s *SOCKS5) DialUDP(ctx context.Context, target string, _ netip.AddrPort) (*PacketConn, error) {
	fail := func(err error) error {
		return &net.OpError{Op: "socks udp associate", Net: "udp", Source: hostPort(s.Proxy), Addr: hostPort(target), Err: err}
	}
	t, err := parseTarget(target)
	if err != nil {
		return nil, fail(err)
	}
	// RSV RSV FRAG, then the ATYP ADDR PORT a request would carry.
	header, err := appendSocksAddr([]byte{0, 0, 0}, t)
	if err != nil {
		return nil, fail(err)
	}
	h, err := s.newHandshake()
	if err != nil {
		return nil, fail(err)
	}
	req := []byte{socksVersion, socksCmdUDPAssociate, 0, socksATYPIPv4, 0, 0, 0, 0, 0, 0}
	buf := h.scratch()
	ctrl, err := dialProxy(ctx, "socks udp associate", s.Forward, s.Proxy, target, func(c *net.TCPConn) error {
		if err := h.run(c, buf); err != nil {
			return err
		}
		h.requested(target)
		return h.exchangeRequest(c, req, buf)
	})
	if err != nil {
		return nil, err
	}
	relay := h.Bound()
	if !relay.Addr().IsValid() || relay.Addr().IsUnspecified() {
		// 0.0.0.0 (or a name): the relay is where we reached the proxy.
		relay = netip.AddrPortFrom(ctrl.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(), relay.Port())
	}
	if relay.Port() == 0 {
		ctrl.Close()
		return nil, fail(errors.New("the proxy named no relay port"))
	}
	nd := net.Dialer{Control: forwardOf(s.Forward).Control}
	c, err := nd.DialContext(ctx, "udp", relay.String())
	if err != nil {
		ctrl.Close()
		return nil, fail(fmt.Errorf("relay %s: %w", relay, err))
	}
	p, err := newPacketConn(c)
	if err != nil {
		ctrl.Close()
		return nil, fail(err)
	}
	p.ctrl, p.header = ctrl, header
	return p, nil
}

const socksCmdUDPAssociate = 0x03

// UDPFallback is what a UDP session routed to a group that cannot carry
// UDP (HTTP CONNECT upstreams only) does.
type UDPFallback uint8

const (
	UDPReject UDPFallback = iota // drop the session's datagrams (the default)
	UDPDirect                    // send it direct instead
)

// ParseUDPFallback parses "reject" (or "") or "direct".
func ParseUDPFallback(s string) (UDPFallback, error) {
	switch s {
	case "reject", "":
		return UDPReject, nil
	case "direct":
		return UDPDirect, nil
	}
	return 0, fmt.Errorf("%q is not a UDP fallback (want direct or reject)", s)
}

func (f UDPFallback) String() string {
	if f == UDPDirect {
		return "direct"
	}
	return "reject"
}

// udpMembers is the part of a group that can carry UDP.
type udpMembers struct {
	once sync.Once
	ups  []*Upstream // nil: none; g.Upstreams itself when all can
	rr   RoundRobin  // the strategy when only some can
}

func (g *Group) udpUpstreams() []*Upstream {
	g.udp.once.Do(func() {
		var ups []*Upstream
		for _, u := range g.Upstreams {
			if _, ok := u.Dialer.(PacketDialer); ok {
				ups = append(ups, u)
			}
		}
		if len(ups) == len(g.Upstreams) {
			ups = g.Upstreams
		}
		g.udp.ups = ups
	})
	return g.udp.ups
}

// CarriesUDP reports how many of the group's upstreams can carry UDP
// (SOCKS5 and direct can, HTTP CONNECT cannot).
func (g *Group) CarriesUDP() int { return len(g.udpUpstreams()) }

// PacketLease is a UDP way out a Group opened, and the upstream that
// carries it; like Lease, Release ends its count, once.
type PacketLease struct {
	Conn     *PacketConn
	Upstream *Upstream
}

// Release stops counting l's session against its upstream.
func (l PacketLease) Release() {
	if l.Conn != nil && l.Upstream != nil {
		l.Upstream.active.Add(-1)
	}
}

// DialUDP opens a way out for a UDP session through one of the group's
// upstreams that can carry UDP, failing over and keeping health as Dial
// does. When all of them can, the group's strategy picks; when only some
// can, they take turns (a strategy's state is for the whole group).
func (g *Group) DialUDP(ctx context.Context, target string, dst netip.AddrPort, key string) (PacketLease, error) {
	ups := g.udpUpstreams()
	if len(ups) == 0 {
		return PacketLease{}, fmt.Errorf("group %q: no upstream carries UDP (HTTP CONNECT cannot)", g.Name)
	}
	g.unbench(g.now())
	strategy := g.Strategy
	if strategy == nil {
		strategy = &g.rr
	}
	if len(ups) != len(g.Upstreams) {
		strategy = &g.udp.rr
	}
	tried := make([]*Upstream, 0, len(ups))
	var errs []error
	for len(tried) < len(ups) {
		u := strategy.Pick(key, ups, tried)
		if u == nil || slices.Contains(tried, u) {
			if u = oldestFailedOf(ups, tried); u == nil {
				break
			}
		}
		tried = append(tried, u)
		c, err := u.Dialer.(PacketDialer).DialUDP(ctx, target, dst)
		switch {
		case err == nil:
			u.active.Add(1)
			g.markUp(u, "udp associate")
			return PacketLease{Conn: c, Upstream: u}, nil
		case ctxErr(ctx) != nil:
			return PacketLease{Upstream: u}, fmt.Errorf("group %q: upstream %s: %w", g.Name, u.Name, err)
		case isTargetFailure(err):
			g.markUp(u, "udp associate")
			return PacketLease{Upstream: u}, fmt.Errorf("group %q: upstream %s: %w", g.Name, u.Name, err)
		case isRequestRefused(err):
			g.markUp(u, "udp associate")
			errs = append(errs, fmt.Errorf("upstream %s: %w", u.Name, err))
			continue
		}
		g.markDown(u, err)
		errs = append(errs, fmt.Errorf("upstream %s: %w", u.Name, err))
	}
	var last *Upstream
	if len(tried) > 0 {
		last = tried[len(tried)-1]
	}
	return PacketLease{Upstream: last}, &groupError{group: g.Name, errs: errs}
}

// oldestFailedOf is the upstream of ups not yet tried whose last failure
// is the oldest, or nil.
func oldestFailedOf(ups, tried []*Upstream) *Upstream {
	var best *Upstream
	for _, u := range ups {
		if slices.Contains(tried, u) {
			continue
		}
		if best == nil || u.lastFailure().Before(best.lastFailure()) {
			best = u
		}
	}
	return best
}
