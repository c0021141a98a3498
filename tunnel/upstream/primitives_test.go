package upstream

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// The primitives a caller that connects sockets itself uses (Pick, Report,
// Lease) make Dial's choices: the strategy's order, the next upstream
// after a failure or a refusal, none after a target failure, and the
// benched ones last, oldest failure first.
func TestGroupPickReportFailover(t *testing.T) {
	a, b, c := socksUpstream("a", "198.18.0.1:1080"), socksUpstream("b", "198.18.0.2:1080"), socksUpstream("c", "198.18.0.3:1080")
	g, _, logs := newTestGroup(a, b, c)
	broken := proxyError("socks connect", "198.18.0.1:1080", "", errors.New("reading method selection: unexpected EOF"))

	var tried []*Upstream
	u := g.Pick("k", tried)
	if u != a {
		t.Fatalf("first pick %v, want a", u)
	}
	tried = append(tried, u)
	if !g.Report(a, broken) || a.Up() {
		t.Fatalf("a broken greeting: next false or a still up (%v)", a.Up())
	}
	if u = g.Pick("k", tried); u != b {
		t.Fatalf("after a failed: %v, want b", u)
	}
	tried = append(tried, u)
	if !g.Report(b, socksReplyError(0x02)) || !b.Up() {
		t.Fatalf("b refused the request: next false or b benched (%v)", b.Up())
	}
	if u = g.Pick("k", tried); u != c {
		t.Fatalf("after b refused: %v, want c", u)
	}
	tried = append(tried, u)
	if g.Report(c, socksReplyError(0x05)) || !c.Up() {
		t.Fatalf("c's target refused: next true or c benched (%v)", c.Up())
	}
	if u = g.Pick("k", tried); u != nil {
		t.Fatalf("all tried: %v, want none", u)
	}
	// The error is Dial's: the one that ended the search, or all of them.
	errs := []error{broken, socksReplyError(0x02), socksReplyError(0x05)}
	if err := g.Failure(tried, errs, true); err.Error() != `group "pool": upstream c: proxy replied connection refused (0x05)` || !isTargetFailure(err) {
		t.Errorf("stopped at c: %v", err)
	}
	err := g.Failure(tried[:2], errs[:2], false)
	if want := `group "pool": all 2 upstreams failed: upstream a: socks connect tcp 198.18.0.1:1080->: reading method selection: unexpected EOF; upstream b: proxy replied connection not allowed by ruleset (0x02)`; err.Error() != want || !isRequestRefused(err) {
		t.Errorf("all failed: %v\nwant %s", err, want)
	}
	if down := logs.lines("upstream down"); len(down) != 1 || !strings.Contains(down[0], "upstream=a") {
		t.Fatalf("down lines: %q", down)
	}

	// A benched upstream is picked only when nothing else is left.
	for range 4 {
		if u := g.Pick("k", nil); u == a {
			t.Fatal("benched a picked while b and c are up")
		}
	}
	if u := g.Pick("k", []*Upstream{b, c}); u != a {
		t.Fatalf("b and c tried: %v, want the benched a as the last resort", u)
	}
	// Its success brings it back.
	if g.Report(a, nil) || !a.Up() || len(logs.lines("upstream up")) != 1 {
		t.Fatalf("a worked: up %v; log %s", a.Up(), logs)
	}
}

// Pick with nothing tried ends back-offs that ran out; the oldest failure
// comes first among benched upstreams.
func TestGroupPickBenched(t *testing.T) {
	a, b := socksUpstream("a", "198.18.0.1:1080"), socksUpstream("b", "198.18.0.2:1080")
	g, clock, _ := newTestGroup(a, b)
	fail := errors.New("connection refused")
	g.Report(b, fail)
	clock.Advance(100 * time.Millisecond)
	g.Report(a, fail)
	if u := g.Pick("k", nil); u != b {
		t.Fatalf("both benched: %v, want b (the older failure)", u)
	}
	if u := g.Pick("k", []*Upstream{b}); u != a {
		t.Fatalf("b tried: %v, want a", u)
	}
	if a.Up() || b.Up() {
		t.Fatal("a pick ended a back-off before it ran out")
	}
	clock.Advance(950 * time.Millisecond) // b's back-off of 1s ran out, a's not yet
	if u := g.Pick("k", []*Upstream{a}); u != b || b.Up() {
		t.Fatalf("with something tried, Pick must not end back-offs: %v, b up %v", u, b.Up())
	}
	if u := g.Pick("k", nil); u != b || !b.Up() || a.Up() {
		t.Fatalf("b's back-off over: pick %v, up a %v b %v", u, a.Up(), b.Up())
	}
}

// Leases count in Active, least-conn picks by them, and Release ends that
// once.
func TestGroupLeaseCounts(t *testing.T) {
	a, b := socksUpstream("a", "198.18.0.1:1080"), socksUpstream("b", "198.18.0.2:1080")
	g, _, _ := newTestGroup(a, b)
	g.Strategy = &LeastConn{}
	l1 := g.Lease(g.Pick("k", nil), nil)
	l2 := g.Lease(g.Pick("k", nil), nil)
	if l1.Upstream == l2.Upstream || a.Active() != 1 || b.Active() != 1 {
		t.Fatalf("two leases on %v and %v; active a %d b %d", l1.Upstream, l2.Upstream, a.Active(), b.Active())
	}
	l3 := g.Lease(a, nil)
	if u := g.Pick("k", nil); u != b {
		t.Fatalf("a holds 2, b 1: least-conn picked %v", u)
	}
	for _, l := range []Lease{l1, l2, l3} {
		l.Release()
	}
	if a.Active() != 0 || b.Active() != 0 {
		t.Fatalf("after release: active a %d b %d", a.Active(), b.Active())
	}
	// A failed dial's lease names the upstream and holds nothing.
	before := a.Active()
	g.Upstreams = []*Upstream{socksUpstream("dead", deadPort(t))}
	lease, err := g.Dial(context.Background(), "198.18.0.9:443", netip.AddrPort{}, "")
	if err == nil || lease.Upstream == nil || lease.Upstream.Active() != 0 {
		t.Fatalf("dial through a dead proxy: %v, %v", lease.Upstream, err)
	}
	lease.Release()
	if lease.Upstream.Active() != 0 || a.Active() != before {
		t.Fatal("releasing a failed dial's lease changed a count")
	}
}

func TestProxyAddr(t *testing.T) {
	for _, tc := range []struct {
		d    Dialer
		want string // "" = not usable
	}{
		{&SOCKS5{Proxy: "198.18.0.2:1080"}, "198.18.0.2:1080"},
		{&HTTPConnect{Proxy: "[fd00::2]:3128"}, "[fd00::2]:3128"},
		{&SOCKS5{Proxy: "[::ffff:198.18.0.2]:1080"}, "198.18.0.2:1080"},
		{&SOCKS5{Proxy: "proxy.test:1080"}, ""},
		{&HTTPConnect{Proxy: "198.18.0.2:0"}, ""},
		{&SOCKS5{}, ""},
		{&Direct{}, ""},
	} {
		u := &Upstream{Name: "u", Dialer: tc.d}
		ap, ok := u.ProxyAddr()
		if got := ap.String(); ok != (tc.want != "") || ok && got != tc.want {
			t.Errorf("%#v: %v, %v; want %q", tc.d, ap, ok, tc.want)
		}
	}
}
