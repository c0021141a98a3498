// Package tunnel is the data path of one redirected connection, from
// accept to its access line, as named stages (serveConn): the original
// destination from the listener, a peek at the client's first bytes for a
// host name (package sniff), a route by the routing rules (route.go:
// direct, an upstream group, or reject), the connection to the destination
// or through an upstream (package tunnel/upstream), the replay of the
// peeked bytes, and the relay (package tunnel/relay) until both sides are
// done. The explicit proxy port (proxy.go) is a second way in to the same
// route, connect and relay stages. It owns the rules, the per-connection
// limits, the memory of server-first destinations, and Shutdown.
//
// It does not touch the kernel's redirection rules or socket options: the
// listener (package redirect, which tunnel never imports) and the
// socket-mark Control function for outbound dials are handed in by the
// caller. How bytes are moved is the relay's business, how an upstream is
// spoken to is upstream's, how a proxy client's request reads is
// proxyport's.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/relay"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// Listener is where Serve takes connections from; *redirect.Listener is one.
type Listener interface {
	Accept() (*net.TCPConn, error)
	// OriginalDst is where c was going before the kernel redirected it. An
	// error means c must not be served (not redirected, or unknown).
	OriginalDst(c *net.TCPConn) (netip.AddrPort, error)
	Close() error
	Addr() net.Addr
}

// Tunnel serves redirected connections. The zero value is ready to use: it
// sniffs with the defaults and sends everything direct. Serve may be called
// for several listeners at once.
type Tunnel struct {
	// Mark is the socket mark (SO_MARK) set on every outbound socket before
	// it connects (direct and to upstream proxies): the mark the
	// redirection rules exempt. Zero sets none.
	Mark uint32
	// Control is run on every outbound socket before it connects, after
	// the mark is set. Nil runs nothing.
	Control func(network, address string, c syscall.RawConn) error
	// DialTimeout bounds connecting to the destination or an upstream
	// (including its handshake). Zero means 10s.
	DialTimeout time.Duration
	// IdleTimeout ends a connection on which no byte moved either way for
	// this long, open or half-closed. Zero means 5 minutes.
	IdleTimeout time.Duration
	// Sniff says how to read the host name from the client's first bytes.
	Sniff SniffOptions
	// Log receives one access line per connection and the listener's
	// errors. Nil means slog.Default().
	Log *slog.Logger
	// Mode names the listener's mode in access lines ("redirect", "tproxy").
	Mode string
	// Resolver resolves sniffed names for routes in Verify mode. Nil means
	// net.DefaultResolver.
	Resolver *net.Resolver
	// MaxConns caps the connections served at once; one accepted beyond it
	// is reset at once and reported as refused ("limit"). Unless its source
	// (an IPv4 address, an IPv6 /64) holds at least two fewer than the
	// source holding the most: then one of that source's connections is
	// reset to make room, so one client opening connections cannot lock the
	// others out, and shares even out under pressure. Zero means no cap.
	MaxConns int
	// MaxSniffing caps the connections in the sniffing stage at once; one
	// beyond it is routed by IP without waiting for its first bytes (sniff
	// outcome "busy"), so silent clients cannot hold up others. One source
	// (an IPv4 address, an IPv6 /64) holds at most a sixteenth of the slots
	// (at least one), so a single client opening silent connections cannot
	// make everyone else's "busy". Zero means 1024; negative means no cap.
	MaxSniffing int
	// Observer hears about every connection (detour's metrics). Nil means
	// nobody.
	Observer Observer
	// Loops knows detour's own outbound connections: one accepted from
	// the local address of one of them is a routing loop, refused before
	// anything is dialled (Refused("loop"), one "routing loop" line per
	// loopLogEvery). The dialers' Control functions must go through
	// Loops.Control: the direct dialer's does; upstream groups' dialers are
	// the caller's. Nil means no loop detection.
	Loops *LoopGuard
	// NoEventLoops serves every connection on goroutines of its own, as
	// for listeners that cannot hand out bare descriptors, instead of on
	// the event loops (see event_linux.go). For comparisons and tests.
	NoEventLoops bool

	router   atomic.Pointer[Router]
	sniffing atomic.Int64 // connections in the sniffing stage
	sniffers sourceCount  // the same, per source
	limitLog atomic.Int64 // UnixNano of the last "limit reached" warning
	silent   sniff.SilentCache
	// directDialer reaches original destinations (timeout, socket mark);
	// built once, by the first Serve.
	directDialer *upstream.Direct
	refusals     warnLimiter  // "refused" lines
	loopLogged   atomic.Int64 // UnixNano of the last "routing loop" line
	loopHeld     atomic.Int64 // loops not logged since
	acceptLog    warnLimiter  // "accept failed" lines
	evictions    warnLimiter  // "resetting a connection of the client holding the most" lines
	nameWarns    warnLimiter  // "sniffed name does not resolve" lines
	verify       verifyCache
	once         sync.Once
	lineAttrs    sync.Pool // *[lineMax]slog.Attr: access lines for a LineHandler

	mu        sync.Mutex
	listeners map[Listener]struct{}
	// evListeners are the listeners the event loops serve; Shutdown
	// takes them off the loops before closing them.
	evListeners map[Listener]*evListener
	evOnce      sync.Once
	loops       []*eventLoop // started by the first listener they serve
	active      map[*conn]struct{}
	bySource    map[netip.Prefix]map[*conn]struct{} // the same, per source; with MaxConns
	spare       []map[*conn]struct{}                // emptied per-source maps, for reuse
	shutdown    bool
	wg          sync.WaitGroup
	workers     workers // run serveConn
	// engine relays the connections; made by the first Serve, closed by
	// Shutdown once the last connection is gone.
	engine *relay.Engine
	// dials is the parent of every dial's context; Shutdown cancels it
	// when it cuts the connections left.
	dials      context.Context
	cancelDial context.CancelFunc
}

// SniffOptions configure sniffing. The zero value sniffs every connection
// with the sniff package's defaults and skips DefaultSkipPorts.
type SniffOptions struct {
	// Disabled routes every connection by IP without reading first.
	Disabled bool
	// Timeout bounds the wait for the client's first bytes. Zero means
	// sniff.DefaultTimeout (300ms).
	Timeout time.Duration
	// MaxBytes caps what is read while looking. Zero means
	// sniff.DefaultMaxBytes (64 KiB).
	MaxBytes int
	// SkipPorts are destination ports whose server speaks first: no sniffing
	// is tried, so their clients wait for nothing. Nil means
	// DefaultSkipPorts; an empty, non-nil list skips none.
	SkipPorts []ports.Range
	// SilentTTL and SilentEntries size the memory of destinations seen to
	// speak first (see Tunnel.watchFirst): their next connections skip
	// sniffing. Zero means the sniff package's defaults (10m, 4096).
	SilentTTL     time.Duration
	SilentEntries int
}

// DefaultSkipPorts are the usual server-first ports: SSH, SMTP, POP3, IMAP,
// submission, MySQL, PostgreSQL.
var DefaultSkipPorts = []ports.Range{{Lo: 22, Hi: 22}, {Lo: 25, Hi: 25}, {Lo: 110, Hi: 110}, {Lo: 143, Hi: 143}, {Lo: 587, Hi: 587}, {Lo: 3306, Hi: 3306}, {Lo: 5432, Hi: 5432}}

// Observer hears what happens to connections, for metrics. Its methods are
// called from the connections' goroutines, concurrently; they must be quick.
type Observer interface {
	// Accepted: a connection was accepted (and not refused for the limit).
	Accepted()
	// Refused: a connection was closed before routing; reason is
	// "not_redirected", "limit" or "loop" (see Tunnel.Loops).
	Refused(reason string)
	// Sniffed: what peeking found (found.Proto, and found.ECH for a
	// ClientHello with encrypted_client_hello); outcome is a sniff.Outcome's name, or
	// "skipped" (server-first port or destination), "busy" (too many
	// sniffing) or "off".
	Sniffed(found sniff.Result, outcome string, took time.Duration)
	// Dialed: a connection to the destination or an upstream was tried.
	Dialed(route string, took time.Duration, err error)
	// Closed: a served connection ended, with the bytes moved each way.
	Closed(route string, up, down int64)
}

// errRejected ends a connection whose route is reject.
var errRejected = errors.New("rejected by route")

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("tunnel: server closed")

// SetRouter installs the routing table used by connections accepted from
// now on; connections in flight keep the route they got. Nil sends
// everything direct.
func (t *Tunnel) SetRouter(r *Router) { t.router.Store(r) }

// Serve accepts connections from ln until Shutdown is called and serves
// them. A listener that hands out bare descriptors (*redirect.Listener; see
// descListener) is served on the Tunnel's event loops, which accept on a
// descriptor of their own: closing ln does not stop them, Shutdown does.
// Any other listener is served until it is closed or Shutdown is called,
// each connection on a goroutine. It always returns a non-nil error.
func (t *Tunnel) Serve(ln Listener) error {
	if !t.track(ln) {
		return ErrServerClosed
	}
	defer t.untrack(ln)
	t.once.Do(t.setup)
	if dl, ok := ln.(descListener); ok {
		if err := t.serveLoops(dl); err != errNoLoops {
			return err
		}
	}
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if t.isShutdown() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			backoff = t.acceptFailed(ln, err, backoff)
			continue
		}
		backoff = 0
		if !t.dispatch(ln, c) {
			return ErrServerClosed
		}
	}
}

// setup makes what every Serve shares, once: the silent cache's size and
// the direct dialer (timeout, socket mark, loop detection).
func (t *Tunnel) setup() {
	t.silent.TTL, t.silent.MaxEntries = t.Sniff.SilentTTL, t.Sniff.SilentEntries
	control := t.socketControl()
	if t.Loops != nil {
		control = t.Loops.Control(control)
	}
	t.directDialer = &upstream.Direct{Forward: &net.Dialer{Timeout: t.dialTimeout(), Control: control, KeepAlive: -1}}
}

// socketControl is what every outbound socket runs before it connects:
// the mark, then Control.
func (t *Tunnel) socketControl() func(network, address string, c syscall.RawConn) error {
	if t.Mark == 0 {
		return t.Control
	}
	return MarkControl(t.Mark, t.Control)
}

// MarkControl returns a Dialer.Control function that sets SO_MARK to mark
// on the socket, so that the redirection rules, which exempt the mark,
// leave detour's own connections alone, then runs next (if not nil).
// Setting a mark needs CAP_NET_ADMIN. The event loops' dials set it
// without the closure (prepareSocket).
func MarkControl(mark uint32, next func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = setMark(int(fd), mark) }); err != nil {
			return err
		}
		if serr != nil {
			return markError(mark, address, serr)
		}
		if next != nil {
			return next(network, address, c)
		}
		return nil
	}
}

// markError is a failed SO_MARK on a socket to address.
func markError(mark uint32, address string, err error) error {
	return fmt.Errorf("setting SO_MARK %#x on socket to %s: %w (needs CAP_NET_ADMIN)", mark, address, err)
}

// acceptFailed waits after a failed accept (out of file descriptors, or a
// connection aborted before accept), a little longer each time in a row,
// as net/http does, and returns the wait.
func (t *Tunnel) acceptFailed(ln Listener, err error, backoff time.Duration) time.Duration {
	backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
	if ok, held := t.acceptLog.allow(time.Now()); ok {
		t.log().Warn("accept failed; retrying", "listener", ln.Addr().String(), "error", err.Error(),
			"retry_in", backoff, "suppressed", held)
	}
	time.Sleep(backoff)
	return backoff
}

// dispatch counts c as served and starts its data path (the transparent
// one, or the proxy port's) in a goroutine of its own. Beyond MaxConns it
// is reset, or a connection of the client holding the most is. It reports
// false, closing c, after Shutdown.
func (t *Tunnel) dispatch(ln Listener, c *net.TCPConn) bool {
	cn := &conn{client: c, peer: addrPort(c.RemoteAddr())}
	result, evicted := t.add(cn)
	switch result {
	case addShutdown:
		c.Close()
		return false
	case addFull:
		c.SetLinger(0)
		c.Close()
		t.refusedForLimit(cn.peer)
		return true
	}
	if evicted != nil {
		evicted.cutOff(errEvicted)
		t.evictedForLimit(evicted, cn.peer)
	}
	if pl, ok := ln.(*proxyListener); ok {
		if obs := pl.observer(t); obs != nil {
			obs.Accepted()
		}
		go t.serveProxy(pl.port, cn)
		return true
	}
	if t.Observer != nil {
		t.Observer.Accepted()
	}
	t.workers.run(func() { t.serveConn(ln, cn) })
	return true
}

// serveConn is the data path of one connection: the stages below, in
// order, each a function of its own. The first error skips the rest; then,
// or when the relay ends, finish writes the access line.
func (t *Tunnel) serveConn(ln Listener, c *conn) {
	start := time.Now()
	dst, ok := t.originalDst(ln, c)
	if !ok {
		return // refused
	}
	// One routing table for the whole connection, though a reload may
	// install another while it is sniffed.
	t.serveFrom(c, start, dst, t.router.Load(), nil)
}

// serveFrom is serveConn from stage 2 on, for a connection accepted at
// start going to dst. done, when not nil, is stage 2 done already (by an
// event loop that handed the connection over).
func (t *Tunnel) serveFrom(c *conn, start time.Time, dst netip.AddrPort, router *Router, done *sniffed) {
	var sn sniffed
	var h hop
	var err error
	if done != nil {
		sn = *done
	} else {
		sn, h, err = t.sniff(c, router, dst)
	}
	switch {
	case h.pending != nil && err != nil:
		t.dropPending(h.pending)
	case h.pending != nil: // the route is final: the name cannot change it
		h, err = t.connectPending(c, h, dst, sn.found)
	case err == nil && h.server == nil: // not connected early
		h.route, err = route(router, dst, sn.found)
		if err == nil {
			h, err = t.connect(c, h.route, dst, sn.found)
		}
	}
	line := &connInfo{start: start, peer: c.peer, dst: dst, found: sn.found, outcome: sn.outcome,
		sniffTook: sn.took, route: h.route, lease: h.lease, target: h.target}
	if err == nil {
		err = replay(c, sn.first)
	}
	if err == nil {
		err = t.relay(c, line, sn)
	}
	if err != nil {
		// Rejected, the destination cannot be reached, the client reset
		// while sniffed, or Shutdown cut it: the client sees a reset, the
		// closest a proxy that already accepted can come to "connection
		// refused".
		c.end(true)
		t.finish(c, line, 0, 0, err)
	}
}

// originalDst is stage 1: where was the client going? A connection the
// listener cannot say (not redirected: addressed to detour itself) is
// refused: closed at once, counted and logged, never dialled. So is one
// from one of detour's own outbound sockets (see Loops): a routing loop,
// where dialling would make one more, without end.
func (t *Tunnel) originalDst(ln Listener, c *conn) (netip.AddrPort, bool) {
	dst, err := ln.OriginalDst(c.client)
	if err != nil {
		t.refuse(c, dst, "not_redirected", err)
		return dst, false
	}
	if t.Loops != nil && t.Loops.Looped(c.peer, dst) {
		t.refuseLoop(c, dst)
		return dst, false
	}
	return dst, true
}

// loopLogEvery spaces the "routing loop" lines: a loop repeats for as long
// as the rules stay wrong, and one line says it all.
const loopLogEvery = 10 * time.Second

// refuseLoop ends a connection that is a routing loop: reset at once (which
// resets the outbound connection it came from), counted, and logged as an
// error with the likely cause, at most once per loopLogEvery.
func (t *Tunnel) refuseLoop(c *conn, dst netip.AddrPort) {
	defer t.remove(c)
	c.end(true)
	if t.Observer != nil {
		t.Observer.Refused("loop")
	}
	now := time.Now().UnixNano()
	last := t.loopLogged.Load()
	if last != 0 && now-last < int64(loopLogEvery) || !t.loopLogged.CompareAndSwap(last, now) {
		t.loopHeld.Add(1)
		return
	}
	t.log().LogAttrs(context.Background(), slog.LevelError, "routing loop",
		slog.String("client", c.peer.String()),
		slog.String("dst", dst.String()),
		slog.String("mode", t.Mode),
		slog.String("cause", t.Loops.cause()),
		slog.Int64("suppressed", t.loopHeld.Swap(0)))
}

// refuse ends a connection that will not be served: it is closed (no
// access line: it was never routed), counted under reason and logged as
// "refused", at most warnBurst lines a second.
func (t *Tunnel) refuse(c *conn, dst netip.AddrPort, reason string, err error) {
	defer t.remove(c)
	c.end(false)
	if t.Observer != nil {
		t.Observer.Refused(reason)
	}
	if ok, held := t.refusals.allowFrom(time.Now(), sniff.SourceKey(c.peer.Addr()), true); ok {
		t.log().LogAttrs(context.Background(), slog.LevelWarn, "refused",
			slog.String("client", c.peer.String()),
			slog.String("dst", addrOrEmpty(dst)),
			slog.String("mode", t.Mode),
			slog.String("error", err.Error()),
			slog.Int("suppressed", held))
	}
}

// sniffed is what stage 2 learned from the client's first bytes.
type sniffed struct {
	first   []byte        // the bytes read, to be replayed
	found   sniff.Result  // what they said
	outcome string        // a sniff.Outcome's name, or skipped, busy, off
	took    time.Duration // time spent waiting for them
	watch   bool          // the relay may teach the silent cache: see watchFirst
}

// sniff is stage 2: which name is the client asking for? It peeks at the
// client's first bytes, which are kept and replayed, unless sniffing is
// off, the port is a server-first one, dst is known to speak first, or too
// many connections are being sniffed.
//
// When the name cannot change the route, it connects first (see
// connectEarly), and returns that hop.
func (t *Tunnel) sniff(c *conn, router *Router, dst netip.AddrPort) (sn sniffed, h hop, err error) {
	src := c.peer.Addr()
	switch {
	case t.Sniff.Disabled:
		sn.outcome = "off"
	case t.skipPort(dst.Port()):
		sn.outcome = "skipped"
	case t.silent.Silent(dst):
		sn.outcome, sn.watch = "skipped", true
	case !t.enterSniffing(src):
		sn.outcome = "busy"
	default:
		h, err = t.connectEarly(c, router, dst)
		sn, err = t.peek(c, src, err)
	}
	if t.Observer != nil {
		t.Observer.Sniffed(sn.found, sn.outcome, sn.took)
	}
	return sn, h, err
}

// connectEarly connects before the client's first bytes are read when they
// cannot change the route: the bytes arrive meanwhile, so the peek finds
// them queued instead of parking until they come. A direct route is
// connected; through an upstream group whose pick cannot depend on the
// name, the handshake goes as far as the request (see preconnect).
// Otherwise it does nothing and returns no hop.
func (t *Tunnel) connectEarly(c *conn, router *Router, dst netip.AddrPort) (hop, error) {
	a, final := router.RouteByAddr(dst)
	switch {
	case !final:
		return hop{}, nil
	case a.Kind == ActionDirect:
		return t.connect(c, a, dst, sniff.Result{})
	case a.Kind == ActionProxy && a.Group != nil:
		return t.preconnect(c, a, dst)
	}
	return hop{}, nil
}

// peek reads the client's first bytes for sniff, which holds one of the
// sniffing slots for src and gives it back here. err is the early dial's;
// a client that reset while sniffed makes one if there is none.
func (t *Tunnel) peek(c *conn, src netip.Addr, err error) (sniffed, error) {
	start := time.Now()
	first, found, o, serr := sniff.Peek(c.client, sniff.Options{Timeout: t.Sniff.Timeout, MaxBytes: t.Sniff.MaxBytes})
	t.leaveSniffing(src)
	sn := sniffed{first: first, found: found, outcome: o.String(), took: time.Since(start),
		// A client silent until the timeout may be waiting for its
		// server to greet, or be a preconnect that speaks later: the
		// relay will tell.
		watch: o == sniff.Timeout && len(first) == 0}
	if err == nil && o == sniff.Closed && isReset(serr) {
		err = fmt.Errorf("client: %w", serr)
	}
	return sn, err
}

// route is stage 3: the first matching rule, else the default. A reject is
// an error.
func route(router *Router, dst netip.AddrPort, found sniff.Result) (Action, error) {
	a, _ := router.Route(found.Host, found.Proto, dst)
	if a.Kind == ActionReject {
		return a, errRejected
	}
	return a, nil
}

// hop is the way to the destination: the route, and once connected the
// server connection with what the access line says about it.
type hop struct {
	route  Action
	server *net.TCPConn   // nil until connected
	lease  upstream.Lease // for a proxied route: the upstream carrying it
	target string         // what the upstream was asked for
	// pending is the upstream connection preconnect opened, waiting for
	// the target; nil once connected (or when none was opened).
	pending *upstream.Pending
}

// connect is stage 4: it dials route's next hop for dst (see connectFor)
// and attaches the server to c.
func (t *Tunnel) connect(c *conn, route Action, dst netip.AddrPort, found sniff.Result) (hop, error) {
	server, lease, target, err := t.connectFor(c, route, dst, found, t.Observer)
	h := hop{route: route, lease: lease, target: target}
	if err != nil {
		return h, err
	}
	if err := c.setServer(server); err != nil {
		return h, err // cut while dialling; finish releases the lease
	}
	h.server = server
	return h, nil
}

// connectFor dials route's next hop for dst: the original destination, or
// an upstream of the route's group asked for target (see proxyTarget), and
// tells obs. A dial cut by Shutdown is reported as errShutdown.
func (t *Tunnel) connectFor(r *conn, route Action, dst netip.AddrPort, found sniff.Result, obs Observer) (server *net.TCPConn, lease upstream.Lease, target string, err error) {
	start := time.Now()
	proxied := route.Kind == ActionProxy && route.Group != nil
	if t.dials.Err() != nil {
		return nil, upstream.Lease{}, "", errShutdown
	}
	ctx, cancel := context.WithTimeout(t.dials, t.dialTimeout())
	defer cancel()
	if proxied {
		target = t.proxyTarget(ctx, route.Name, r.peer.Addr(), dst, found)
		key := route.Group.Key.Key(r.peer, dst, found.Host)
		lease, err = route.Group.Dial(ctx, target, dst, key)
		server = lease.Conn
	} else {
		server, err = t.directDialer.Dial(ctx, dst.String(), dst)
	}
	if err != nil && t.dials.Err() != nil && errors.Is(err, context.Canceled) {
		err = errShutdown
	}
	if obs != nil {
		obs.Dialed(route.String(), time.Since(start), err)
	}
	if err != nil {
		return nil, upstream.Lease{}, target, err
	}
	if t.Loops != nil {
		t.Loops.Dialed(server)
	}
	return server, lease, target, nil
}

// proxyTarget is what an upstream is asked to connect to: the sniffed name
// with the original port when the route's name mode allows it, else the
// original IP and port. A ClientHello with encrypted_client_hello is no
// exception: its outer name is where the TLS connection really goes (the
// site itself under GREASE ECH, which every Chromium and Firefox hello
// carries; the client-facing server that decrypts the inner hello under real
// ECH), so the upstream is asked for it like for any other name.
//
// A request meant for an explicit proxy (CONNECT, or an absolute-form
// target) names the proxy's next hop, not dst: such a name routes but is not
// sent.
func (t *Tunnel) proxyTarget(ctx context.Context, mode NameMode, src netip.Addr, dst netip.AddrPort, found sniff.Result) string {
	if found.Host == "" || found.ViaProxy || mode == RouteOnly {
		return dst.String()
	}
	named := net.JoinHostPort(found.Host, strconv.Itoa(int(dst.Port())))
	if mode == Verify && !t.verify.resolvesTo(ctx, t.lookup, src, found.Host, dst.Addr()) {
		if ok, held := t.nameWarns.allowFrom(time.Now(), sniff.SourceKey(src), true); ok {
			t.log().LogAttrs(ctx, slog.LevelWarn, "sniffed name does not resolve to the destination; sending the IP",
				slog.String("host", found.Host), slog.String("dst", dst.String()), slog.Int("suppressed", held))
		}
		return dst.String()
	}
	return named
}

// replay is stage 5: the bytes peeked go to the server first; sniffing
// never consumes or changes the stream.
func replay(c *conn, first []byte) error {
	if len(first) == 0 {
		return nil
	}
	if _, err := c.server.Write(first); err != nil {
		c.end(isReset(err))
		return fmt.Errorf("client->server: replaying %d sniffed bytes: %w", len(first), err)
	}
	return nil
}

// relay is stage 6: it hands client and server to the engine, which splices
// until both sides are done, without this goroutine, and then calls finish.
func (t *Tunnel) relay(c *conn, line *connInfo, sn sniffed) error {
	var first func(server bool)
	if sn.watch {
		first = t.watchFirst(line.dst, c.peer.Addr(), time.Now())
	}
	replayed := int64(len(sn.first))
	return c.startRelay(t.engine, t.idleTimeout(), first, func(up, down int64, err error) {
		t.finish(c, line, up+replayed, down, err)
	})
}

// connInfo is what the access line says about a connection besides how it
// ended, gathered along the data path (the transparent one above, or the
// proxy port's in proxy.go).
type connInfo struct {
	start     time.Time
	peer      netip.AddrPort // the client
	dst       netip.AddrPort
	found     sniff.Result
	outcome   string
	sniffTook time.Duration
	route     Action
	lease     upstream.Lease
	target    string

	// The proxy port's (inbound proxy): request is what the client asked
	// for (http, connect, socks5, socks4); sni the TLS name peeked in a
	// tunnel to port 443; noRoute marks a request refused before routing.
	inbound Inbound
	request string
	status  int // the HTTP response's status
	sni     string
	noRoute bool
}

// finish is where a served connection ends: it writes the access line and
// forgets the connection.
func (t *Tunnel) finish(r *conn, c *connInfo, up, down int64, err error) {
	t.finishWith(r, c, t.Observer, up, down, err)
}

// finishWith is finish for an inbound with its own observer.
func (t *Tunnel) finishWith(r *conn, c *connInfo, obs Observer, up, down int64, err error) {
	defer t.remove(r)
	c.lease.Release()
	if t.Loops != nil {
		if s := r.serverConn(); s != nil {
			t.Loops.Closed(s)
		}
	}
	if obs != nil {
		obs.Closed(c.route.String(), up, down)
	}
	t.logConn(c, up, down, err)
}

// logConn writes a connection's access line: the one place that does.
func (t *Tunnel) logConn(c *connInfo, up, down int64, err error) {
	route := c.route.String()
	if c.noRoute {
		route = ""
	}
	client, dst := lineAddrs(c)
	// Room for every attribute the line may have: a LineHandler keeps
	// the slice from the stack, so it comes from a pool.
	room, _ := t.lineAttrs.Get().(*[lineMax]slog.Attr)
	if room == nil {
		room = new([lineMax]slog.Attr)
	}
	attrs := append(room[:0],
		client,
		dst,
		slog.String("inbound", c.inbound.String()))
	if c.inbound == Transparent {
		attrs = append(attrs, slog.String("mode", t.Mode))
	}
	attrs = append(attrs,
		slog.String("host", c.found.Host),
		slog.String("proto", c.found.Proto.String()),
		slog.String("sniff", c.outcome),
		slog.Duration("sniff_time", c.sniffTook),
		slog.String("route", route))
	if c.inbound == ProxyInbound {
		attrs = append(attrs, slog.String("request", c.request))
		if c.status != 0 {
			attrs = append(attrs, slog.Int("status", c.status))
		}
		if c.sni != "" {
			attrs = append(attrs, slog.String("sni", c.sni))
			if c.sni != c.found.Host {
				attrs = append(attrs, slog.Bool("sni_mismatch", true))
			}
		}
	}
	if alpn := c.found.ALPN(); alpn != nil {
		attrs = append(attrs, slog.String("alpn", strings.Join(alpn, ",")))
	}
	if c.found.ECH {
		attrs = append(attrs, slog.Bool("ech", true))
	}
	if c.route.Kind == ActionProxy {
		attrs = append(attrs, slog.String("upstream", upstreamName(c.lease.Upstream)), slog.String("target", c.target))
	}
	attrs = append(attrs,
		slog.Int64("up", up),
		slog.Int64("down", down),
		slog.Duration("duration", time.Since(c.start)),
		slog.String("error", errString(err)))
	t.writeLine(attrs)
	*room = [lineMax]slog.Attr{} // holds on to nothing of c's
	t.lineAttrs.Put(room)
}

// lineMax is the most attributes an access line has.
const lineMax = 24

// A LineHandler is a slog.Handler that also takes a record as its parts,
// as cmd/detour's does; Tunnel gives it the access lines that way, since a
// slog.Record copies the attributes past its fifth to the heap, hundreds
// of bytes for each line. It must keep nothing of attrs.
type LineHandler interface {
	HandleAttrs(ctx context.Context, t time.Time, level slog.Level, msg string, attrs []slog.Attr) error
}

// lineAddrs are the access line's client and dst, as pointers to the
// values: boxing a netip.AddrPort would copy it to the heap. Handlers print
// them with MarshalText, which is String, or "" for an invalid dst; an
// invalid client keeps String's "invalid AddrPort".
func lineAddrs(c *connInfo) (client, dst slog.Attr) {
	client = slog.Any("client", &c.peer)
	if !c.peer.IsValid() {
		client = slog.String("client", c.peer.String())
	}
	return client, slog.Any("dst", &c.dst)
}

// writeLine hands the access line to the log's handler.
func (t *Tunnel) writeLine(attrs []slog.Attr) {
	if t.Log == nil {
		slog.Default().LogAttrs(context.Background(), slog.LevelInfo, "conn", attrs...)
		return
	}
	// Straight to the handler: Logger would look up the caller's frames
	// (runtime.Callers) for a source no handler of detour's prints.
	ctx := context.Background()
	h := t.Log.Handler()
	if !h.Enabled(ctx, slog.LevelInfo) {
		return
	}
	// Nowhere to report a failure to log.
	if lh, ok := h.(LineHandler); ok {
		lh.HandleAttrs(ctx, time.Now(), slog.LevelInfo, "conn", attrs)
		return
	}
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "conn", 0)
	r.AddAttrs(attrs...)
	h.Handle(ctx, r)
}

func (t *Tunnel) log() *slog.Logger {
	if t.Log != nil {
		return t.Log
	}
	return slog.Default()
}

// lookup resolves a sniffed name with Resolver, for Verify routes.
func (t *Tunnel) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	r := t.Resolver
	if r == nil {
		r = net.DefaultResolver
	}
	return r.LookupNetIP(ctx, "ip", host)
}

func (t *Tunnel) dialTimeout() time.Duration {
	if t.DialTimeout > 0 {
		return t.DialTimeout
	}
	return 10 * time.Second
}

func (t *Tunnel) idleTimeout() time.Duration {
	if t.IdleTimeout > 0 {
		return t.IdleTimeout
	}
	return 5 * time.Minute
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func addrOrEmpty(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

func upstreamName(u *upstream.Upstream) string {
	if u == nil {
		return ""
	}
	return u.Name
}
