// Package tunnel carries each redirected connection from accept to close:
// it learns the original destination from the listener, peeks at the
// client's first bytes for a host name (package sniff), picks a route
// (direct, an upstream proxy group, or reject), dials, writes the peeked
// bytes on and splices both directions until both sides are done, writing
// one access-log line per connection.
//
// It does not touch the kernel's redirection rules or socket options: the
// listener (package redirect) and the socket-mark Control function for
// outbound dials are handed in by the caller.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
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
	// Control is set on every outbound socket before it connects (direct
	// and to upstream proxies); detour uses it to set the socket mark the
	// redirection rules exempt. Nil sets nothing.
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

	router   atomic.Pointer[Router]
	sniffing atomic.Int64 // connections in the sniffing stage
	sniffers sourceCount  // the same, per source
	limitLog atomic.Int64 // UnixNano of the last "limit reached" warning
	silent   sniff.SilentCache
	// directDialer reaches original destinations (timeout, socket mark);
	// built once, by the first Serve.
	directDialer *upstream.Direct
	refusals     warnLimiter // "refused" lines
	acceptLog    warnLimiter // "accept failed" lines
	evictions    warnLimiter // "resetting a connection of the client holding the most" lines
	nameWarns    warnLimiter // "sniffed name does not resolve" lines
	verify       verifyCache
	once         sync.Once

	mu        sync.Mutex
	listeners map[Listener]struct{}
	active    map[*conn]struct{}
	bySource  map[netip.Prefix]map[*conn]struct{} // the same, per source; with MaxConns
	spare     []map[*conn]struct{}                // emptied per-source maps, for reuse
	shutdown  bool
	wg        sync.WaitGroup
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
	// "not_redirected" or "limit".
	Refused(reason string)
	// Sniffed: what peeking found; outcome is a sniff.Outcome's name, or
	// "skipped" (server-first port or destination), "busy" (too many
	// sniffing) or "off".
	Sniffed(proto sniff.Proto, outcome string, took time.Duration)
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

// Serve accepts connections from ln until ln is closed or Shutdown is called,
// serving each in its own goroutine. It always returns a non-nil error.
func (t *Tunnel) Serve(ln Listener) error {
	if !t.track(ln) {
		return ErrServerClosed
	}
	defer t.untrack(ln)
	t.once.Do(func() {
		t.silent.TTL, t.silent.MaxEntries = t.Sniff.SilentTTL, t.Sniff.SilentEntries
		t.directDialer = &upstream.Direct{Forward: &net.Dialer{Timeout: t.dialTimeout(), Control: t.Control, KeepAlive: -1}}
	})
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
			// Out of file descriptors, or a connection aborted before
			// accept: wait a little and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			if ok, held := t.acceptLog.allow(time.Now()); ok {
				t.log().Warn("accept failed; retrying", "listener", ln.Addr().String(), "error", err.Error(),
					"retry_in", backoff, "suppressed", held)
			}
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		cn := &conn{client: c}
		result, evicted := t.add(cn)
		switch result {
		case addShutdown:
			c.Close()
			return ErrServerClosed
		case addFull:
			c.SetLinger(0)
			c.Close()
			t.refusedForLimit(c)
			continue
		}
		if evicted != nil {
			evicted.cutOff(errEvicted)
			t.evictedForLimit(evicted, c)
		}
		if pl, ok := ln.(*proxyListener); ok {
			if obs := pl.observer(t); obs != nil {
				obs.Accepted()
			}
			go t.serveProxy(pl.port, cn)
			continue
		}
		if t.Observer != nil {
			t.Observer.Accepted()
		}
		go t.serveConn(ln, cn)
	}
}

// serveConn is the data path of one connection, top to bottom.
func (t *Tunnel) serveConn(ln Listener, r *conn) {
	start := time.Now()
	client := r.client

	// 1. Where was the client going?
	dst, err := ln.OriginalDst(client)
	if err != nil {
		defer t.remove(r)
		r.end(false)
		if t.Observer != nil {
			t.Observer.Refused("not_redirected")
		}
		if ok, held := t.refusals.allowFrom(time.Now(), sniff.SourceKey(addrPort(client.RemoteAddr()).Addr()), true); ok {
			t.log().LogAttrs(context.Background(), slog.LevelWarn, "refused",
				slog.String("client", client.RemoteAddr().String()),
				slog.String("dst", addrOrEmpty(dst)),
				slog.String("mode", t.Mode),
				slog.String("error", err.Error()),
				slog.Int("suppressed", held))
		}
		return
	}
	// One routing table for the whole connection, though a reload may
	// install another while it is sniffed.
	router := t.router.Load()
	src := addrPort(client.RemoteAddr()).Addr()
	var (
		route  Action
		dialed bool // connected before the sniff
		watch  bool // may teach the silent cache: see watchFirst
		server *net.TCPConn
		lease  upstream.Lease
		target string
	)

	// 2. Which name is it asking for? Peek at its first bytes; they are
	// kept and written on before relaying.
	var first []byte
	var found sniff.Result
	outcome := "off"
	var sniffTook time.Duration
	switch {
	case t.Sniff.Disabled:
	case t.skipPort(dst.Port()):
		outcome = "skipped"
	case t.silent.Silent(dst):
		outcome, watch = "skipped", true
	case !t.enterSniffing(src):
		outcome = "busy"
	default:
		// When the name cannot change the route and the route is direct,
		// connect first: the client's first bytes arrive meanwhile, so the
		// peek finds them queued instead of parking until they come.
		if a, final := router.RouteByAddr(dst); final && a.Kind == ActionDirect {
			route, dialed = a, true
			server, lease, target, err = t.connect(r, route, dst, found)
			if err == nil {
				err = r.setServer(server) // Shutdown resets it while the client is sniffed
			}
		}
		var serr error
		var o sniff.Outcome
		sniffStart := time.Now()
		first, found, o, serr = sniff.Peek(client, sniff.Options{Timeout: t.Sniff.Timeout, MaxBytes: t.Sniff.MaxBytes})
		t.leaveSniffing(src)
		sniffTook = time.Since(sniffStart)
		outcome = o.String()
		// A client silent until the timeout may be waiting for its
		// server to greet, or be a preconnect that speaks later: the
		// relay will tell.
		watch = o == sniff.Timeout && len(first) == 0
		if err == nil && o == sniff.Closed && isReset(serr) {
			err = fmt.Errorf("client: %w", serr)
		}
	}
	if t.Observer != nil {
		t.Observer.Sniffed(found.Proto, outcome, sniffTook)
	}

	// 3. Route: the first matching rule, else the default.
	if err == nil && !dialed {
		route, _ = router.Route(found.Host, found.Proto, dst)
		if route.Kind == ActionReject {
			err = errRejected
		}
	}

	// 4. Connect: to the original destination, or through an upstream asked
	// for the sniffed name when the route trusts it.
	if err == nil && !dialed {
		server, lease, target, err = t.connect(r, route, dst, found)
	}
	// 5. Replay what was peeked, then splice until both sides are done.
	// The relay runs on without this goroutine and calls back once both
	// directions have ended; then step 6 writes the access line.
	info := &connInfo{start: start, client: client, dst: dst, found: found, outcome: outcome,
		sniffTook: sniffTook, route: route, lease: lease, target: target}
	switch {
	case err != nil:
		// Rejected, or the destination cannot be reached: the client
		// sees a reset, the closest a proxy that already accepted can
		// come to "connection refused". (Or the client reset while
		// sniffed after the destination was connected: it gets one too.)
		r.end(true)
		t.finish(r, info, 0, 0, err)
	default:
		if !dialed {
			if err := r.setServer(server); err != nil {
				t.finish(r, info, 0, 0, err) // cut (shutdown) while dialling
				return
			}
		}
		replayed := int64(len(first))
		if replayed > 0 {
			if _, werr := server.Write(first); werr != nil {
				r.end(isReset(werr))
				t.finish(r, info, 0, 0, fmt.Errorf("client->server: replaying %d sniffed bytes: %w", replayed, werr))
				return
			}
		}
		var first func(server bool)
		if watch {
			first = t.watchFirst(dst, src, time.Now())
		}
		err := r.startRelay(t.engine, t.idleTimeout(), first, func(up, down int64, err error) {
			t.finish(r, info, up+replayed, down, err)
		})
		if err != nil {
			r.end(true)
			t.finish(r, info, 0, 0, err)
		}
	}
}

// connInfo is what the access line says about a connection besides how it
// ended, gathered along the data path.
type connInfo struct {
	start     time.Time
	client    *net.TCPConn
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

// finish is step 6 of the data path: the connection is over; write its
// access line and forget it.
func (t *Tunnel) finish(r *conn, c *connInfo, up, down int64, err error) {
	t.finishWith(r, c, t.Observer, up, down, err)
}

// finishWith is finish for an inbound with its own observer.
func (t *Tunnel) finishWith(r *conn, c *connInfo, obs Observer, up, down int64, err error) {
	defer t.remove(r)
	c.lease.Release()
	if obs != nil {
		obs.Closed(c.route.String(), up, down)
	}
	t.logConn(c, up, down, err)
}

// logConn writes a connection's access line.
func (t *Tunnel) logConn(c *connInfo, up, down int64, err error) {
	route := c.route.String()
	if c.noRoute {
		route = ""
	}
	dst := ""
	if c.dst.Addr().IsValid() {
		dst = c.dst.String()
	}
	attrs := []slog.Attr{
		slog.String("client", c.client.RemoteAddr().String()),
		slog.String("dst", dst),
		slog.String("inbound", c.inbound.String()),
	}
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
	t.log().LogAttrs(context.Background(), slog.LevelInfo, "conn", attrs...)
}

// connect dials route's next hop for dst: the original destination, or an
// upstream of the route's group asked for target (the sniffed name when the
// route trusts it, else dst; "" for a direct route). A dial
// cut by Shutdown is reported as errShutdown.
func (t *Tunnel) connect(r *conn, route Action, dst netip.AddrPort, found sniff.Result) (server *net.TCPConn, lease upstream.Lease, target string, err error) {
	return t.connectFor(r, route, dst, found, t.Observer)
}

// connectFor is connect for an inbound with its own observer.
func (t *Tunnel) connectFor(r *conn, route Action, dst netip.AddrPort, found sniff.Result, obs Observer) (server *net.TCPConn, lease upstream.Lease, target string, err error) {
	start := time.Now()
	proxied := route.Kind == ActionProxy && route.Group != nil
	if t.dials.Err() != nil {
		return nil, upstream.Lease{}, "", errShutdown
	}
	ctx, cancel := context.WithTimeout(t.dials, t.dialTimeout())
	defer cancel()
	if proxied {
		target = t.proxyTarget(ctx, route.Name, addrPort(r.client.RemoteAddr()).Addr(), dst, found)
		key := route.Group.Key.Key(addrPort(r.client.RemoteAddr()), dst, found.Host)
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
	return server, lease, target, nil
}

// serverFirstWindow bounds how long after the relay starts a server's first
// bytes count as a greeting. Banners come at once; a server that speaks only
// after a long silence (an HTTP server timing out a request it never got)
// is not server-first, and must not turn sniffing off for its clients.
const serverFirstWindow = 5 * time.Second

// watchFirst is the relay's onFirst for a connection to dst from src that
// may teach the silent cache: one whose client sent nothing until the sniff
// timeout, or one not sniffed because dst is in the cache; the relay starts
// at start. The side whose bytes come first decides:
//   - the server's, within serverFirstWindow: dst greets its clients, so
//     later ones skip the sniff (or, for a cached dst, the entry is renewed,
//     if src is not the source that last did);
//   - the client's: dst is not server-first, whatever was learned before;
//     the entry ends at once.
//
// Neither side speaking teaches nothing. So only evidence writes the
// cache, any client can end an entry, and one source cannot fill it or keep
// an entry alive (sniff.SilentCache bounds each source).
func (t *Tunnel) watchFirst(dst netip.AddrPort, src netip.Addr, start time.Time) func(server bool) {
	return func(server bool) {
		switch {
		case !server:
			t.silent.Forget(dst)
		case time.Since(start) < serverFirstWindow:
			t.silent.Learn(dst, src)
		}
	}
}

// sniffLimits are the MaxSniffing slots, in all and for one source.
func (t *Tunnel) sniffLimits() (all, perSource int) {
	all = t.MaxSniffing
	if all == 0 {
		all = 1024
	}
	return all, max(all/16, 1)
}

// enterSniffing takes one of MaxSniffing slots for a connection from src,
// unless they are all taken or src holds its share; the caller gives it back
// with leaveSniffing.
func (t *Tunnel) enterSniffing(src netip.Addr) bool {
	all, perSource := t.sniffLimits()
	if all < 0 {
		return true
	}
	if n := t.sniffing.Add(1); n > int64(all) {
		t.sniffing.Add(-1)
		return false
	}
	if !t.sniffers.add(sniff.SourceKey(src), perSource) {
		t.sniffing.Add(-1)
		return false
	}
	return true
}

// leaveSniffing gives back the slot enterSniffing took.
func (t *Tunnel) leaveSniffing(src netip.Addr) {
	if all, _ := t.sniffLimits(); all < 0 {
		return
	}
	t.sniffers.done(sniff.SourceKey(src))
	t.sniffing.Add(-1)
}

// sourceCount counts what each source holds, for per-source limits. The
// zero value is ready to use.
type sourceCount struct {
	mu sync.Mutex
	n  map[netip.Prefix]int
}

// add counts one more for src unless it holds limit already.
func (c *sourceCount) add(src netip.Prefix, limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[src] >= limit {
		return false
	}
	if c.n == nil {
		c.n = make(map[netip.Prefix]int)
	}
	c.n[src]++
	return true
}

// done counts one less for src.
func (c *sourceCount) done(src netip.Prefix) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[src]--; c.n[src] <= 0 {
		delete(c.n, src)
	}
}

// errEvicted ends a connection reset to make room for another source's.
var errEvicted = errors.New("reset for another client's connection: the connection limit was reached, and this client held the most")

// evictedForLimit reports that evicted was reset to admit c, in a warning
// rate-limited like the others (each connection's access line says it).
func (t *Tunnel) evictedForLimit(evicted *conn, c *net.TCPConn) {
	if ok, held := t.evictions.allow(time.Now()); ok {
		t.log().Warn("connection limit reached; resetting a connection of the client holding the most", "max_conns", t.MaxConns,
			"reset_client", evicted.client.RemoteAddr().String(), "client", c.RemoteAddr().String(), "suppressed", held)
	}
}

// refusedForLimit reports a connection reset because MaxConns were being
// served, logging at most one warning a second (the counter has them all).
func (t *Tunnel) refusedForLimit(c *net.TCPConn) {
	if t.Observer != nil {
		t.Observer.Refused("limit")
	}
	now := time.Now().UnixNano()
	if last := t.limitLog.Load(); now-last >= int64(time.Second) && t.limitLog.CompareAndSwap(last, now) {
		t.log().Warn("connection limit reached; resetting new connections", "max_conns", t.MaxConns,
			"client", c.RemoteAddr().String())
	}
}

// skipPort reports whether port is one of the server-first ports never
// sniffed.
func (t *Tunnel) skipPort(port uint16) bool {
	skip := t.Sniff.SkipPorts
	if skip == nil {
		skip = DefaultSkipPorts
	}
	return ports.AnyContains(skip, port)
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
	named := net.JoinHostPort(found.Host, fmt.Sprint(dst.Port()))
	if mode == Verify && !t.verify.resolvesTo(ctx, t.lookup, src, found.Host, dst.Addr()) {
		if ok, held := t.nameWarns.allowFrom(time.Now(), sniff.SourceKey(src), true); ok {
			t.log().LogAttrs(ctx, slog.LevelWarn, "sniffed name does not resolve to the destination; sending the IP",
				slog.String("host", found.Host), slog.String("dst", dst.String()), slog.Int("suppressed", held))
		}
		return dst.String()
	}
	return named
}

// Shutdown stops accepting on every listener Serve was given, waits for the
// connections in flight to finish until ctx is done, then resets the ones
// left. It returns ctx's error if any connection had to be cut.
func (t *Tunnel) Shutdown(ctx context.Context) error {
	t.mu.Lock()
	t.shutdown = true
	for ln := range t.listeners {
		ln.Close()
	}
	t.mu.Unlock()

	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		t.closeEngine()
		return nil
	case <-ctx.Done():
	}
	// Cut outside the lock: a relay that ends at once removes itself.
	t.mu.Lock()
	left := make([]*conn, 0, len(t.active))
	for c := range t.active {
		left = append(left, c)
	}
	cancelDials := t.cancelDial
	t.mu.Unlock()
	if cancelDials != nil {
		cancelDials()
	}
	for _, c := range left {
		c.cutOff(errShutdown)
	}
	<-done
	t.closeEngine()
	return ctx.Err()
}

// Active is the number of connections being served.
func (t *Tunnel) Active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.active)
}

func (t *Tunnel) track(ln Listener) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return false
	}
	if t.listeners == nil {
		t.listeners = make(map[Listener]struct{})
		t.engine = relay.New()
		t.dials, t.cancelDial = context.WithCancel(context.Background())
	}
	t.listeners[ln] = struct{}{}
	return true
}

// closeEngine stops the relay engine's poller once the last connection is
// gone; Serve will not start another.
func (t *Tunnel) closeEngine() {
	t.mu.Lock()
	e := t.engine
	t.engine = nil
	t.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// RelayStats is what the relay engine holds now (zero before Serve).
func (t *Tunnel) RelayStats() relay.Stats {
	t.mu.Lock()
	e := t.engine
	t.mu.Unlock()
	if e == nil {
		return relay.Stats{}
	}
	return e.Stats()
}

func (t *Tunnel) untrack(ln Listener) {
	t.mu.Lock()
	delete(t.listeners, ln)
	t.mu.Unlock()
}

func (t *Tunnel) isShutdown() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.shutdown
}

const (
	added = iota
	addShutdown
	addFull
)

// add counts r as served, unless MaxConns are. Then, if r's source holds
// at least two fewer than the source holding the most (the hog), it is
// added anyway and one of the hog's connections is returned, for the
// caller to cut: one source cannot lock the others out. Finding the hog
// costs a pass over the sources, only when the limit is reached.
func (t *Tunnel) add(r *conn) (result int, evict *conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return addShutdown, nil
	}
	if t.MaxConns > 0 {
		r.src = sniff.SourceKey(addrPort(r.client.RemoteAddr()).Addr())
		if len(t.active) >= t.MaxConns {
			mine := len(t.bySource[r.src])
			var hog map[*conn]struct{}
			for _, rs := range t.bySource {
				if len(rs) > len(hog) {
					hog = rs
				}
			}
			if len(hog) < mine+2 {
				return addFull, nil
			}
			for v := range hog {
				evict = v // any one: map order is random
				break
			}
		}
	}
	if t.active == nil {
		t.active = make(map[*conn]struct{})
	}
	t.active[r] = struct{}{}
	if t.MaxConns > 0 {
		if t.bySource == nil {
			t.bySource = make(map[netip.Prefix]map[*conn]struct{})
		}
		rs := t.bySource[r.src]
		if rs == nil {
			if n := len(t.spare); n > 0 {
				rs, t.spare = t.spare[n-1], t.spare[:n-1]
			} else {
				rs = make(map[*conn]struct{})
			}
			t.bySource[r.src] = rs
		}
		rs[r] = struct{}{}
	}
	t.wg.Add(1)
	return added, evict
}

func (t *Tunnel) remove(r *conn) {
	t.mu.Lock()
	delete(t.active, r)
	if t.MaxConns > 0 {
		if rs := t.bySource[r.src]; rs != nil {
			delete(rs, r)
			if len(rs) == 0 {
				delete(t.bySource, r.src)
				if len(t.spare) < 64 {
					t.spare = append(t.spare, rs)
				}
			}
		}
	}
	t.mu.Unlock()
	t.wg.Done()
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
