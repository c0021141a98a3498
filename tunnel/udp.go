package tunnel

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// This file is the UDP data path: datagrams the kernel captured (TPROXY)
// become sessions, one per (client address, original destination), each
// with one outbound socket (direct, or a SOCKS5 UDP association) whose
// replies go back to the client from the original destination's address.
//
//	read datagram ─▶ session? ─no─▶ new session ─▶ sniff (QUIC Initial, DNS query) ─▶ route ─▶ connect ─┐
//	                   └─yes──────────────────────────────────────────────────────────────────────────▶ send
//	poller: outbound socket readable ─▶ receive ─▶ reply socket for dst ─▶ client
//	reaper: idle past its kind's timeout ─▶ close ─▶ one access line
//
// A session holds one descriptor (its outbound socket; two through SOCKS5:
// the association's TCP connection too) and no goroutine: every session's
// replies are read by one poller goroutine, every client's datagrams by the
// listener's goroutine.

// PacketListener is where ServeUDP reads datagrams from; cmd adapts
// *redirect.UDPListener to it.
type PacketListener interface {
	// ReadDatagram reads one datagram into b (oob is scratch space for its
	// control messages) and says who sent it and where it was going. drop,
	// when not empty, names why the datagram must be dropped
	// ("no_orig_dst", "own_port", "truncated"); err is a failure of the
	// socket (net.ErrClosed once closed).
	ReadDatagram(b, oob []byte) (n int, client, dst netip.AddrPort, drop string, err error)
	Close() error
	LocalAddr() net.Addr
}

// Replier opens the sockets replies leave from: bound to the original
// destination's address, so the client sees its answer come from where it
// sent. cmd adapts *redirect.ReplyPool to it.
type Replier interface {
	AcquireReply(from netip.AddrPort) (ReplySender, error)
}

// ReplySender sends datagrams to clients from one address.
type ReplySender interface {
	// WriteTo sends b to the client; it never blocks.
	WriteTo(b []byte, to netip.AddrPort) error
	// Release gives the sender back; called once per AcquireReply.
	Release()
}

// UDPObserver hears about UDP sessions, for metrics. Its methods are called
// concurrently and must be quick.
type UDPObserver interface {
	// UDPSessionStarted: a session was created.
	UDPSessionStarted()
	// UDPSessionEnded: a session ended ("idle", "evicted", "error",
	// "shutdown") after moving datagrams and bytes each way.
	UDPSessionEnded(route, end string, dgramsUp, dgramsDown, up, down int64)
	// UDPDropped: a datagram was dropped before any session: reason is a
	// PacketListener drop reason, or "reply_failed" for a reply that could
	// not be sent (reply_addr_in_use when its address was taken).
	UDPDropped(reason string)
	// UDPSniffed: what the first datagrams of a session said.
	UDPSniffed(proto sniff.Proto, outcome string)
}

// UDPOptions configure UDP sessions. The zero value uses the defaults.
type UDPOptions struct {
	// MaxSessions caps the sessions at once; a new one beyond it evicts one:
	// the least recently used of its own source's (an IPv4 address, an IPv6
	// /64) if that source holds the most, else that of a source holding at
	// least two more than it, else the session idle longest. So one client
	// opening sessions evicts only its own once it is the heaviest, not the
	// others'. Zero means 16384.
	MaxSessions int
	// DNSTimeout, QUICTimeout and IdleTimeout end a session with no
	// datagram either way for that long: DNS (a query was sniffed), QUIC
	// (an Initial packet was), any other. Zero means 10s, 30s and 60s.
	DNSTimeout, QUICTimeout, IdleTimeout time.Duration
	// SniffTimeout is how long the first datagrams of a QUIC flow are held
	// while its ClientHello is incomplete; then it is routed by IP. Zero
	// means 150ms.
	SniffTimeout time.Duration
	// SniffMaxBytes caps the datagrams held while sniffing one session.
	// Zero means 16 KiB.
	SniffMaxBytes int
	// MaxSniffing caps the sessions being sniffed at once; a new session
	// beyond it is routed by IP at once ("busy"). One source holds at most a
	// sixteenth of them (at least one), as for TCP. Zero means 1024.
	MaxSniffing int
	// SniffDisabled routes every session by IP.
	SniffDisabled bool
}

// UDPServer carries UDP sessions for a Tunnel, with its router, socket
// mark, dial timeout and log. Set the fields, then call ServeUDP for each
// listener; Shutdown ends everything.
type UDPServer struct {
	// Tunnel gives the routes (SetRouter), Control, DialTimeout and Log.
	Tunnel *Tunnel
	// Replies opens reply sockets. Required.
	Replies Replier
	// Options are the limits and timeouts.
	Options UDPOptions
	// Observer hears about sessions. Nil means nobody.
	Observer UDPObserver
	// Inbound is how the datagrams came in, for the rules and the access
	// line: the kernel (the zero value), or SOCKS5 UDP ASSOCIATE on the
	// proxy port.
	Inbound Inbound

	// refuseLocal, when set, refuses a destination on the gateway itself
	// that no rule (only the default) routes (the proxy port's rule).
	refuseLocal func(netip.Addr) bool

	once     sync.Once
	poll     *udpPoller
	pollErr  error
	mu       sync.Mutex
	sessions map[udpKey]*udpSession
	byID     map[uint64]*udpSession
	lru      list.List // of *udpSession, most recently active first
	nextID   uint64
	closed   bool
	bySource map[netip.Prefix]int // sessions per client source
	srcHist  map[int]int          // how many sources hold n sessions
	srcMost  int                  // the most sessions one source holds
	sniffing atomic.Int64
	sniffers sourceCount    // sessions being sniffed, per source
	wg       sync.WaitGroup // sessions
	stop     chan struct{}
	lns      map[PacketListener]struct{}

	directOnce sync.Once
	direct     *upstream.Direct // the direct route's way out (socket mark)
}

type udpKey struct{ client, dst netip.AddrPort }

// udpKind picks a session's idle timeout.
type udpKind uint8

const (
	kindOther udpKind = iota
	kindDNS
	kindQUIC
)

// Session states.
const (
	stSniffing uint32 = iota
	stConnecting
	stRunning
	stDropping // rejected, or the connect failed: datagrams are dropped until idle
	stClosed
)

// maxUDPHeader is the room kept in front of each datagram read, for a
// SOCKS5 UDP request header.
const maxUDPHeader = upstream.MaxHeader

type udpSession struct {
	srv   *UDPServer
	key   udpKey
	src   netip.Prefix // sniff.SourceKey of the client
	id    uint64
	start time.Time
	last  atomic.Int64 // UnixNano of the last datagram either way
	// touched is last as of the session's last move to the LRU's front
	// (guarded by srv.mu).
	touched int64
	elem    *list.Element

	state   atomic.Uint32
	mu      sync.Mutex    // guards the fields below and state changes
	kind    atomic.Uint32 // a udpKind, set while sniffing
	pending [][]byte      // held datagrams, each after maxUDPHeader bytes of room
	pendLen int
	quic    *sniff.QUICAssembler
	timer   *time.Timer
	out     atomic.Pointer[upstream.PacketLease] // set once, when connected
	reply   atomic.Pointer[replyRef]

	found   sniff.Result
	outcome string
	route   Action
	target  string
	via     *upstream.Upstream // the upstream that carries it, or was tried last
	err     error
	end     string

	dgUp, dgDown, bytesUp, bytesDown atomic.Int64
}

type replyRef struct{ s ReplySender }

func (o UDPOptions) maxSessions() int {
	if o.MaxSessions > 0 {
		return o.MaxSessions
	}
	return 16384
}

func (o UDPOptions) timeout(k udpKind) time.Duration {
	switch k {
	case kindDNS:
		if o.DNSTimeout > 0 {
			return o.DNSTimeout
		}
		return 10 * time.Second
	case kindQUIC:
		if o.QUICTimeout > 0 {
			return o.QUICTimeout
		}
		return 30 * time.Second
	}
	if o.IdleTimeout > 0 {
		return o.IdleTimeout
	}
	return time.Minute
}

func (o UDPOptions) sniffTimeout() time.Duration {
	if o.SniffTimeout > 0 {
		return o.SniffTimeout
	}
	return 150 * time.Millisecond
}

func (o UDPOptions) sniffMaxBytes() int {
	if o.SniffMaxBytes > 0 {
		return o.SniffMaxBytes
	}
	return 16 << 10
}

// enterSniffing takes a sniffing slot for a session from src, unless they
// are all taken or src holds its share; endSniff gives it back.
func (srv *UDPServer) enterSniffing(src netip.Prefix) bool {
	limit := srv.Options.maxSniffing()
	if srv.sniffing.Add(1) > limit {
		srv.sniffing.Add(-1)
		return false
	}
	if !srv.sniffers.add(src, max(int(limit/16), 1)) {
		srv.sniffing.Add(-1)
		return false
	}
	return true
}

func (o UDPOptions) maxSniffing() int64 {
	if o.MaxSniffing > 0 {
		return int64(o.MaxSniffing)
	}
	return 1024
}

// reapEvery is how often idle sessions are looked for: a quarter of the
// shortest timeout, between 50ms and 1s.
func (o UDPOptions) reapEvery() time.Duration {
	d := min(o.timeout(kindDNS), o.timeout(kindQUIC), o.timeout(kindOther)) / 4
	return min(max(d, 50*time.Millisecond), time.Second)
}

var errUDPClosed = errors.New("tunnel: UDP server closed")

func (srv *UDPServer) init() error {
	srv.once.Do(func() {
		srv.sessions = make(map[udpKey]*udpSession)
		srv.byID = make(map[uint64]*udpSession)
		srv.lns = make(map[PacketListener]struct{})
		srv.stop = make(chan struct{})
		srv.poll, srv.pollErr = newUDPPoller(srv)
		if srv.pollErr == nil {
			go srv.reap()
		}
	})
	return srv.pollErr
}

// ServeUDP reads datagrams from ln until it is closed or Shutdown is
// called. It always returns a non-nil error.
func (srv *UDPServer) ServeUDP(ln PacketListener) error {
	if err := srv.init(); err != nil {
		return err
	}
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		return errUDPClosed
	}
	srv.lns[ln] = struct{}{}
	srv.mu.Unlock()
	defer func() {
		srv.mu.Lock()
		delete(srv.lns, ln)
		srv.mu.Unlock()
	}()
	buf := make([]byte, maxUDPHeader+64<<10)
	oob := make([]byte, 64)
	for {
		n, client, dst, drop, err := ln.ReadDatagram(buf[maxUDPHeader:], oob)
		if err != nil {
			if srv.isClosed() {
				return errUDPClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			srv.Tunnel.log().Warn("udp read failed", "listener", ln.LocalAddr().String(), "error", err.Error())
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if drop != "" {
			if srv.Observer != nil {
				srv.Observer.UDPDropped(drop)
			}
			continue
		}
		srv.datagram(buf, n, udpKey{client, dst})
	}
}

// datagram hands one client datagram (buf[maxUDPHeader:][:n]) to its
// session, making the session first if there is none.
func (srv *UDPServer) datagram(buf []byte, n int, key udpKey) {
	now := time.Now().UnixNano()
	srv.mu.Lock()
	s := srv.sessions[key]
	if s != nil {
		srv.lru.MoveToFront(s.elem)
		s.touched = now
		srv.mu.Unlock()
		s.up(buf, n, now)
		return
	}
	if srv.closed {
		srv.mu.Unlock()
		return
	}
	src := sniff.SourceKey(key.client.Addr())
	var victims []*udpSession
	for len(srv.sessions) >= srv.Options.maxSessions() {
		v := srv.victim(src)
		if v == nil {
			break
		}
		srv.unlink(v)
		victims = append(victims, v)
	}
	srv.nextID++
	s = &udpSession{srv: srv, key: key, src: src, id: srv.nextID, start: time.Now(), touched: now}
	srv.countSource(src, +1)
	s.last.Store(now)
	s.elem = srv.lru.PushFront(s)
	srv.sessions[key] = s
	srv.byID[s.id] = s
	srv.wg.Add(1)
	srv.mu.Unlock()
	for _, v := range victims {
		v.finish("evicted")
	}
	if srv.Observer != nil {
		srv.Observer.UDPSessionStarted()
	}
	s.first(buf, n, now)
}

// victim picks the session to evict for a new one from src: one of src's
// own if src holds the most (so a client flooding sessions churns its own),
// else one of a source holding at least two more than src, else the session
// idle longest. The most any source holds is kept as sessions come and go;
// the session is looked for from the LRU's back, a bounded walk (a heavy
// source's sessions are many, so one is near). Called with srv.mu held.
func (srv *UDPServer) victim(src netip.Prefix) *udpSession {
	mine := srv.bySource[src]
	var v *udpSession
	switch {
	case mine > 0 && mine >= srv.srcMost:
		v = srv.leastRecent(func(s *udpSession) bool { return s.src == src })
	case srv.srcMost >= mine+2:
		v = srv.leastRecent(func(s *udpSession) bool { return srv.bySource[s.src] >= mine+2 })
	}
	if v == nil {
		v = srv.oldestIdle()
	}
	return v
}

// victimWalk bounds the walk of leastRecent.
const victimWalk = 256

// leastRecent is the session nearest the LRU's back, among the last
// victimWalk, for which match holds; or nil. Called with srv.mu held.
func (srv *UDPServer) leastRecent(match func(*udpSession) bool) *udpSession {
	e := srv.lru.Back()
	for range victimWalk {
		if e == nil {
			return nil
		}
		if s := e.Value.(*udpSession); match(s) {
			return s
		}
		e = e.Prev()
	}
	return nil
}

// countSource adds d (+1 or -1) to the sessions src holds, keeping srcMost.
// Called with srv.mu held.
func (srv *UDPServer) countSource(src netip.Prefix, d int) {
	if srv.bySource == nil {
		srv.bySource, srv.srcHist = make(map[netip.Prefix]int), make(map[int]int)
	}
	n := srv.bySource[src]
	if n > 0 {
		if srv.srcHist[n]--; srv.srcHist[n] == 0 {
			delete(srv.srcHist, n)
		}
	}
	n += d
	if n > 0 {
		srv.bySource[src] = n
		srv.srcHist[n]++
	} else {
		delete(srv.bySource, src)
	}
	switch {
	case n > srv.srcMost:
		srv.srcMost = n
	case srv.srcHist[srv.srcMost] == 0 && srv.srcMost > 0:
		srv.srcMost-- // src held the most alone; now it holds one less
	}
}

// oldestIdle picks the session to evict for a new one: the LRU's back,
// unless a reply came since it was last moved (replies do not reorder the
// list, to keep the poller off srv.mu); such a session goes to the front
// and the next is looked at, a few times at most. Called with srv.mu held.
func (srv *UDPServer) oldestIdle() *udpSession {
	for range 16 {
		e := srv.lru.Back()
		if e == nil {
			return nil
		}
		s := e.Value.(*udpSession)
		if last := s.last.Load(); last > s.touched {
			s.touched = last
			srv.lru.MoveToFront(e)
			continue
		}
		return s
	}
	if e := srv.lru.Back(); e != nil {
		return e.Value.(*udpSession)
	}
	return nil
}

// unlink removes s from the tables; called with srv.mu held.
func (srv *UDPServer) unlink(s *udpSession) {
	if srv.sessions[s.key] == s {
		delete(srv.sessions, s.key)
	}
	if srv.byID[s.id] == s {
		srv.countSource(s.src, -1)
	}
	delete(srv.byID, s.id)
	srv.lru.Remove(s.elem)
}

// first starts a session with its first datagram: sniff, or route at once.
func (s *udpSession) first(buf []byte, n int, now int64) {
	srv := s.srv
	b := buf[maxUDPHeader : maxUDPHeader+n]
	s.dgUp.Add(1)
	s.bytesUp.Add(int64(n))
	s.mu.Lock()
	s.keep(b)
	switch {
	case srv.Options.SniffDisabled:
		s.outcome = "off"
	case !srv.enterSniffing(s.src):
		s.outcome = "busy"
	default:
		s.quic = quicAssemblers.Get().(*sniff.QUICAssembler)
		res, st := s.quic.Add(b)
		switch st {
		case sniff.QUICNeedMore:
			s.kind.Store(uint32(kindQUIC))
			s.timer = time.AfterFunc(srv.Options.sniffTimeout(), s.sniffTimedOut)
			s.mu.Unlock()
			return
		case sniff.QUICDone:
			s.kind.Store(uint32(kindQUIC))
			s.found, s.outcome = res, "found"
		case sniff.QUICInvalid:
			s.kind.Store(uint32(kindQUIC))
			s.found, s.outcome = sniff.Result{Proto: sniff.QUIC}, "none"
		default:
			if name, _, ok := sniff.DNSQuery(b); ok {
				s.kind.Store(uint32(kindDNS))
				s.found, s.outcome = sniff.Result{Proto: sniff.DNS, Host: name}, "found"
			} else {
				s.outcome = "none"
			}
		}
		s.endSniff()
	}
	s.decide()
}

// keep holds a copy of b, after room for a header, until the session is
// connected (then sent from where it is), within the sniff
// byte budget (called with s.mu held).
func (s *udpSession) keep(b []byte) bool {
	if s.pendLen+len(b) > s.srv.Options.sniffMaxBytes() && len(s.pending) > 0 {
		return false
	}
	p := make([]byte, maxUDPHeader+len(b))
	copy(p[maxUDPHeader:], b)
	s.pending = append(s.pending, p)
	s.pendLen += len(b)
	return true
}

// endSniff gives back the sniffing slot and assembler (s.mu held).
func (s *udpSession) endSniff() {
	if s.quic != nil {
		s.quic.Reset()
		quicAssemblers.Put(s.quic)
		s.quic = nil
		s.srv.sniffers.done(s.src)
		s.srv.sniffing.Add(-1)
	}
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
}

var quicAssemblers = sync.Pool{New: func() any { return sniff.NewQUICAssembler(sniff.QUICLimits{}) }}

func (s *udpSession) sniffTimedOut() {
	s.mu.Lock()
	if s.state.Load() != stSniffing {
		s.mu.Unlock()
		return
	}
	s.found, s.outcome = sniff.Result{Proto: sniff.QUIC}, "timeout" // QUIC so far, no ClientHello yet
	s.endSniff()
	s.decide()
}

// decide routes the session and connects it; called with s.mu held, which
// it releases.
func (s *udpSession) decide() {
	srv := s.srv
	if srv.Observer != nil {
		srv.Observer.UDPSniffed(s.found.Proto, s.outcome)
	}
	router := srv.Tunnel.router.Load()
	var idx int
	s.route, idx = router.route(NetUDP, srv.Inbound, s.found.Host, s.found.Proto, s.key.dst)
	if idx < 0 && srv.refuseLocal != nil && s.route.Kind == ActionDirect && srv.refuseLocal(s.key.dst.Addr()) {
		s.err, s.route = errLocalTarget, Action{Kind: ActionReject}
	}
	if s.route.Kind == ActionProxy && s.route.Group != nil {
		if s.route.Group.CarriesUDP() == 0 {
			// No upstream of the group can carry UDP: its fallback.
			if s.route.Group.UDPFallback == upstream.UDPDirect {
				s.route = Action{Kind: ActionDirect}
			} else {
				s.err = fmt.Errorf("group %q has no upstream that carries UDP (SOCKS5 or direct)", s.route.Group.Name)
				s.route = Action{Kind: ActionReject}
			}
		}
	}
	if s.route.Kind == ActionReject {
		if s.err == nil {
			s.err = errRejected
		}
		s.drop()
		s.mu.Unlock()
		return
	}
	s.state.Store(stConnecting)
	route := s.route
	s.mu.Unlock()
	if route.Kind == ActionDirect {
		s.connect(route)
		return
	}
	go s.connect(route)
}

// drop stops carrying: pending datagrams are forgotten, later ones dropped
// until the session idles out (s.mu held).
func (s *udpSession) drop() {
	s.pending, s.pendLen = nil, 0
	s.state.Store(stDropping)
}

// connect opens the session's way out and sends what was held.
func (s *udpSession) connect(route Action) {
	srv := s.srv
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), srv.Tunnel.dialTimeout())
	defer cancel()
	var lease upstream.PacketLease
	var target string
	var err error
	if route.Kind == ActionDirect {
		srv.directOnce.Do(func() {
			srv.direct = &upstream.Direct{Forward: &net.Dialer{Control: srv.Tunnel.socketControl()}}
		})
		lease.Conn, err = srv.direct.DialUDP(ctx, "", s.key.dst)
	} else {
		target = s.udpTarget(ctx, route)
		key := route.Group.Key.Key(s.key.client, s.key.dst, s.found.Host)
		lease, err = route.Group.DialUDP(ctx, target, s.key.dst, key)
	}
	if srv.Tunnel.Observer != nil {
		srv.Tunnel.Observer.Dialed(route.String(), time.Since(start), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.via, s.target = lease.Upstream, target
	if s.state.Load() == stClosed {
		if lease.Conn != nil {
			lease.Conn.Close()
			lease.Release()
		}
		return
	}
	if err != nil {
		s.err = err
		s.drop()
		return
	}
	s.out.Store(&lease)
	if err := srv.poll.add(s, lease.Conn); err != nil {
		s.err = err
		s.drop()
		return
	}
	for _, p := range s.pending {
		lease.Conn.Send(p, maxUDPHeader, len(p)-maxUDPHeader)
	}
	s.pending, s.pendLen = nil, 0
	s.state.Store(stRunning)
}

// udpTarget is what a SOCKS5 upstream is asked to send to: for QUIC the
// SNI with the original port, as TCP asks for the TLS SNI (and as the
// route's send_name allows); a DNS query always goes to the resolver the
// client chose (its QNAME is a question, not a destination), and anything
// else to the original destination.
func (s *udpSession) udpTarget(ctx context.Context, route Action) string {
	if s.found.Proto != sniff.QUIC {
		return s.key.dst.String()
	}
	return s.srv.Tunnel.proxyTarget(ctx, route.Name, s.key.client.Addr(), s.key.dst, s.found)
}

// up carries one more client datagram (buf[maxUDPHeader:][:n]).
func (s *udpSession) up(buf []byte, n int, now int64) {
	s.last.Store(now)
	s.dgUp.Add(1)
	s.bytesUp.Add(int64(n))
	if s.state.Load() == stRunning {
		s.out.Load().Conn.Send(buf, maxUDPHeader, n)
		return
	}
	s.mu.Lock()
	switch s.state.Load() {
	case stRunning:
		s.mu.Unlock()
		s.out.Load().Conn.Send(buf, maxUDPHeader, n)
		return
	case stSniffing:
		b := buf[maxUDPHeader : maxUDPHeader+n]
		if !s.keep(b) {
			s.found, s.outcome = sniff.Result{Proto: sniff.QUIC}, "too-large"
			s.endSniff()
			s.decide()
			return
		}
		res, st := s.quic.Add(b)
		switch st {
		case sniff.QUICNeedMore:
			s.mu.Unlock()
			return
		case sniff.QUICDone:
			s.found, s.outcome = res, "found"
		default:
			s.found, s.outcome = sniff.Result{Proto: sniff.QUIC}, "none"
		}
		s.endSniff()
		s.decide()
		return
	case stConnecting:
		s.keep(buf[maxUDPHeader : maxUDPHeader+n])
	}
	s.mu.Unlock()
}

// down sends one reply (payload from the destination) to the client; the
// poller calls it.
func (s *udpSession) down(b []byte) {
	srv := s.srv
	s.last.Store(time.Now().UnixNano())
	r := s.reply.Load()
	if r == nil {
		s.mu.Lock()
		if s.state.Load() == stClosed {
			s.mu.Unlock()
			return
		}
		if r = s.reply.Load(); r == nil {
			rs, err := srv.Replies.AcquireReply(s.key.dst)
			if err != nil {
				s.mu.Unlock()
				srv.replyFailed(s, err)
				return
			}
			r = &replyRef{rs}
			s.reply.Store(r)
		}
		s.mu.Unlock()
	}
	if err := r.s.WriteTo(b, s.key.client); err != nil {
		srv.replyFailed(s, err)
		return
	}
	s.dgDown.Add(1)
	s.bytesDown.Add(int64(len(b)))
}

// failed ends a session whose socket reported an error (ICMP unreachable
// from the destination, a closed SOCKS5 relay).
func (s *udpSession) failed(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	srv := s.srv
	srv.mu.Lock()
	if srv.byID[s.id] != s {
		srv.mu.Unlock()
		return
	}
	srv.unlink(s)
	srv.mu.Unlock()
	s.finish("error")
}

// finish closes a session already unlinked and writes its access line.
func (s *udpSession) finish(end string) {
	srv := s.srv
	s.mu.Lock()
	if s.state.Load() == stClosed {
		s.mu.Unlock()
		return
	}
	s.state.Store(stClosed)
	s.end = end
	s.endSniff()
	s.pending = nil
	out := s.out.Load()
	r := s.reply.Swap(nil)
	s.mu.Unlock()
	if out != nil {
		out.Conn.Close()
		out.Release()
	}
	if r != nil {
		r.s.Release()
	}
	defer srv.wg.Done()
	up, down := s.bytesUp.Load(), s.bytesDown.Load()
	dgUp, dgDown := s.dgUp.Load(), s.dgDown.Load()
	if srv.Observer != nil {
		srv.Observer.UDPSessionEnded(s.route.String(), end, dgUp, dgDown, up, down)
	}
	attrs := []slog.Attr{
		slog.String("client", s.key.client.String()),
		slog.String("dst", s.key.dst.String()),
		slog.String("inbound", srv.Inbound.String()),
		slog.String("host", s.found.Host),
		slog.String("proto", s.found.Proto.String()),
		slog.String("sniff", s.outcome),
		slog.String("route", s.route.String()),
	}
	if alpn := s.found.ALPN(); alpn != nil {
		attrs = append(attrs, slog.Any("alpn", alpn))
	}
	if s.route.Kind == ActionProxy {
		attrs = append(attrs, slog.String("upstream", upstreamName(s.via)), slog.String("target", s.target))
	}
	attrs = append(attrs,
		slog.Int64("dgrams_up", dgUp),
		slog.Int64("dgrams_down", dgDown),
		slog.Int64("up", up),
		slog.Int64("down", down),
		slog.Duration("duration", time.Since(s.start)),
		slog.String("end", end),
		slog.String("error", errString(s.err)))
	srv.Tunnel.log().LogAttrs(context.Background(), slog.LevelInfo, "udp", attrs...)
}

func (srv *UDPServer) replyFailed(s *udpSession, err error) {
	if srv.Observer == nil {
		return
	}
	if isAddrInUse(err) {
		srv.Observer.UDPDropped("reply_addr_in_use")
		return
	}
	srv.Observer.UDPDropped("reply_failed")
}

// reap ends sessions idle past their timeout.
func (srv *UDPServer) reap() {
	tick := time.NewTicker(srv.Options.reapEvery())
	defer tick.Stop()
	var expired []*udpSession
	for {
		select {
		case <-srv.stop:
			return
		case <-tick.C:
		}
		now := time.Now().UnixNano()
		srv.mu.Lock()
		for _, s := range srv.byID {
			if now-s.last.Load() > int64(srv.Options.timeout(udpKind(s.kind.Load()))) {
				srv.unlink(s)
				expired = append(expired, s)
			}
		}
		srv.mu.Unlock()
		for i, s := range expired {
			s.finish("idle")
			expired[i] = nil
		}
		expired = expired[:0]
	}
}

// Sessions is the number of UDP sessions now.
func (srv *UDPServer) Sessions() int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return len(srv.sessions)
}

func (srv *UDPServer) isClosed() bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.closed
}

// Shutdown stops reading, closes every session (each writes its access
// line) and the poller.
func (srv *UDPServer) Shutdown() {
	if srv.init() != nil {
		return
	}
	srv.mu.Lock()
	if srv.closed {
		srv.mu.Unlock()
		return
	}
	srv.closed = true
	close(srv.stop)
	for ln := range srv.lns {
		ln.Close()
	}
	var all []*udpSession
	for _, s := range srv.byID {
		srv.unlink(s)
		all = append(all, s)
	}
	srv.mu.Unlock()
	for _, s := range all {
		s.finish("shutdown")
	}
	srv.wg.Wait()
	srv.poll.close()
}
