package tunnel

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// socksEvent is what the staged SOCKS5 server saw on one connection.
type socksEvent struct {
	kind   string // "greeted", "request" or "closed" (EOF or reset before a request)
	target string // for "request"
}

// socksStaged is a SOCKS5 server (no authentication) that reports each
// stage of each connection: the greeting answered, then the CONNECT
// request (answered with success, then it echoes), or the connection
// closed without one. With dropIdle > 0 it closes a connection whose
// request has not come that long after the greeting, as a proxy with a
// short idle timeout would.
func socksStaged(t *testing.T, dropIdle time.Duration) (addr string, events <-chan socksEvent) {
	t.Helper()
	ch := make(chan socksEvent, 64)
	ap, _ := testkit.Server(t, func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		hello := make([]byte, 3)
		if _, err := io.ReadFull(c, hello); err != nil {
			ch <- socksEvent{kind: "closed"}
			return
		}
		c.Write([]byte{5, 0})
		ch <- socksEvent{kind: "greeted"}
		if dropIdle > 0 {
			c.SetReadDeadline(time.Now().Add(dropIdle))
		}
		head := make([]byte, 1)
		if _, err := io.ReadFull(c, head); err != nil {
			ch <- socksEvent{kind: "closed"}
			return
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		target, err := socksRequestRest(c, head[0])
		if err != nil {
			ch <- socksEvent{kind: "closed"}
			return
		}
		c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0})
		ch <- socksEvent{kind: "request", target: target}
		c.SetReadDeadline(time.Time{})
		io.Copy(c, c)
	})
	return ap.String(), ch
}

// socksRequestRest reads a CONNECT request whose first byte was ver.
func socksRequestRest(c *net.TCPConn, ver byte) (string, error) {
	read := func(n int) ([]byte, error) {
		b := make([]byte, n)
		_, err := io.ReadFull(c, b)
		return b, err
	}
	req, err := read(3)
	if err != nil || ver != 5 {
		return "", io.ErrUnexpectedEOF
	}
	return testkit.ReadSOCKSAddr(c, req[2])
}

// wantEvent fails unless the staged server's next event, within 5 s, is of
// kind for target ("" but for a request); want says what was expected.
func wantEvent(t *testing.T, events <-chan socksEvent, kind, target, want string) {
	t.Helper()
	if ev := nextEvent(t, events, 5*time.Second); ev.kind != kind || ev.target != target {
		t.Fatalf("upstream saw %+v, want %s", ev, want)
	}
}

// nextEvent waits for the staged server's next event.
func nextEvent(t *testing.T, events <-chan socksEvent, within time.Duration) socksEvent {
	t.Helper()
	select {
	case ev := <-events:
		return ev
	case <-time.After(within):
		t.Fatalf("the upstream saw nothing within %v", within)
		return socksEvent{}
	}
}

// noEvent checks that the staged server saw nothing for a while.
func noEvent(t *testing.T, events <-chan socksEvent, during time.Duration) {
	t.Helper()
	select {
	case ev := <-events:
		t.Fatalf("the upstream saw %+v, want nothing yet", ev)
	case <-time.After(during):
	}
}

// preconnObserver counts pre-connections by outcome, besides the
// countingObserver's counts.
type preconnObserver struct {
	*countingObserver
	tun          *Tunnel
	mu           sync.Mutex
	used, unused int
}

func (o *preconnObserver) Preconnected(used bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if used {
		o.used++
	} else {
		o.unused++
	}
}

func (o *preconnObserver) counts() (used, unused int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.used, o.unused
}

// waitCounts waits until the observer's counts are used and unused.
func (o *preconnObserver) waitCounts(t *testing.T, used, unused int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		u, n := o.counts()
		if u == used && n == unused {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pre-connections used %d, unused %d; want %d, %d", u, n, used, unused)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// preconnTunnel serves connections to dst through group (the default
// route, the sniffed name sent) with the given sniff timeout.
func preconnTunnel(t *testing.T, group *upstream.Group, sniffTimeout time.Duration) (*fakeListener, *preconnObserver, *testkit.LogBuffer) {
	t.Helper()
	ln := newFakeListener(t, netip.MustParseAddrPort("198.18.2.2:80"), nil)
	obs := &preconnObserver{countingObserver: newCountingObserver()}
	tun := &Tunnel{Sniff: SniffOptions{Timeout: sniffTimeout}, Observer: obs}
	obs.tun = tun
	tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: Override}})
	return ln, obs, startTunnel(t, ln, tun)
}

func socksUpstream(name, addr string) *upstream.Upstream {
	return &upstream.Upstream{Name: name, Dialer: &upstream.SOCKS5{Proxy: addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}}
}

// While the client's first bytes are awaited, the upstream is connected
// and greeted; the request that follows still names the sniffed host, and
// the connection carries bytes both ways.
func TestPreconnectSendsTheName(t *testing.T) {
	testkit.CheckGoroutines(t)
	addr, events := socksStaged(t, 0)
	u := socksUpstream("socks", addr)
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}}
	ln, obs, logs := preconnTunnel(t, group, 10*time.Second)

	c := dialTunnel(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting before the client spoke")
	noEvent(t, events, 100*time.Millisecond) // no request without the name
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c, earlyRequest)
	c.Close()
	logs.WaitFor(t, "msg=conn")
	for _, want := range []string{"host=early.test", "upstream=socks", "target=early.test:80", `error=""`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("access line lacks %q: %s", want, logs.String())
		}
	}
	obs.waitCounts(t, 1, 0)
	waitActive(t, u, 0)
}

// A group whose pick may depend on the name (consistent hashing on the
// host) connects only after the sniff, as before.
func TestPreconnectNotWhenThePickReadsTheName(t *testing.T) {
	testkit.CheckGoroutines(t)
	addr, events := socksStaged(t, 0)
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{socksUpstream("socks", addr)},
		Strategy: &upstream.ConsistentHash{}, Key: upstream.HashHost}
	ln, obs, logs := preconnTunnel(t, group, 10*time.Second)

	c := dialTunnel(t, ln)
	noEvent(t, events, 200*time.Millisecond)
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "greeted", "", "the greeting")
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c, earlyRequest)
	c.Close()
	logs.WaitFor(t, "msg=conn")
	obs.waitCounts(t, 0, 0)
}

// A pre-connection that fails (the first upstream is not there) falls over
// to the next upstream during the sniff; the name still goes there.
func TestPreconnectFailsOver(t *testing.T) {
	testkit.CheckGoroutines(t)
	addr, events := socksStaged(t, 0)
	dead := socksUpstream("dead", testkit.DeadPort(t).String())
	live := socksUpstream("live", addr)
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{dead, live}, Log: slog.New(slog.DiscardHandler)}
	ln, obs, logs := preconnTunnel(t, group, 10*time.Second)

	c := dialTunnel(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting before the client spoke")
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c, earlyRequest)
	c.Close()
	logs.WaitFor(t, "msg=conn")
	if !strings.Contains(logs.String(), "upstream=live") || !strings.Contains(logs.String(), `error=""`) {
		t.Errorf("access line: %s", logs.String())
	}
	if dead.Up() {
		t.Error("the unreachable upstream is still up")
	}
	obs.waitCounts(t, 1, 0)
}

// A pre-connection whose client resets before a byte, or that shutdown
// cuts, is closed before any request, counted as unused, and no longer
// counted against its upstream, which stays up. (A client that closes
// without a byte is carried by IP like any other: its FIN is passed on.)
func TestPreconnectUnusedIsClosed(t *testing.T) {
	for _, how := range []string{"client reset", "shutdown"} {
		t.Run(how, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			addr, events := socksStaged(t, 0)
			u := socksUpstream("socks", addr)
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}}
			ln, obs, logs := preconnTunnel(t, group, 10*time.Second)

			c := dialTunnel(t, ln)
			wantEvent(t, events, "greeted", "", "the greeting")
			waitActive(t, u, 1) // the pre-connection is ready
			if how == "client reset" {
				c.SetLinger(0)
				c.Close()
			} else {
				ctx, cancel := context.WithCancel(context.Background())
				cancel() // no grace: cut at once
				obs.tun.Shutdown(ctx)
			}
			wantEvent(t, events, "closed", "", "its connection closed without a request")
			logs.WaitFor(t, "msg=conn")
			obs.waitCounts(t, 0, 1)
			waitActive(t, u, 0)
			if !u.Up() {
				t.Error("the upstream went down for a connection it never carried")
			}
		})
	}
}

// The rule of issue 12: a pre-connection teaches nothing. A client that
// keeps its pre-connection waiting until the upstream drops it still gets
// its connection (dialled afresh, with its name), and the upstream is not
// benched for the client's slowness: the next client is carried by it
// too. A client that never speaks (the sniff times out) is carried by IP.
func TestPreconnectTeachesNothing(t *testing.T) {
	testkit.CheckGoroutines(t)
	addr, events := socksStaged(t, 100*time.Millisecond)
	u := socksUpstream("socks", addr)
	groupLog := &testkit.LogBuffer{}
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}, Log: slog.New(slog.NewTextHandler(groupLog, nil))}
	ln, obs, logs := preconnTunnel(t, group, 2*time.Second)

	c := dialTunnel(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting")
	wantEvent(t, events, "closed", "", "the idle pre-connection dropped")
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "greeted", "", "a fresh connection's greeting")
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c, earlyRequest)
	c.Close()
	logs.WaitFor(t, "msg=conn")
	if !u.Up() {
		t.Fatal("the upstream was benched because a client kept its pre-connection waiting")
	}
	obs.waitCounts(t, 0, 1) // replaced by the fresh dial

	// The next client, quick this time, uses its pre-connection.
	c2 := dialTunnel(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting")
	c2.Write([]byte(earlyRequest))
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c2, earlyRequest)
	c2.Close()
	obs.waitCounts(t, 1, 1)
	if n := len(groupLog.Lines("upstream down")); n != 0 {
		t.Errorf("%d upstream-down lines: %s", n, groupLog.String())
	}
	waitActive(t, u, 0)
}

// waitActive waits until u counts n connections.
func waitActive(t *testing.T, u *upstream.Upstream, n int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for u.Active() != n {
		if time.Now().After(deadline) {
			t.Fatalf("upstream %s counts %d active connections, want %d", u.Name, u.Active(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
