package upstream

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Group is a pool of upstreams one route sends its connections to. It picks
// one by its Strategy, fails over to the next when a dial or handshake
// fails, and keeps each upstream's health: a failure benches the upstream
// for a back-off that doubles with each failed retry; a success, or a probe
// that connects, brings it back. Set the fields before the first dial and
// do not change them after.
type Group struct {
	// Name names the group in logs and errors.
	Name string
	// Upstreams are the members, in configuration order.
	Upstreams []*Upstream
	// Strategy picks among the usable upstreams. Nil means round-robin.
	Strategy Strategy
	// Key says what a connection's key for Strategy is made of (hashing
	// strategies use it). The zero value is HashHost.
	Key HashKey
	// Log receives one line per health change of an upstream. Nil means
	// slog.Default().
	Log *slog.Logger
	// Backoff is how long a failed upstream is skipped.
	Backoff BackoffConfig
	// Probe, when enabled, checks benched upstreams in the background.
	Probe ProbeConfig
	// Now is the clock for health state. Nil means time.Now.
	Now func() time.Time
	// UDPFallback is what a UDP session routed to the group does when none
	// of its upstreams can carry UDP (HTTP CONNECT cannot): the zero value
	// rejects it.
	UDPFallback UDPFallback

	rr  RoundRobin // the strategy when Strategy is nil
	udp udpMembers // the upstreams DialUDP uses (udp.go)
}

// BackoffConfig is how long a failed upstream is skipped: Initial after the
// first failure, times Factor for each failed retry, at most Max. The zero
// value means 1s, ×2, 60s.
type BackoffConfig struct {
	Initial time.Duration // zero means 1s
	Factor  float64       // zero means 2; below 1 means 1 (a fixed back-off)
	Max     time.Duration // zero means 60s
}

// delay is the back-off after the nth failure in a row (n ≥ 1).
func (b BackoffConfig) delay(n int) time.Duration {
	d := b.Initial
	if d <= 0 {
		d = time.Second
	}
	limit := b.Max
	if limit <= 0 {
		limit = time.Minute
	}
	f := b.Factor
	if f == 0 {
		f = 2
	}
	f = max(f, 1)
	for i := 1; i < n && d < limit; i++ {
		d = time.Duration(float64(d) * f)
	}
	return min(d, limit)
}

// ProbeConfig sets up the active health check of StartProbe.
type ProbeConfig struct {
	// Interval between rounds. Zero means no probing.
	Interval time.Duration
	// Timeout bounds each connect. Zero means Interval.
	Timeout time.Duration
}

// Dial connects to target (for the connection whose original destination
// is dst; see Dialer) through one of the group's upstreams: the one the
// strategy picks for key among those up, then, after each failure, the next
// (never one already tried for this connection). When the strategy has
// none left, the benched upstreams are tried too, oldest failure first: one
// may be back. So the caller sees an error only when every upstream failed,
// and the error then wraps each attempt's.
//
// Three outcomes end the search without benching anyone: success, ctx done
// (the client went away or the server is shutting down, which says nothing
// about the upstream), and a target failure (a direct dial that failed, or
// a proxy that answered that the destination refused or is unreachable:
// another upstream would hear the same). A proxy that refuses the request
// itself (its rules deny this target, it cannot resolve the name) is not
// benched either, but the next upstream is tried. The target is the
// client's choice: only failures no target could cause (the proxy
// unreachable, a broken or silent handshake, our credentials refused) bench
// an upstream, so one client asking for bad destinations cannot take
// upstreams away from the others.
//
// The lease names the upstream that carries the connection; on error, the
// last one tried (none if none was), for the access log.
func (g *Group) Dial(ctx context.Context, target string, dst netip.AddrPort, key string) (Lease, error) {
	if len(g.Upstreams) == 0 {
		return Lease{}, fmt.Errorf("group %q: no upstreams", g.Name)
	}
	return g.dial(ctx, target, dst, key, nil, nil)
}

// dial is Dial after the upstreams in tried failed with errs (one each).
func (g *Group) dial(ctx context.Context, target string, dst netip.AddrPort, key string, tried []*Upstream, errs []error) (Lease, error) {
	g.unbench(g.now())
	tried = append(make([]*Upstream, 0, len(g.Upstreams)), tried...)
	for {
		u := g.next(key, tried)
		if u == nil {
			break
		}
		tried = append(tried, u)
		c, err := u.Dialer.Dial(ctx, target, dst)
		if err == nil {
			g.Report(u, nil)
			return g.Lease(u, c), nil
		}
		errs = append(errs, err)
		if ctxErr(ctx) != nil || !g.Report(u, err) {
			return Lease{Upstream: u}, g.Failure(tried, errs, true)
		}
	}
	var last *Upstream
	if len(tried) > 0 {
		last = tried[len(tried)-1]
	}
	return Lease{Upstream: last}, g.Failure(tried, errs, false)
}

// Failure is the error Dial returns for a connection whose attempts all
// failed: tried are the upstreams in the order tried, errs their errors,
// one each. stopped says the last attempt ended the search (Report said
// not to go on, or the caller gave up: the client went away, shutdown, a
// timeout waiting for the reply): then it alone is named, else every one.
func (g *Group) Failure(tried []*Upstream, errs []error, stopped bool) error {
	if stopped && len(tried) > 0 && len(errs) == len(tried) {
		return groupErr(g.Name, tried[len(tried)-1], errs[len(errs)-1])
	}
	wrapped := make([]error, 0, len(errs))
	for i, err := range errs {
		if i < len(tried) {
			err = upstreamErr(tried[i], err)
		}
		wrapped = append(wrapped, err)
	}
	return &groupError{group: g.Name, errs: wrapped}
}

// Pick is the upstream to try for a connection with key after those in
// tried (all of which failed for it): the strategy's pick among the
// upstreams up, else the benched one whose last failure is the oldest (it
// may be back); nil once every upstream was tried. The first call for a
// connection (tried empty) also ends the back-offs that ran out. It is
// Dial's choice, for a caller that connects the sockets itself: it then
// takes a Lease on success and Reports every attempt's outcome.
func (g *Group) Pick(key string, tried []*Upstream) *Upstream {
	if len(tried) == 0 {
		g.unbench(g.now())
	}
	return g.next(key, tried)
}

// next is Pick without ending back-offs.
func (g *Group) next(key string, tried []*Upstream) *Upstream {
	if len(tried) >= len(g.Upstreams) {
		return nil
	}
	u := g.strategy().Pick(key, g.Upstreams, tried)
	if u == nil || slices.Contains(tried, u) {
		u = g.oldestFailed(tried)
	}
	return u
}

// Report records how an attempt through u ended and says whether the
// connection may try the next upstream (Pick); err is the connect's or the
// Handshake's. The rules are Dial's: nil, or a target failure (the
// destination refused or unreachable, an HTTP 502–504), is an upstream that
// works, and a target failure ends the search: another upstream would hear
// the same. A refusal of the request (SOCKS5 0x01, 0x02, 0x08; HTTP 4xx but
// 407) benches nobody but tries the next. Anything else (the proxy
// unreachable, a broken greeting, our credentials refused, a protocol
// error) benches u and tries the next.
//
// Do not report what says nothing about the upstream: the client gone,
// shutdown, or a timeout waiting for the reply to the request (the target
// may be slow); Dial ends its search on those without benching anyone. A
// timeout of the TCP connect to the proxy is the proxy's failure: report it.
// Nor a connection prepared before the target was known that broke while
// it waited (the proxy closed it while the client was slow to speak): as
// Pending.Dial does, pick again from the start (tried empty) without
// reporting it.
func (g *Group) Report(u *Upstream, err error) (next bool) {
	switch {
	case err == nil, isTargetFailure(err):
		g.markUp(u, "dial") // it answered
		return false
	case isRequestRefused(err):
		g.markUp(u, "dial")
		return true
	}
	g.markDown(u, err)
	return true
}

// Lease counts a connection through u (made by the caller, after Pick) in
// u's Active until the Lease is released, as Dial's leases count: take it
// once the connection is up. conn may be nil for a caller whose sockets are
// not *net.TCPConn.
func (g *Group) Lease(u *Upstream, conn *net.TCPConn) Lease {
	u.active.Add(1)
	return Lease{Conn: conn, Upstream: u, held: true}
}

// Lease is a connection a Group dialled, and the upstream that carries it.
// While the connection lives it counts in its upstream's Active, which the
// least-connections and bounded-load hashing strategies pick by and the
// metrics report; Release ends that, once, when the connection closes.
// A failed dial's Lease has no Conn, names the last upstream tried, and
// its Release does nothing.
type Lease struct {
	Conn     *net.TCPConn
	Upstream *Upstream
	held     bool // counted in Upstream's Active
}

// Release stops counting l's connection against its upstream. Call it
// exactly once per successful Dial (or Group.Lease).
func (l Lease) Release() {
	if l.held {
		l.Upstream.active.Add(-1)
	}
}

// groupErr is a failure of upstream u that ends the search of group.
func groupErr(group string, u *Upstream, err error) error {
	return fmt.Errorf("group %q: upstream %s: %w", group, u.Name, err)
}

// upstreamErr is one failed attempt, among others of a groupError.
func upstreamErr(u *Upstream, err error) error { return fmt.Errorf("upstream %s: %w", u.Name, err) }

// groupError is the failure of every upstream of a group.
type groupError struct {
	group string
	errs  []error
}

func (e *groupError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "group %q: all %d upstreams failed: ", e.group, len(e.errs))
	for i, err := range e.errs {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

func (e *groupError) Unwrap() []error { return e.errs }

// oldestFailed is the upstream not yet tried whose last failure is the
// oldest, or nil.
func (g *Group) oldestFailed(tried []*Upstream) *Upstream {
	var best *Upstream
	var bestAt time.Time
	for _, u := range g.Upstreams {
		if slices.Contains(tried, u) {
			continue
		}
		if at := u.lastFailure(); best == nil || at.Before(bestAt) {
			best, bestAt = u, at
		}
	}
	return best
}

// unbench lets strategies pick the upstreams whose back-off has run out.
// They stay down (in the logs' sense) until they work.
func (g *Group) unbench(now time.Time) {
	for _, u := range g.Upstreams {
		if !u.benched.Load() {
			continue
		}
		u.mu.Lock()
		if !now.Before(u.retryAt) {
			u.benched.Store(false)
		}
		u.mu.Unlock()
	}
}

// markDown records a failure of u. The first one takes it down and starts
// the back-off; a failed retry (after the back-off ran out) lengthens it; a
// failure during the back-off (a last-resort try, or a dial that started
// before) leaves the schedule alone, so the back-off counts retries, not
// traffic.
func (g *Group) markDown(u *Upstream, err error) {
	now := g.now()
	u.mu.Lock()
	wentDown := !u.down.Load()
	var backoff time.Duration
	switch {
	case wentDown:
		u.failures = 1
		u.since = now
	case !now.Before(u.retryAt):
		u.failures++
	default:
		u.lastFail = now
		u.benched.Store(true)
		u.mu.Unlock()
		return
	}
	backoff = g.Backoff.delay(u.failures)
	u.retryAt = now.Add(backoff)
	u.lastFail = now
	u.down.Store(true)
	u.benched.Store(true)
	failures := u.failures
	u.mu.Unlock()

	if wentDown {
		g.log().LogAttrs(context.Background(), slog.LevelWarn, "upstream down",
			slog.String("group", g.Name),
			slog.String("upstream", u.Name),
			slog.String("error", err.Error()),
			slog.Duration("retry_in", backoff))
	} else {
		g.log().LogAttrs(context.Background(), slog.LevelDebug, "upstream still down",
			slog.String("group", g.Name),
			slog.String("upstream", u.Name),
			slog.String("error", err.Error()),
			slog.Int("failures", failures),
			slog.Duration("retry_in", backoff))
	}
}

// markUp records that u works. by says who found out: "dial" or "probe".
func (g *Group) markUp(u *Upstream, by string) {
	if !u.down.Load() {
		return
	}
	now := g.now()
	u.mu.Lock()
	if !u.down.Load() {
		u.mu.Unlock()
		return
	}
	u.down.Store(false)
	u.benched.Store(false)
	u.failures = 0
	u.retryAt = time.Time{}
	since := u.since
	u.mu.Unlock()
	g.log().LogAttrs(context.Background(), slog.LevelInfo, "upstream up",
		slog.String("group", g.Name),
		slog.String("upstream", u.Name),
		slog.String("by", by),
		slog.Duration("down_for", now.Sub(since)))
}

// StartProbe checks the down upstreams every Probe.Interval until ctx is
// done, in a goroutine of its own: an upstream whose proxy accepts a TCP
// connection (through its Forward dialer) within Probe.Timeout is up
// again. It does nothing when Probe.Interval is zero. Direct upstreams and
// unknown dialers are not probed; they come back by their back-off.
func (g *Group) StartProbe(ctx context.Context) {
	if g.Probe.Interval <= 0 {
		return
	}
	go func() {
		tick := time.NewTicker(g.Probe.Interval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				g.probeOnce(ctx)
			}
		}
	}()
}

// probeOnce probes every down upstream at once and waits for all.
func (g *Group) probeOnce(ctx context.Context) {
	timeout := g.Probe.Timeout
	if timeout <= 0 {
		timeout = g.Probe.Interval
	}
	var wg sync.WaitGroup
	for _, u := range g.Upstreams {
		if !u.down.Load() {
			continue
		}
		addr, forward := probeTarget(u.Dialer)
		if addr == "" {
			continue
		}
		wg.Go(func() {
			d := template(forward)
			d.Timeout = timeout
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return
			}
			c.Close()
			g.markUp(u, "probe")
		})
	}
	wg.Wait()
}

// probeTarget is the proxy address a probe connects to, and the template
// to do it with; "" when d has none.
func probeTarget(d Dialer) (string, *net.Dialer) {
	switch d := d.(type) {
	case *HTTPConnect:
		return d.Proxy, d.Forward
	case *SOCKS5:
		return d.Proxy, d.Forward
	}
	return "", nil
}

func (g *Group) now() time.Time {
	if g.Now != nil {
		return g.Now()
	}
	return time.Now()
}

func (g *Group) log() *slog.Logger {
	if g.Log != nil {
		return g.Log
	}
	return slog.Default()
}
