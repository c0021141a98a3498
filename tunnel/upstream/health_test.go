package upstream

import (
	"fmt"
	"net/netip"

	"github.com/detour-proxy/detour/internal/testkit"

	"context"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// One client asking, again and again, for destinations the upstream cannot
// or will not reach must not bench that upstream for everyone else: the
// target is the client's choice. Refusals of the request try the next
// upstream; target failures end the search; neither benches.
func TestGroupClientChosenFailuresBenchNobody(t *testing.T) {
	httpRefusing := func(status string) func(t *testing.T) *Upstream {
		return func(t *testing.T) *Upstream {
			p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
				replyWith("HTTP/1.1 " + status + "\r\nContent-Length: 0\r\n\r\n")(c)
			})
			return &Upstream{Name: "http " + status, Dialer: &HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}}
		}
	}
	socksRefusing := func(rep byte) func(t *testing.T) *Upstream {
		return func(t *testing.T) *Upstream {
			return socksUpstream("socks", (&socksServer{rep: rep}).start(t).addr)
		}
	}
	for _, tc := range []struct {
		name     string
		upstream func(t *testing.T) *Upstream
		failover bool // the next upstream is tried (else: a target failure)
	}{
		{"socks general failure", socksRefusing(0x01), true},
		{"socks not allowed by ruleset", socksRefusing(0x02), true},
		{"socks address type not supported", socksRefusing(0x08), true},
		{"socks host unreachable", socksRefusing(0x04), false},
		{"socks connection refused", socksRefusing(0x05), false},
		{"http 403", httpRefusing("403 Forbidden"), true},
		{"http 400", httpRefusing("400 Bad Request"), true},
		{"http 502", httpRefusing("502 Bad Gateway"), false},
		{"http 503", httpRefusing("503 Service Unavailable"), false},
		{"http 504", httpRefusing("504 Gateway Timeout"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			a := tc.upstream(t)
			b := socksUpstream("b", (&socksServer{}).start(t).addr)
			g, _, logs := newTestGroup(a, b)
			for i := range 20 {
				// Round-robin starts at a on every other dial.
				lease, err := g.Dial(context.Background(), "bad.test:443", netip.AddrPort{}, "")
				c, u := lease.Conn, lease.Upstream
				if c != nil {
					c.Close()
					lease.Release()
				}
				switch {
				case u == a && tc.failover:
					t.Fatalf("dial %d: carried by the refusing upstream", i)
				case u == a && !tc.failover && err == nil:
					t.Fatalf("dial %d: the failing upstream carried it", i)
				case u == b && err != nil:
					t.Fatalf("dial %d through b: %v", i, err)
				}
			}
			if !a.Up() || !b.Up() || strings.Contains(logs.String(), "upstream down") {
				t.Fatalf("a up %v, b up %v; log: %s", a.Up(), b.Up(), logs)
			}
		})
	}
}

// Failures no target could cause still bench: the proxy refusing our
// credentials.
func TestGroupProxyAuthFailureBenches(t *testing.T) {
	testkit.CheckGoroutines(t)
	p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
		replyWith("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")(c)
	})
	a := &Upstream{Name: "auth", Dialer: &HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}}
	b := socksUpstream("b", (&socksServer{}).start(t).addr)
	g, _, logs := newTestGroup(a, b)
	lease, err := g.Dial(context.Background(), "site.test:443", netip.AddrPort{}, "")
	if err != nil || lease.Upstream != b {
		t.Fatalf("dial = %v, %v; want failover to b", lease.Upstream, err)
	}
	lease.Conn.Close()
	lease.Release()
	if a.Up() || !strings.Contains(logs.String(), "upstream down") {
		t.Fatalf("a up %v after a 407; log: %s", a.Up(), logs)
	}
}

// One client's many connections on its upstream of a consistent-hash group
// (bounded load) cost the others only what bounded load is for: every key
// still gets an upstream, keys at home elsewhere stay there, and only keys
// sharing the busy upstream move, each to one other upstream.
func TestConsistentHashOneHotClient(t *testing.T) {
	ups := testUpstreams(3)
	c := &ConsistentHash{}
	hosts := make([]string, 1000)
	for i := range hosts {
		hosts[i] = fmt.Sprintf("site%d.test", i)
	}
	before := hostMap(c, ups, hosts)
	hot := c.Pick("hog.test", ups, nil)
	hot.active.Add(1000) // one client's connections to one host
	defer hot.active.Add(-1000)
	after := hostMap(c, ups, hosts)
	moved := 0
	for i, u := range after {
		switch {
		case u == nil:
			t.Fatalf("%s got no upstream beside the hot client", hosts[i])
		case before[i] != hot && u != before[i]:
			t.Fatalf("%s moved from %s though only %s is busy", hosts[i], before[i].Name, hot.Name)
		case before[i] == hot:
			moved++
		}
	}
	t.Logf("%d of %d keys shared the hot upstream and moved", moved, len(hosts))
}

// blackholed is a loopback address whose connects hang: a listener that
// never accepts, with its backlog (0: one pending connection) filled, so
// the kernel drops further SYNs, as a proxy host that is down does.
func blackholed(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	filler, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
		c.Close()
		t.Skip("this kernel completes connects beyond a full backlog; cannot make a blackholed address")
	}
	return addr
}

// A proxy whose host does not answer at all is its own failure: after half
// the dial's budget it is benched and the next upstream carries the
// connection, within the budget. (A wait for the CONNECT reply, which the
// target may cause, still benches nobody: TestGroupCancelledDialKeepsUpstreamUp.)
func TestGroupBlackholedUpstreamFailsOver(t *testing.T) {
	testkit.CheckGoroutines(t)
	for _, kind := range []string{"socks5", "http"} {
		t.Run(kind, func(t *testing.T) {
			dead := blackholed(t)
			var a *Upstream
			if kind == "socks5" {
				a = socksUpstream("dead", dead)
			} else {
				a = &Upstream{Name: "dead", Dialer: &HTTPConnect{Proxy: dead, Forward: &net.Dialer{Timeout: 5 * time.Second}}}
			}
			b := socksUpstream("b", (&socksServer{}).start(t).addr)
			g, _, logs := newTestGroup(a, b)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			lease, err := g.Dial(ctx, "site.test:443", netip.AddrPort{}, "")
			if err != nil || lease.Upstream != b {
				t.Fatalf("dial = %v, %v; want the second upstream after the dead one", lease.Upstream, err)
			}
			lease.Conn.Close()
			lease.Release()
			if a.Up() || !strings.Contains(logs.String(), "upstream down") || !strings.Contains(logs.String(), "no answer within") {
				t.Fatalf("dead upstream up %v; log: %s", a.Up(), logs)
			}
		})
	}
}
