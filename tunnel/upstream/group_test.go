package upstream

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// newTestGroup is a round-robin group on an injected clock, logging at
// Info to a log buffer.
func newTestGroup(ups ...*Upstream) (*Group, *testkit.Clock, *groupLog) {
	clock := testkit.NewClock()
	logs := &groupLog{}
	g := &Group{
		Name:      "pool",
		Upstreams: ups,
		Strategy:  &RoundRobin{},
		Log:       slog.New(slog.NewTextHandler(logs, nil)),
		Now:       clock.Now,
	}
	return g, clock, logs
}

// groupLog collects a group's log lines.
type groupLog struct{ testkit.LogBuffer }

// lines are the lines logged with message msg.
func (l *groupLog) lines(msg string) []string { return l.Lines(`msg="` + msg + `"`) }

// switchableSOCKS is a SOCKS5 proxy that works, or (when broken) reads the
// greeting and closes: a handshake failure.
type switchableSOCKS struct {
	*fakeProxy
	broken atomic.Bool
}

func startSwitchableSOCKS(t *testing.T) *switchableSOCKS {
	s := &switchableSOCKS{}
	good := &socksServer{}
	inner := good.start(t) // serves the working case
	s.fakeProxy = startFakeProxy(t, func(p *fakeProxy, c *net.TCPConn) {
		if s.broken.Load() {
			io.ReadFull(c, make([]byte, 3))
			return
		}
		if s, err := p.dialTarget(inner.addr); err == nil {
			p.relay(c, s)
		}
	})
	return s
}

func socksUpstream(name, addr string) *Upstream {
	return &Upstream{Name: name, Dialer: &SOCKS5{Proxy: addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}}
}

func TestGroupFailsOver(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	garbage := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
		io.ReadFull(c, make([]byte, 3))
		io.WriteString(c, "HTTP/1.1 400 Bad Request\r\n\r\n")
	})
	good := (&socksServer{}).start(t)
	refused := socksUpstream("refused", deadPort(t))
	bad := socksUpstream("garbage", garbage.addr)
	ok := socksUpstream("good", good.addr)
	g, _, logs := newTestGroup(refused, bad, ok)

	lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
	c, u := lease.Conn, lease.Upstream
	if err != nil {
		t.Fatalf("client saw %v; want failover to the working upstream", err)
	}
	mustTCP(t, c)
	if u != ok || ok.Active() != 1 {
		t.Fatalf("carried by %v with %d active; want good with 1", u, ok.Active())
	}
	roundTrip(t, c, "failed over")
	if refused.Up() || bad.Up() || !ok.Up() {
		t.Fatalf("up: refused %v, garbage %v, good %v; want false false true", refused.Up(), bad.Up(), ok.Up())
	}
	down := logs.lines("upstream down")
	if len(down) != 2 ||
		!strings.Contains(down[0], "group=pool upstream=refused") || !strings.Contains(down[0], "connection refused") || !strings.Contains(down[0], "retry_in=1s") ||
		!strings.Contains(down[1], "group=pool upstream=garbage") || !strings.Contains(down[1], "version 0x48") {
		t.Fatalf("down lines:\n%s", strings.Join(down, "\n"))
	}
	lease.Release()
	if ok.Active() != 0 {
		t.Fatalf("after Release %d active, want 0", ok.Active())
	}

	// The next connections go straight to the one that works; nothing new
	// is logged.
	before := garbage.accepted.Load()
	for range 3 {
		lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
		c, u := lease.Conn, lease.Upstream
		if err != nil || u != ok {
			t.Fatalf("dial = %v, %v", u, err)
		}
		c.Close()
		lease.Release()
	}
	if garbage.accepted.Load() != before {
		t.Fatal("a benched upstream was dialled while another was up")
	}
	if n := len(logs.lines("upstream down")); n != 2 {
		t.Fatalf("%d down lines, want 2 (one per state change)", n)
	}
}

func TestGroupBackoffGrowsAndCaps(t *testing.T) {
	testkit.CheckGoroutines(t)
	dead := socksUpstream("dead", deadPort(t))
	g, clock, logs := newTestGroup(dead)
	backoff := func() time.Duration {
		dead.mu.Lock()
		defer dead.mu.Unlock()
		return dead.retryAt.Sub(clock.Now())
	}
	for i, want := range []time.Duration{1, 2, 4, 8, 16, 32, 60, 60} {
		_, err := g.Dial(context.Background(), "example.com:443", netip.AddrPort{}, "")
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial %d: %v", i, err)
		}
		if got := backoff(); got != want*time.Second {
			t.Fatalf("after failure %d: back-off %v, want %v", i+1, got, want*time.Second)
		}
		// A failure during the back-off (the last resort when all are
		// down) does not lengthen it.
		clock.Advance(500 * time.Millisecond)
		g.Dial(context.Background(), "example.com:443", netip.AddrPort{}, "")
		if got := backoff(); got != want*time.Second-500*time.Millisecond {
			t.Fatalf("failure %d during back-off moved it: %v left", i+1, got)
		}
		clock.Advance(want*time.Second - 500*time.Millisecond)
	}
	if n := len(logs.lines("upstream down")); n != 1 {
		t.Fatalf("%d down lines, want 1:\n%s", n, logs)
	}

	custom := BackoffConfig{Initial: 100 * time.Millisecond, Factor: 3, Max: 2 * time.Second}
	for n, want := range map[int]time.Duration{1: 100, 2: 300, 3: 900, 4: 2000, 40: 2000} {
		if got := custom.delay(n); got != want*time.Millisecond {
			t.Errorf("delay(%d) = %v, want %v", n, got, want*time.Millisecond)
		}
	}
	if got := (BackoffConfig{Factor: 0.5}).delay(5); got != time.Second {
		t.Errorf("factor below 1: delay(5) = %v, want a fixed 1s", got)
	}
}

func TestGroupRecovers(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	flaky := startSwitchableSOCKS(t)
	good := (&socksServer{}).start(t)
	a := socksUpstream("flaky", flaky.addr)
	b := socksUpstream("good", good.addr)
	g, clock, logs := newTestGroup(a, b)

	flaky.broken.Store(true)
	dial := func(want *Upstream) *Upstream {
		t.Helper()
		lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
		c, u := lease.Conn, lease.Upstream
		if err != nil || (want != nil && u != want) {
			t.Fatalf("dial went to %v, %v; want %v", u, err, want)
		}
		roundTrip(t, c, "x")
		c.Close()
		lease.Release()
		return u
	}
	dial(b) // a fails first, then b
	if a.Up() {
		t.Fatal("flaky still up after a handshake failure")
	}
	flaky.broken.Store(false)
	tries := flaky.accepted.Load()
	clock.Advance(999 * time.Millisecond)
	dial(b)
	if flaky.accepted.Load() != tries {
		t.Fatal("flaky dialled during its back-off")
	}
	clock.Advance(time.Millisecond)
	// Back-off over: round-robin comes back to it, and it works.
	if first, second := dial(nil), dial(nil); first != a && second != a {
		t.Fatal("round-robin did not come back to flaky after its back-off")
	}
	if !a.Up() {
		t.Fatal("flaky not up after a successful dial")
	}
	up := logs.lines("upstream up")
	if len(up) != 1 || !strings.Contains(up[0], "upstream=flaky by=dial down_for=1s") {
		t.Fatalf("up lines:\n%s", strings.Join(up, "\n"))
	}
}

// TestGroupAllDownStillTries: with every upstream benched, the dial still
// goes out, oldest failure first.
func TestGroupAllDownStillTries(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	pa, pb := startSwitchableSOCKS(t), startSwitchableSOCKS(t)
	a, b := socksUpstream("a", pa.addr), socksUpstream("b", pb.addr)
	g, clock, logs := newTestGroup(a, b)

	pa.broken.Store(true)
	pb.broken.Store(true)
	lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
	last := lease.Upstream
	var ge *groupError
	if !errors.As(err, &ge) || len(ge.errs) != 2 || !strings.Contains(err.Error(), "upstream a: ") || !strings.Contains(err.Error(), "upstream b: ") {
		t.Fatalf("all failing: %v; want one error wrapping both attempts", err)
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) || last == nil {
		t.Fatalf("error %v does not wrap the causes, or no upstream named (%v)", err, last)
	}
	t.Log(err)

	// b failed longer ago than a: it is tried first, and a not at all.
	clock.Advance(100 * time.Millisecond)
	g.markDown(a, errors.New("again"))
	pa.broken.Store(false)
	pb.broken.Store(false)
	triesA := pa.accepted.Load()
	lease, err = g.Dial(context.Background(), echo, netip.AddrPort{}, "")
	c, u := lease.Conn, lease.Upstream
	if err != nil || u != b {
		t.Fatalf("all benched: dial = %v, %v; want b (oldest failure)", u, err)
	}
	c.Close()
	lease.Release()
	if pa.accepted.Load() != triesA {
		t.Fatal("a was tried before b")
	}
	if !b.Up() || a.Up() {
		t.Fatalf("up: a %v, b %v; want false true", a.Up(), b.Up())
	}
	if up := logs.lines("upstream up"); len(up) != 1 || !strings.Contains(up[0], "upstream=b") {
		t.Fatalf("up lines: %v", up)
	}
}

// TestGroupCancelledDialKeepsUpstreamUp: a client that goes away (or a
// shutdown) says nothing about the upstream.
func TestGroupCancelledDialKeepsUpstreamUp(t *testing.T) {
	testkit.CheckGoroutines(t)
	slow := silentProxy(t)
	other := silentProxy(t)
	a, b := socksUpstream("slow", slow.addr), socksUpstream("other", other.addr)
	g, _, logs := newTestGroup(a, b)

	for _, how := range []string{"cancel", "deadline"} {
		var ctx context.Context
		var cancel context.CancelFunc
		if how == "cancel" {
			ctx, cancel = context.WithCancel(context.Background())
			time.AfterFunc(100*time.Millisecond, cancel)
		} else {
			ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
		}
		start := time.Now()
		_, err := g.Dial(ctx, "example.com:443", netip.AddrPort{}, "")
		cancel()
		if err == nil || time.Since(start) > 2*time.Second {
			t.Fatalf("%s: dial = %v after %v", how, err, time.Since(start))
		}
		if how == "cancel" && !errors.Is(err, context.Canceled) {
			t.Fatalf("cancel: error %v does not say so", err)
		}
		if !a.Up() || !b.Up() {
			t.Fatalf("%s: an upstream went down: %v %v", how, a.Up(), b.Up())
		}
	}
	// The proxies count a connection when their accept returns, which a
	// loaded machine may run after the dial gave up.
	for deadline := time.Now().Add(5 * time.Second); (slow.accepted.Load() < 1 || other.accepted.Load() < 1) && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if slow.accepted.Load() != 1 || other.accepted.Load() != 1 {
		t.Fatalf("accepted %d and %d; each dial must stop at its first upstream", slow.accepted.Load(), other.accepted.Load())
	}
	if s := logs.String(); s != "" {
		t.Fatalf("logged:\n%s", s)
	}
}

// TestGroupTargetFailureEndsSearch: a proxy that says the destination
// refused works; the destination does not, and another upstream would
// hear the same.
func TestGroupTargetFailureEndsSearch(t *testing.T) {
	testkit.CheckGoroutines(t)
	refusing := (&socksServer{rep: 0x05}).start(t)
	other := (&socksServer{}).start(t)
	a, b := socksUpstream("a", refusing.addr), socksUpstream("b", other.addr)
	g, _, logs := newTestGroup(a, b)
	lease, err := g.Dial(context.Background(), "example.com:443", netip.AddrPort{}, "")
	u := lease.Upstream
	if err == nil || !strings.Contains(err.Error(), "connection refused") || u != a {
		t.Fatalf("dial = %v, %v; want a's connection refused", u, err)
	}
	if !a.Up() || other.accepted.Load() != 0 || logs.String() != "" {
		t.Fatalf("a up %v, b tried %d times, logs %q; want a up, b untouched, nothing logged", a.Up(), other.accepted.Load(), logs)
	}

	// Direct errors are the destination's too.
	d := &Upstream{Name: "direct", Dialer: &Direct{}}
	g, _, _ = newTestGroup(d)
	if _, err := g.Dial(context.Background(), deadPort(t), netip.AddrPort{}, ""); !errors.Is(err, syscall.ECONNREFUSED) || !d.Up() {
		t.Fatalf("direct to a dead port: %v, up %v", err, d.Up())
	}
}

func TestGroupProbeBringsUpstreamBack(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	flaky := startSwitchableSOCKS(t)
	good := (&socksServer{}).start(t)
	a := socksUpstream("flaky", flaky.addr)
	dead := socksUpstream("dead", deadPort(t))
	b := socksUpstream("good", good.addr)
	g, _, logs := newTestGroup(a, dead, b)
	g.Probe = ProbeConfig{Interval: 20 * time.Millisecond, Timeout: time.Second}

	flaky.broken.Store(true)
	lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
	c := lease.Conn
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if a.Up() || dead.Up() {
		t.Fatal("failed upstreams still up")
	}
	flaky.broken.Store(false) // a probe only connects, so this is moot; a real proxy would be back

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	g.StartProbe(ctx)
	deadline := time.Now().Add(5 * time.Second)
	for !a.Up() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !a.Up() {
		t.Fatal("probe did not bring flaky back")
	}
	time.Sleep(60 * time.Millisecond) // a few more rounds
	if dead.Up() {
		t.Fatal("probe brought back an upstream that refuses connections")
	}
	up := logs.lines("upstream up")
	if len(up) != 1 || !strings.Contains(up[0], "upstream=flaky by=probe") {
		t.Fatalf("up lines:\n%s", strings.Join(up, "\n"))
	}
	cancel()
	// Zero Interval: no probe goroutine at all.
	(&Group{}).StartProbe(context.Background())
}

func TestGroupNoUpstreams(t *testing.T) {
	_, err := (&Group{Name: "empty"}).Dial(context.Background(), "example.com:443", netip.AddrPort{}, "")
	if err == nil || !strings.Contains(err.Error(), `group "empty": no upstreams`) {
		t.Fatalf("empty group: %v", err)
	}
}

// TestGroupZeroValueDefaults: nil Strategy is round-robin, nil Now is the
// real clock, nil Log is slog.Default.
func TestGroupZeroValueDefaults(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	p1, p2 := (&socksServer{}).start(t), (&socksServer{}).start(t)
	g := &Group{Upstreams: []*Upstream{socksUpstream("1", p1.addr), socksUpstream("2", p2.addr)}}
	for range 4 {
		lease, err := g.Dial(context.Background(), echo, netip.AddrPort{}, "")
		c := lease.Conn
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		lease.Release()
	}
	if p1.accepted.Load() != 2 || p2.accepted.Load() != 2 {
		t.Fatalf("nil strategy spread %d/%d, want round-robin 2/2", p1.accepted.Load(), p2.accepted.Load())
	}
}
