package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// The transparent data path on the event loops (event_linux.go,
// evconn_linux.go, evupstream_linux.go), driven through Serve with a
// listener that hands out bare descriptors (fakeListener), as
// *redirect.Listener does: every test checks that the loops served it, and
// that goroutines and descriptors are back where they were once the tunnel
// is shut down. (The package's other tests run on the loops too, and on
// goroutines with DETOUR_TEST_GOROUTINES=1.)

// evTunnel serves connections to dst with tun on the event loops. Its
// cleanup shuts the tunnel down, then checks that the goroutines and
// descriptors the test started with are all that is left.
func evTunnel(t *testing.T, dst netip.AddrPort, tun *Tunnel) (*fakeListener, *testkit.LogBuffer) {
	t.Helper()
	return evTunnelErr(t, dst, nil, tun)
}

// evTunnelErr is evTunnel with a listener whose OriginalDstFD fails with
// err, if not nil.
func evTunnelErr(t *testing.T, dst netip.AddrPort, err error, tun *Tunnel) (*fakeListener, *testkit.LogBuffer) {
	t.Helper()
	checkFDs(t)
	testkit.CheckGoroutines(t)
	ln := newFakeListener(t, dst, err)
	logs := serveTunnel(t, ln, tun) // on the loops, whatever DETOUR_TEST_GOROUTINES says
	deadline := time.Now().Add(5 * time.Second)
	for {
		tun.mu.Lock()
		el := tun.evListeners[ln]
		tun.mu.Unlock()
		if el != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the listener is not served on the event loops:\n%s", logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return ln, logs
}

// checkFDs fails the test if it ends with more open descriptors than it
// started with (after a grace of 2 s for closes under way, and for pools'
// pipes closed by cleanups after a garbage collection). Call it
// before anything that opens some, so its check runs last.
func checkFDs(t *testing.T) {
	t.Helper()
	// The runtime's poller opens its descriptors once, on first use.
	if l, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		l.Close()
	}
	before := countFDs(t)
	t.Cleanup(func() {
		deadline := time.Now().Add(2 * time.Second)
		n := countFDs(t)
		for n > before && time.Now().Before(deadline) {
			// Pipes that pools let go (the test servers' io.Copy splices
			// through the runtime's) are closed by cleanups after a GC.
			runtime.GC()
			time.Sleep(10 * time.Millisecond)
			n = countFDs(t)
		}
		if n > before {
			t.Errorf("%d descriptors open after the test, %d before: %v", n, before, fdNames(t))
		}
	})
}

// fdNames is what each open descriptor is.
func fdNames(t *testing.T) []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+"="+l)
	}
	return out
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func dialEv(t *testing.T, ln *fakeListener) *net.TCPConn {
	t.Helper()
	return dialTunnel(t, ln)
}

// dialEvFrom connects from the loopback address ip.
func dialEvFrom(t *testing.T, ln *fakeListener, ip string) (*net.TCPConn, error) {
	t.Helper()
	c, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip)}, ln.Addr().(*net.TCPAddr))
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// tlsHello is the ClientHello crypto/tls sends for name.
func tlsHello(t *testing.T, name string) []byte {
	t.Helper()
	conn := &recordingConn{}
	tls.Client(conn, &tls.Config{ServerName: name, NextProtos: []string{"h2", "http/1.1"}}).Handshake()
	if len(conn.written) == 0 {
		t.Fatal("crypto/tls wrote no ClientHello")
	}
	return conn.written
}

// wantReset reads c until it ends, within 5 s, and fails unless a reset
// ended it.
func wantReset(t *testing.T, c *net.TCPConn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: read = %v, want a reset", what, err)
	}
}

// Bytes cross both ways, the sniffed ones first and a bulk stream after
// them, each side's EOF reaches the other, and the access line says who,
// where, what was sniffed, the route and the bytes each way.
func TestEvDirectCarriesAndLogs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		first []byte
		want  []string
	}{
		{"tls", tlsHello(t, "tls.test"), []string{"host=tls.test", "proto=tls", "alpn=h2,http/1.1"}},
		{"http", []byte(earlyRequest), []string{"host=early.test", "proto=http"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst, accepted := testkit.EchoServer(t)
			ln, logs := evTunnel(t, dst, &Tunnel{Mode: "redirect", Sniff: SniffOptions{Timeout: 10 * time.Second}})

			c := dialEv(t, ln)
			bulk := testkit.RandomBytes(4<<20, 16)
			sent := append(append([]byte(nil), tc.first...), bulk...)
			got := make(chan []byte, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				b, _ := io.ReadAll(c)
				got <- b
			}()
			if _, err := c.Write(sent); err != nil {
				t.Fatal(err)
			}
			c.CloseWrite()
			if b := <-got; !bytes.Equal(b, sent) {
				t.Fatalf("echo: %d bytes back of %d sent, equal %v", len(b), len(sent), bytes.Equal(b, sent[:min(len(b), len(sent))]))
			}
			line := waitLines(t, logs, 1)
			n := len(sent)
			wantIn(t, line, append(tc.want, "client="+c.LocalAddr().String(), "dst="+dst.String(), "mode=redirect",
				"sniff=found", "route=direct", fmt.Sprintf("up=%d", n), fmt.Sprintf("down=%d", n), `error=""`)...)
			if a := accepted.Load(); a != 1 {
				t.Errorf("the destination accepted %d connections, want 1", a)
			}
		})
	}
}

// A client that says nothing until its server greets: the sniff times
// out, the connection dialled early carries the greeting and what follows,
// and the silent cache learns the destination: its next connection is not
// sniffed.
func TestEvSniffTimeoutServerFirst(t *testing.T) {
	const banner = "220 greeter ready\r\n"
	dst := greeter(t, banner)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 100 * time.Millisecond}}
	ln, logs := evTunnel(t, dst, tun)

	start := time.Now() // before the accept: the sniff's timeout runs from it
	c := dialEv(t, ln)
	readBanner(t, c, banner)
	if took := time.Since(start); took < 100*time.Millisecond {
		t.Errorf("the banner came after %v, before the sniff timed out", took)
	}
	c.Write([]byte("EHLO x\r\n"))
	readEcho(t, c, "EHLO x\r\n")
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "sniff=timeout", "route=direct", "up=8", fmt.Sprintf("down=%d", len(banner)+8), `error=""`)
	if !tun.silent.Silent(dst) {
		t.Fatal("a destination that greeted first was not learned")
	}

	c = dialEv(t, ln)
	readBanner(t, c, banner)
	c.Close()
	wantIn(t, waitLines(t, logs, 2), "sniff=skipped", "sniff_time=0s", "route=direct", `error=""`)
}

// A client that resets while it is sniffed: the connection dialled early
// is reset too, and the access line says the client reset.
func TestEvClientResetDuringSniff(t *testing.T) {
	dst, conns := acceptingServer(t)
	ln, logs := evTunnel(t, dst, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})

	c := dialEv(t, ln)
	server := accepted(t, conns, 5*time.Second) // dialled early
	c.Write([]byte("GET / HTTP/1.1\r\nHo"))     // not enough to judge
	time.Sleep(50 * time.Millisecond)
	c.SetLinger(0)
	c.Close()
	wantReset(t, server, "the destination of a client that reset")
	wantIn(t, waitLines(t, logs, 1), "sniff=closed", "route=direct", "up=0", "down=0", `error="client: `, "reset by peer")
}

// A destination that refuses: the client is reset, and the access line
// names the dial and the address, with the host when the client said it
// (the dial failed early, while the client was sniffed) and without it
// when nothing was sniffed.
func TestEvDestinationRefuses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sniff SniffOptions
		write string
		want  []string
	}{
		{"dialled early", SniffOptions{Timeout: 10 * time.Second}, earlyRequest, []string{"sniff=found", "host=early.test"}},
		{"sniff off", SniffOptions{Disabled: true}, "", []string{"sniff=off", `host=""`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dead := testkit.DeadPort(t)
			ln, logs := evTunnel(t, dead, &Tunnel{Sniff: tc.sniff})

			c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
			if err == nil {
				defer c.Close()
				if tc.write != "" { // (a write of nothing would take the reset)
					time.Sleep(50 * time.Millisecond) // the dial fails before the bytes come
					c.Write([]byte(tc.write))
				}
				wantReset(t, c, "the client of a refused destination")
			} else if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatal(err)
			}
			wantIn(t, waitLines(t, logs, 1), append(tc.want, "route=direct", "up=0",
				`error="dial tcp `+dead.String()+`: connect: connection refused"`)...)
		})
	}
}

// A route that rejects the sniffed name: the client is reset, the
// destination never dialled, and the access line says so.
func TestEvRejectRoute(t *testing.T) {
	dst, conns := acceptingServer(t)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
	tun.SetRouter(&Router{Rules: []Rule{{Domains: []string{"blocked.test"}, Action: Action{Kind: ActionReject}}},
		Default: Action{Kind: ActionDirect}})
	ln, logs := evTunnel(t, dst, tun)

	c := dialEv(t, ln)
	c.Write([]byte("GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"))
	wantReset(t, c, "a rejected client")
	wantIn(t, waitLines(t, logs, 1), "host=blocked.test", "sniff=found", "route=reject", "up=0", "down=0", `error="rejected by route"`)
	select {
	case <-conns:
		t.Fatal("the destination of a rejected name was dialled")
	case <-time.After(50 * time.Millisecond):
	}

	// An address rule that rejects: no sniff needed for the route, the
	// client still reset.
	tun.SetRouter(&Router{Default: Action{Kind: ActionReject}})
	c = dialEv(t, ln)
	c.Write([]byte(earlyRequest))
	wantReset(t, c, "a client rejected by address")
	wantIn(t, waitLines(t, logs, 2), "route=reject", `error="rejected by route"`)
	select {
	case <-conns:
		t.Fatal("the destination of a rejected address was dialled")
	default:
	}
}

// A relay on which nothing moves ends once the idle timeout has passed
// since the last byte, not before; bytes keep it open.
func TestEvIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	dst, _ := testkit.EchoServer(t)
	ln, logs := evTunnel(t, dst, &Tunnel{IdleTimeout: idle, Sniff: SniffOptions{Timeout: 10 * time.Second}})

	c := dialEv(t, ln)
	c.Write([]byte(earlyRequest))
	readEcho(t, c, earlyRequest)
	// Bytes every third of the timeout, for twice the timeout: still open.
	var last time.Time // before the last byte: the relay moved it after
	for range 6 {
		time.Sleep(idle / 3)
		last = time.Now()
		c.Write([]byte("x"))
		readEcho(t, c, "x")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	ended := time.Since(last)
	if n != 0 || err != io.EOF {
		t.Fatalf("idle client read = %d, %v; want EOF at the idle timeout", n, err)
	}
	if ended < idle || ended > idle+3*time.Second {
		t.Errorf("the relay ended %v after the last byte; want it at the idle timeout of %v", ended, idle)
	}
	wantIn(t, waitLines(t, logs, 1), "route=direct", fmt.Sprintf("up=%d", len(earlyRequest)+6), `error="idle timeout"`)
}

// Shutdown stops accepting at once, lets the connections in flight finish
// within the grace period, then cuts the rest, relayed or still sniffed,
// with "closed by shutdown"; the loops end with them.
func TestEvShutdownDrainsThenCuts(t *testing.T) {
	dst, _ := testkit.EchoServer(t)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
	ln, logs := evTunnel(t, dst, tun)

	quick, stuck := dialEv(t, ln), dialEv(t, ln)
	for _, c := range []*net.TCPConn{quick, stuck} {
		c.Write([]byte(earlyRequest))
		readEcho(t, c, earlyRequest)
	}
	silent := dialEv(t, ln) // held in its sniff
	deadline := time.Now().Add(5 * time.Second)
	for tun.Active() != 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- tun.Shutdown(ctx) }()
	// Once Shutdown has begun, nothing more is served, and soon the
	// listener is closed: connecting is refused.
	for !tun.isShutdown() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	for {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the listener still accepts 5s into Shutdown")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Served during the grace period.
	quick.Write([]byte("y"))
	quick.CloseWrite()
	quick.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(quick); err != nil || string(got) != "y" {
		t.Fatalf("connection during the grace period: %q, %v", got, err)
	}
	select {
	case err := <-shut:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown = %v, want deadline exceeded (two connections were cut)", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return within 5s")
	}
	wantReset(t, stuck, "a relayed connection left at the end of the grace period")
	wantReset(t, silent, "a sniffed connection left at the end of the grace period")
	waitLines(t, logs, 3)
	if n := strings.Count(logs.String(), `error="closed by shutdown"`); n != 2 {
		t.Errorf("%d access lines say closed by shutdown, want 2:\n%s", n, logs)
	}
	if n := len(logs.Lines(`error=""`)); n != 1 {
		t.Errorf("%d access lines without an error, want 1 (the quick one):\n%s", n, logs)
	}
	if n := tun.Active(); n != 0 {
		t.Errorf("%d connections active after Shutdown", n)
	}
}

// With nothing in flight Shutdown returns at once, without an error.
func TestEvShutdownIdle(t *testing.T) {
	dst, _ := testkit.EchoServer(t)
	tun := &Tunnel{}
	ln, logs := evTunnel(t, dst, tun)
	c := dialEv(t, ln)
	c.Write([]byte(earlyRequest))
	readEcho(t, c, earlyRequest)
	c.Close()
	waitLines(t, logs, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tun.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown = %v with nothing in flight", err)
	}
}

// MaxConns across several loops: one client holding every slot does not
// lock another out, whichever loop holds its connections; one of its
// connections is reset instead (on its own loop), and its access line
// says why. Beyond that, new connections are reset.
func TestEvMaxConnsEvictsAcrossLoops(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4)) // one loop per P
	dst, _ := testkit.EchoServer(t)
	obs := newCountingObserver()
	tun := &Tunnel{MaxConns: 4, Observer: obs}
	ln, logs := evTunnel(t, dst, tun)
	if n := len(tun.loops); n != 4 {
		t.Fatalf("%d loops, want 4", n)
	}
	echo := func(c *net.TCPConn, msg string) error {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadFull(c, make([]byte, len(msg)))
		c.SetReadDeadline(time.Time{})
		return err
	}
	var hog []*net.TCPConn
	for range 4 {
		c, err := dialEvFrom(t, ln, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		if err := echo(c, "x"); err != nil {
			t.Fatal(err)
		}
		hog = append(hog, c)
	}
	tun.mu.Lock()
	on := map[*eventLoop]bool{}
	for c := range tun.active {
		on[c.ev.lp] = true
	}
	tun.mu.Unlock()
	t.Logf("the hog's connections are on %d loops", len(on))

	// The hog's own fifth is reset.
	if extra, err := dialEvFrom(t, ln, "127.0.0.1"); err == nil {
		wantReset(t, extra, "the hog's connection beyond the limit")
	}
	// Another client is served; exactly one of the hog's is reset.
	other, err := dialEvFrom(t, ln, "127.0.0.2")
	if err != nil {
		t.Fatal(err)
	}
	if err := echo(other, "y"); err != nil {
		t.Fatalf("the other client: %v", err)
	}
	logs.WaitFor(t, "held the most")
	resets := 0
	for _, c := range hog {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, syscall.ECONNRESET) {
			resets++
		}
	}
	if resets != 1 {
		t.Fatalf("%d of the hog's connections were reset, want 1", resets)
	}
	if n := obs.get(func(o *countingObserver) int { return o.refused["limit"] }); n != 1 {
		t.Errorf("refused for the limit: %d, want 1", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for tun.Active() != 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := tun.Active(); n != 4 {
		t.Errorf("%d connections active, want 4", n)
	}
}

// staged returns a tunnel on the loops whose every connection (to
// 198.18.2.2:80, never dialled) goes through group, and the access log.
func stagedTunnel(t *testing.T, group *upstream.Group, mode NameMode) (*fakeListener, *Tunnel, *testkit.LogBuffer) {
	t.Helper()
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
	tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: mode}})
	ln, logs := evTunnel(t, netip.MustParseAddrPort("198.18.2.2:80"), tun)
	return ln, tun, logs
}

// Through an upstream group: a group whose pick cannot depend on the name
// is connected and greeted while the client is silent, and gets the name
// once it speaks; one hashed on the host is connected only after the
// sniff; either way bytes cross both ways and the access line names the
// upstream and the target.
func TestEvUpstreamGroup(t *testing.T) {
	for _, tc := range []struct {
		name     string
		strategy upstream.Strategy
		key      upstream.HashKey
		early    bool // greeted before the client speaks
	}{
		{"round robin: preconnected", nil, 0, true},
		{"host hashed: after the sniff", &upstream.ConsistentHash{}, upstream.HashHost, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, events := socksStaged(t, 0)
			u := socksUpstream("socks", addr)
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}, Strategy: tc.strategy, Key: tc.key}
			ln, _, logs := stagedTunnel(t, group, Override)

			c := dialEv(t, ln)
			if tc.early {
				wantEvent(t, events, "greeted", "", "the greeting before the client spoke")
			}
			noEvent(t, events, 100*time.Millisecond) // nothing more without the name
			c.Write([]byte(earlyRequest))
			if !tc.early {
				wantEvent(t, events, "greeted", "", "the greeting after the sniff")
			}
			wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
			readEcho(t, c, earlyRequest)
			c.Write([]byte("more"))
			readEcho(t, c, "more")
			c.CloseWrite()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
				t.Fatalf("after the client's FIN: %q, %v; want EOF", b, err)
			}
			n := len(earlyRequest) + 4
			wantIn(t, waitLines(t, logs, 1), "host=early.test", "sniff=found", "route=proxies", "upstream=socks",
				"target=early.test:80", fmt.Sprintf("up=%d", n), fmt.Sprintf("down=%d", n), `error=""`)
			waitActive(t, u, 0)
		})
	}
}

// The first upstream of the group is dead: the connection falls over to
// the next, which still gets the name; the dead one is benched.
func TestEvUpstreamFailsOver(t *testing.T) {
	for _, tc := range []struct {
		name     string
		strategy upstream.Strategy
		key      upstream.HashKey
	}{
		{"preconnected", nil, 0},
		{"after the sniff", &upstream.ConsistentHash{}, upstream.HashHost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, events := socksStaged(t, 0)
			dead := socksUpstream("dead", testkit.DeadPort(t).String())
			live := socksUpstream("live", addr)
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{dead, live}, Strategy: tc.strategy, Key: tc.key,
				Log: slog.New(slog.DiscardHandler)}
			ln, _, logs := stagedTunnel(t, group, Override)

			// Names until one was hashed to the dead upstream first (round
			// robin starts with it): every one is carried by the live one.
			for i := 1; dead.Up(); i++ {
				if i > 16 {
					t.Fatal("the dead upstream was never tried in 16 connections")
				}
				host := fmt.Sprintf("h%d.test", i)
				req := "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n"
				c := dialEv(t, ln)
				c.Write([]byte(req))
				wantEvent(t, events, "greeted", "", "a greeting")
				wantEvent(t, events, "request", host+":80", "a request for "+host+":80")
				readEcho(t, c, req)
				c.Close()
				wantIn(t, waitLines(t, logs, i), "upstream=live", "target="+host+":80", `error=""`)
			}
			waitActive(t, live, 0)
		})
	}
}

// Every upstream of the group is dead: the client is reset and the access
// line says why.
func TestEvUpstreamAllDead(t *testing.T) {
	dead := socksUpstream("dead", testkit.DeadPort(t).String())
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{dead}, Log: slog.New(slog.DiscardHandler)}
	ln, _, logs := stagedTunnel(t, group, Override)
	c := dialEv(t, ln)
	c.Write([]byte(earlyRequest))
	wantReset(t, c, "a client whose every upstream is dead")
	wantIn(t, waitLines(t, logs, 1), "host=early.test", "route=proxies", "connection refused")
}

// A pre-connection whose client resets before a byte is closed before any
// request, and no longer counted against its upstream.
func TestEvPreconnectUnusedIsClosed(t *testing.T) {
	addr, events := socksStaged(t, 0)
	u := socksUpstream("socks", addr)
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}}
	ln, _, logs := stagedTunnel(t, group, Override)

	c := dialEv(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting")
	waitActive(t, u, 1)
	c.SetLinger(0)
	c.Close()
	wantEvent(t, events, "closed", "", "its connection closed without a request")
	waitLines(t, logs, 1)
	waitActive(t, u, 0)
	if !u.Up() {
		t.Error("the upstream went down for a connection it never carried")
	}
}

// Routes the loops hand to a goroutine (a proxy named by a host name, or a
// name checked by Verify) are still carried, with the name.
func TestEvHandOff(t *testing.T) {
	for _, tc := range []struct {
		name    string
		proxy   func(addr string) string
		mode    NameMode
		request string
		target  string
	}{
		{"proxy by host name", func(addr string) string {
			_, port, _ := net.SplitHostPort(addr)
			return net.JoinHostPort("localhost", port)
		}, Override, earlyRequest, "early.test:80"},
		// localhost resolves to the destination (from /etc/hosts).
		{"verify", func(addr string) string { return addr }, Verify, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "localhost:80"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, events := socksStaged(t, 0)
			u := socksUpstream("socks", tc.proxy(addr))
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}}
			tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
			tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: tc.mode}})
			ln, logs := evTunnel(t, netip.MustParseAddrPort("127.0.0.1:80"), tun)

			c := dialEv(t, ln)
			c.Write([]byte(tc.request))
			for {
				ev := nextEvent(t, events, 5*time.Second)
				if ev.kind == "greeted" {
					continue
				}
				if ev.kind != "request" || ev.target != tc.target {
					t.Fatalf("upstream saw %+v, want a request for %s", ev, tc.target)
				}
				break
			}
			readEcho(t, c, tc.request)
			c.Close()
			wantIn(t, waitLines(t, logs, 1), "route=proxies", "upstream=socks", "target="+tc.target,
				fmt.Sprintf("up=%d", len(tc.request)), `error=""`)
			waitActive(t, u, 0)
		})
	}
}

// What the sniff reads stays the client's: bytes that came before a
// timeout are replayed with the rest, a request longer than the loop's
// buffer grows it, and one beyond MaxBytes is carried unsniffed.
func TestEvSniffKeepsTheBytes(t *testing.T) {
	pad := strings.Repeat("a", 40<<10)
	big := "GET / HTTP/1.1\r\nX-Pad: " + pad + "\r\nHost: big.test\r\n\r\n"
	for _, tc := range []struct {
		name  string
		sniff SniffOptions
		parts []string // written with a pause between
		pause time.Duration
		want  []string
	}{
		{"timeout with bytes", SniffOptions{Timeout: 100 * time.Millisecond}, []string{"GET / HT", "TP/1.1\r\nHost: late.test\r\n\r\n"},
			300 * time.Millisecond, []string{"sniff=timeout", `host=""`}},
		{"longer than the buffer", SniffOptions{Timeout: 10 * time.Second}, []string{big}, 0,
			[]string{"sniff=found", "host=big.test"}},
		{"beyond MaxBytes", SniffOptions{Timeout: 10 * time.Second, MaxBytes: 4 << 10}, []string{big}, 0,
			[]string{"sniff=too-large", `host=""`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst, _ := testkit.EchoServer(t)
			ln, logs := evTunnel(t, dst, &Tunnel{Sniff: tc.sniff})
			c := dialEv(t, ln)
			all := strings.Join(tc.parts, "")
			got := make(chan string, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				b, _ := io.ReadAll(c)
				got <- string(b)
			}()
			for i, p := range tc.parts {
				if i > 0 {
					time.Sleep(tc.pause)
				}
				c.Write([]byte(p))
			}
			c.CloseWrite()
			if b := <-got; b != all {
				t.Fatalf("echo: %d bytes back, want the %d sent, in order", len(b), len(all))
			}
			wantIn(t, waitLines(t, logs, 1), append(tc.want, "route=direct",
				fmt.Sprintf("up=%d", len(all)), fmt.Sprintf("down=%d", len(all)), `error=""`)...)
		})
	}
}

// A client that closes (FIN) before saying anything is carried like any
// other: the destination dialled early gets its FIN, and what the
// destination sends still reaches the client.
func TestEvClientClosesDuringSniff(t *testing.T) {
	dst, conns := acceptingServer(t)
	ln, logs := evTunnel(t, dst, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})
	c := dialEv(t, ln)
	server := accepted(t, conns, 5*time.Second)
	c.CloseWrite()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("destination read = %d, %v; want EOF", n, err)
	}
	server.Write([]byte("bye"))
	server.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); err != nil || string(b) != "bye" {
		t.Fatalf("client read %q, %v; want bye, then EOF", b, err)
	}
	wantIn(t, waitLines(t, logs, 1), "sniff=closed", "route=direct", "up=0", "down=3", `error=""`)
}

// The destination half-closes first: the client gets its EOF and may go
// on sending, and the destination still reads what it sends.
func TestEvServerHalfCloses(t *testing.T) {
	dst, conns := acceptingServer(t)
	ln, logs := evTunnel(t, dst, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})
	c := dialEv(t, ln)
	server := accepted(t, conns, 5*time.Second)
	c.Write([]byte(earlyRequest))
	echoOnce(t, server, earlyRequest)
	readEcho(t, c, earlyRequest)
	server.CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("client read = %d, %v; want EOF after the destination's FIN", n, err)
	}
	c.Write([]byte("after"))
	c.CloseWrite()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(server); err != nil || string(b) != "after" {
		t.Fatalf("destination read %q, %v after its FIN; want after, then EOF", b, err)
	}
	n := len(earlyRequest)
	wantIn(t, waitLines(t, logs, 1), "route=direct", fmt.Sprintf("up=%d", n+5), fmt.Sprintf("down=%d", n), `error=""`)
}

// blackhole is a loopback address whose connects hang: a listener with a
// backlog of 0, its queue filled by one connection, drops further SYNs.
func blackhole(t *testing.T) netip.AddrPort {
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
	sa, _ := syscall.Getsockname(fd)
	addr := netip.AddrPortFrom(netip.AddrFrom4(sa.(*syscall.SockaddrInet4).Addr), uint16(sa.(*syscall.SockaddrInet4).Port))
	c, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// A second connect must hang now.
	if c2, err := net.DialTimeout("tcp", addr.String(), 100*time.Millisecond); err == nil {
		c2.Close()
		t.Skip("the kernel accepted a connection beyond a full backlog: no way to make a connect hang")
	}
	return addr
}

// A connect that hangs ends at DialTimeout: the client is reset and the
// access line says the dial timed out. Shutdown cuts one still connecting.
func TestEvDialTimeout(t *testing.T) {
	dst := blackhole(t)
	t.Run("timeout", func(t *testing.T) {
		ln, logs := evTunnel(t, dst, &Tunnel{DialTimeout: 200 * time.Millisecond, Sniff: SniffOptions{Timeout: 10 * time.Second}})
		start := time.Now() // before the accept, and the dial that follows it
		c := dialEv(t, ln)
		c.Write([]byte(earlyRequest))
		wantReset(t, c, "the client of a destination that does not answer")
		if took := time.Since(start); took < 200*time.Millisecond {
			t.Errorf("reset %v after the client connected, before the dial timeout", took)
		}
		wantIn(t, waitLines(t, logs, 1), "host=early.test", "route=direct", `error="dial tcp `+dst.String()+`: `, "i/o timeout")
	})
	t.Run("shutdown", func(t *testing.T) {
		tun := &Tunnel{DialTimeout: 10 * time.Second, Sniff: SniffOptions{Timeout: 10 * time.Second}}
		ln, logs := evTunnel(t, dst, tun)
		c := dialEv(t, ln)
		c.Write([]byte(earlyRequest))
		deadline := time.Now().Add(5 * time.Second)
		for tun.Active() != 1 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond) // sniffed, still connecting
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if err := tun.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown = %v, want deadline exceeded", err)
		}
		wantReset(t, c, "a client whose dial Shutdown cut")
		wantIn(t, waitLines(t, logs, 1), "host=early.test", `error="closed by shutdown"`)
	})
}

// A connection the listener cannot give an original destination for is
// closed at once, never dialled, and logged as refused with the reason.
func TestEvRefusesNotRedirected(t *testing.T) {
	dst, accepted := testkit.EchoServer(t)
	obs := newCountingObserver()
	ln, logs := evTunnelErr(t, dst, errors.New("not redirected"), &Tunnel{Observer: obs})
	c := dialEv(t, ln)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("refused connection read = %d, %v; want it closed", n, err)
	}
	logs.WaitFor(t, "msg=refused")
	wantIn(t, logs.String(), "client="+c.LocalAddr().String(), `error="not redirected"`)
	if n := obs.get(func(o *countingObserver) int { return o.refused["not_redirected"] }); n != 1 {
		t.Errorf("refused as not redirected: %d, want 1", n)
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("the destination saw %d connections; a refused one is never dialled", n)
	}
	if lines := connLines(logs); len(lines) != 0 {
		t.Errorf("access lines for a refused connection: %v", lines)
	}
}

// A pre-connection the proxy drops while the client is slow to speak
// teaches nothing (issue 12's rule): the client is carried on a fresh
// connection, with its name, the upstream stays up, and the dropped one is
// counted as an unused pre-connection.
func TestEvPreconnectDroppedWhileSilent(t *testing.T) {
	addr, events := socksStaged(t, 100*time.Millisecond)
	u := socksUpstream("socks", addr)
	groupLog := &testkit.LogBuffer{}
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}, Log: slog.New(slog.NewTextHandler(groupLog, nil))}
	obs := &preconnObserver{countingObserver: newCountingObserver()}
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}, Observer: obs}
	tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: Override}})
	ln, logs := evTunnel(t, netip.MustParseAddrPort("198.18.2.2:80"), tun)

	for i := 1; i <= 2; i++ {
		c := dialEv(t, ln)
		wantEvent(t, events, "greeted", "", "the greeting")
		wantEvent(t, events, "closed", "", "the idle pre-connection dropped")
		time.Sleep(20 * time.Millisecond) // its FIN on its way
		c.Write([]byte(earlyRequest))
		wantEvent(t, events, "greeted", "", "a fresh connection's greeting")
		wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
		readEcho(t, c, earlyRequest)
		c.Close()
		wantIn(t, waitLines(t, logs, i), "upstream=socks", "target=early.test:80", `error=""`)
		obs.waitCounts(t, 0, i)
		if !u.Up() {
			t.Fatalf("connection %d: the upstream was benched because a client kept its pre-connection waiting", i)
		}
	}
	if n := len(groupLog.Lines("upstream down")); n != 0 {
		t.Errorf("%d upstream-down lines: %s", n, groupLog)
	}
	waitActive(t, u, 0)
}

// A prepared pre-connection waits for the client as long as the sniff
// does: the dial timeout bounds the connect and the handshake, not the
// client's silence; the upstream is not blamed for it.
func TestEvPreconnectOutlivesDialTimeout(t *testing.T) {
	addr, events := socksStaged(t, 0)
	u := socksUpstream("socks", addr)
	groupLog := &testkit.LogBuffer{}
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}, Log: slog.New(slog.NewTextHandler(groupLog, nil))}
	obs := &preconnObserver{countingObserver: newCountingObserver()}
	tun := &Tunnel{DialTimeout: 200 * time.Millisecond, Sniff: SniffOptions{Timeout: 5 * time.Second}, Observer: obs}
	tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: Override}})
	ln, logs := evTunnel(t, netip.MustParseAddrPort("198.18.2.2:80"), tun)

	c := dialEv(t, ln)
	wantEvent(t, events, "greeted", "", "the greeting")
	noEvent(t, events, 500*time.Millisecond) // the client is silent past the dial timeout
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80 on the pre-connection")
	readEcho(t, c, earlyRequest)
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "upstream=socks", "target=early.test:80", `error=""`)
	obs.waitCounts(t, 1, 0)
	if !u.Up() || len(groupLog.Lines("upstream down")) != 0 {
		t.Errorf("the upstream was blamed for a client's silence: %s", groupLog)
	}
}

// Out of descriptors, a loop's accept fails: it says so, pauses (the
// listener stays readable, and trying again at once would spin), and
// takes the connection once descriptors are free again.
func TestEvAcceptFailsThenRecovers(t *testing.T) {
	dst, _ := testkit.EchoServer(t)
	ln, logs := evTunnel(t, dst, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})

	// The client's socket exists before descriptors run out.
	cfd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Error(err)
		}
	}
	low := lim
	low.Cur = uint64(cfd + 16)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		syscall.Close(cfd)
		t.Fatal(err)
	}
	var fill []int
	for range 64 { // every free number below the limit
		fd, err := syscall.Dup(cfd)
		if err != nil {
			break
		}
		fill = append(fill, fd)
	}
	freed := false
	free := func() {
		if !freed {
			freed = true
			for _, fd := range fill {
				syscall.Close(fd)
			}
			restore()
		}
	}
	defer free()
	sa := &syscall.SockaddrInet4{Port: ln.Addr().(*net.TCPAddr).Port, Addr: [4]byte{127, 0, 0, 1}}
	if err := syscall.Connect(cfd, sa); err != nil { // into the backlog
		syscall.Close(cfd)
		t.Fatal(err)
	}
	logs.WaitFor(t, "accept failed; retrying")
	free()
	f := os.NewFile(uintptr(cfd), "client")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := fc.(*net.TCPConn)
	defer c.Close()
	c.Write([]byte(earlyRequest))
	readEcho(t, c, earlyRequest)
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "host=early.test", "route=direct", `error=""`)
	wantIn(t, logs.String(), "too many open files")
}

// connectProxy is an HTTP CONNECT proxy that answers with its reply head
// and, in the same write, the destination's greeting (a server that speaks
// first, as SMTP's), then echoes; targets hears what each CONNECT asked.
func connectProxy(t *testing.T, greeting string) (addr string, targets <-chan string) {
	t.Helper()
	ch := make(chan string, 8)
	ap, _ := testkit.Server(t, func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var head []byte
		b := make([]byte, 1)
		for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
			if _, err := c.Read(b); err != nil {
				return
			}
			head = append(head, b[0])
		}
		line, _, _ := strings.Cut(string(head), "\r\n")
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "CONNECT" {
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			return
		}
		ch <- f[1]
		c.SetReadDeadline(time.Time{})
		c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n" + greeting))
		io.Copy(c, c)
	})
	return ap.String(), ch
}

// Through an HTTP CONNECT upstream on the loops: the destination's bytes
// that came with the proxy's reply reach the client first, then bytes
// cross both ways; the CONNECT named the sniffed host.
func TestEvHTTPConnectServerBytesWithReply(t *testing.T) {
	const greeting = "220 hello\r\n"
	addr, targets := connectProxy(t, greeting)
	u := &upstream.Upstream{Name: "http", Dialer: &upstream.HTTPConnect{Proxy: addr}}
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u}}
	ln, _, logs := stagedTunnel(t, group, Override)

	c := dialEv(t, ln)
	c.Write([]byte(earlyRequest))
	select {
	case got := <-targets:
		if got != "early.test:80" {
			t.Fatalf("CONNECT %s, want early.test:80", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy got no CONNECT within 5s")
	}
	readBanner(t, c, greeting+earlyRequest)
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); err != nil || len(b) != 0 {
		t.Fatalf("after the client's FIN: %q, %v; want EOF", b, err)
	}
	wantIn(t, waitLines(t, logs, 1), "upstream=http", "target=early.test:80",
		fmt.Sprintf("up=%d", len(earlyRequest)), fmt.Sprintf("down=%d", len(greeting)+len(earlyRequest)), `error=""`)
	waitActive(t, u, 0)
}

// IPv6 on the loops: a client and a destination on ::1, and an IPv4 client
// accepted by a dual-stack listener (its address unmapped in the access
// line).
func TestEvIPv6(t *testing.T) {
	ln6, err := net.ListenTCP("tcp6", &net.TCPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	ln6.Close()
	for _, tc := range []struct {
		name           string
		listen, client net.IP
		wantClient     string
	}{
		{"v6", net.IPv6loopback, net.IPv6loopback, "[::1]:"},
		{"v4 on a dual-stack listener", net.IPv6unspecified, net.IPv4(127, 0, 0, 1), "127.0.0.1:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkFDs(t)
			testkit.CheckGoroutines(t)
			dl, err := net.ListenTCP("tcp6", &net.TCPAddr{IP: net.IPv6loopback})
			if err != nil {
				t.Fatal(err)
			}
			dst := dl.Addr().(*net.TCPAddr).AddrPort()
			go func() {
				for {
					c, err := dl.AcceptTCP()
					if err != nil {
						return
					}
					go func() { io.Copy(c, c); c.Close() }()
				}
			}()
			defer dl.Close()
			l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: tc.listen})
			if err != nil {
				t.Fatal(err)
			}
			ln := &fakeListener{TCPListener: l, dst: dst}
			t.Cleanup(func() { l.Close() })
			logs := serveTunnel(t, ln, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})
			c, err := net.DialTCP("tcp", nil, &net.TCPAddr{IP: tc.client, Port: l.Addr().(*net.TCPAddr).Port})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte(earlyRequest))
			readEcho(t, c, earlyRequest)
			c.Close()
			wantIn(t, waitLines(t, logs, 1), "client="+tc.wantClient, "dst="+dst.String(), "host=early.test", "route=direct", `error=""`)
		})
	}
}

// socksAnswering is a SOCKS5 server (no authentication) that answers every
// CONNECT with reply code rep and closes; requests hears each target.
func socksAnswering(t *testing.T, rep byte) (addr string, requests <-chan string) {
	t.Helper()
	ch := make(chan string, 8)
	ap, _ := testkit.Server(t, func(c *net.TCPConn) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		hello := make([]byte, 3)
		if _, err := io.ReadFull(c, hello); err != nil {
			return
		}
		c.Write([]byte{5, 0})
		head := make([]byte, 1)
		if _, err := io.ReadFull(c, head); err != nil {
			return
		}
		target, err := socksRequestRest(c, head[0])
		if err != nil {
			return
		}
		ch <- target
		c.Write([]byte{5, rep, 0, 1, 0, 0, 0, 0, 0, 0})
	})
	return ap.String(), ch
}

// The upstream says the destination refused: the search ends there (the
// next upstream would hear the same), nobody is benched, the client is
// reset and the access line has the proxy's answer.
func TestEvUpstreamTargetRefused(t *testing.T) {
	for _, pre := range []bool{true, false} {
		t.Run(map[bool]string{true: "preconnected", false: "after the sniff"}[pre], func(t *testing.T) {
			first, reqs := socksAnswering(t, 5) // connection refused
			second, reqs2 := socksAnswering(t, 0)
			u1, u2 := socksUpstream("first", first), socksUpstream("second", second)
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{u1, u2}, Log: slog.New(slog.DiscardHandler)}
			if !pre {
				group.Strategy, group.Key = &upstream.ConsistentHash{}, upstream.HashHost
			}
			ln, _, logs := stagedTunnel(t, group, Override)
			// With the host hashed, names until one lands on the first.
			for i := 1; ; i++ {
				if i > 16 {
					t.Fatal("no name was hashed to the first upstream in 16")
				}
				host := fmt.Sprintf("h%d.test", i)
				c := dialEv(t, ln)
				c.Write([]byte("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n"))
				var got string
				select {
				case got = <-reqs:
				case <-reqs2: // hashed to the second: it closes after its reply
					c.SetReadDeadline(time.Now().Add(5 * time.Second))
					io.Copy(io.Discard, c)
					continue
				case <-time.After(5 * time.Second):
					t.Fatal("no upstream got a request within 5s")
				}
				if got != host+":80" {
					t.Fatalf("the first upstream was asked for %s, want %s:80", got, host)
				}
				wantReset(t, c, "a client whose destination refused")
				line := waitLines(t, logs, i)
				wantIn(t, line, "upstream=first", "target="+host+":80", "connection refused")
				select {
				case r := <-reqs2:
					t.Fatalf("the second upstream was asked for %s after a target failure", r)
				case <-time.After(100 * time.Millisecond):
				}
				break
			}
			if !u1.Up() || !u2.Up() {
				t.Error("an upstream was benched for a destination's refusal")
			}
			waitActive(t, u1, 0)
			waitActive(t, u2, 0)
		})
	}
}

// A proxy whose connect hangs is given up after half the dial timeout: the
// next upstream carries the connection, with the name, and the silent one
// is benched.
func TestEvUpstreamConnectTimesOut(t *testing.T) {
	hole := blackhole(t)
	addr, events := socksStaged(t, 0)
	dead, live := socksUpstream("hole", hole.String()), socksUpstream("live", addr)
	group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{dead, live}, Log: slog.New(slog.DiscardHandler)}
	tun := &Tunnel{DialTimeout: 400 * time.Millisecond, Sniff: SniffOptions{Timeout: 10 * time.Second}}
	tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: Override}})
	ln, logs := evTunnel(t, netip.MustParseAddrPort("198.18.2.2:80"), tun)

	start := time.Now()
	c := dialEv(t, ln)
	wantEvent(t, events, "greeted", "", "the second upstream's greeting")
	if took := time.Since(start); took < 200*time.Millisecond {
		t.Errorf("the second upstream was greeted %v in, before the first's connect timed out", took)
	}
	c.Write([]byte(earlyRequest))
	wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
	readEcho(t, c, earlyRequest)
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "upstream=live", "target=early.test:80", `error=""`)
	if dead.Up() {
		t.Error("the upstream whose connect hung is still up")
	}
}

// A proxy that accepts the connection but never answers the greeting is
// benched once the dial timeout runs out, and the next upstream carries the
// name; one that answers the greeting but never the request is not blamed
// (the target may be slow): the search ends there, with a timeout in the
// access line, and the next upstream is never asked.
func TestEvUpstreamSilentProxy(t *testing.T) {
	mute, _ := testkit.Server(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	noReply, _ := testkit.Server(t, func(c *net.TCPConn) {
		hello := make([]byte, 3)
		if _, err := io.ReadFull(c, hello); err == nil {
			c.Write([]byte{5, 0})
			io.Copy(io.Discard, c) // the request is never answered
		}
	})
	for _, tc := range []struct {
		name     string
		silent   netip.AddrPort
		benched  bool
		carrier  string
		errWant  string
		liveUsed bool
	}{
		{"no answer to the greeting", mute, true, "upstream=live", `error=""`, true},
		{"no answer to the request", noReply, false, "upstream=silent", "i/o timeout", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, events := socksStaged(t, 0)
			silent, live := socksUpstream("silent", tc.silent.String()), socksUpstream("live", addr)
			group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{silent, live}, Log: slog.New(slog.DiscardHandler)}
			tun := &Tunnel{DialTimeout: 400 * time.Millisecond, Sniff: SniffOptions{Timeout: 10 * time.Second}}
			tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: Override}})
			ln, logs := evTunnel(t, netip.MustParseAddrPort("198.18.2.2:80"), tun)

			c := dialEv(t, ln)
			c.Write([]byte(earlyRequest))
			if tc.liveUsed {
				wantEvent(t, events, "greeted", "", "the next upstream's greeting")
				wantEvent(t, events, "request", "early.test:80", "a request for early.test:80")
				readEcho(t, c, earlyRequest)
			} else {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Read(make([]byte, 1)); err == nil {
					t.Error("the client got bytes through a proxy that never answered the request")
				}
				noEvent(t, events, 100*time.Millisecond)
			}
			c.Close()
			wantIn(t, waitLines(t, logs, 1), tc.carrier, tc.errWant)
			if silent.Up() == tc.benched {
				t.Errorf("silent upstream up = %v, want %v", silent.Up(), !tc.benched)
			}
		})
	}
}

// Every socket detour dials carries the Tunnel's mark before Control runs
// on it, on the event loops (which set it without Control's closures) and
// through the goroutines' dialer alike.
func TestMarkAndControl(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SO_MARK needs CAP_NET_ADMIN: run as root")
	}
	type seen struct {
		addr string
		mark int
	}
	control := func(ch chan<- seen) func(string, string, syscall.RawConn) error {
		return func(_, addr string, c syscall.RawConn) error {
			var m int
			c.Control(func(fd uintptr) { m, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK) })
			ch <- seen{addr, m}
			return nil
		}
	}

	dst, _ := testkit.EchoServer(t)
	ch := make(chan seen, 4)
	ln, _ := evTunnel(t, dst, &Tunnel{Mode: "redirect", Mark: 0x2d, Control: control(ch), Loops: &LoopGuard{},
		Sniff: SniffOptions{Disabled: true}})
	c := dialEv(t, ln)
	c.Write([]byte("x"))
	b := make([]byte, 1)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("echo through the loops: %v", err)
	}
	if s := <-ch; s.addr != dst.String() || s.mark != 0x2d {
		t.Errorf("the loops' dial: Control saw %q with mark %#x, want %q with 0x2d", s.addr, s.mark, dst)
	}

	tun := &Tunnel{Mark: 0x2e, Control: control(ch)}
	d := net.Dialer{Control: tun.socketControl()}
	gc, err := d.Dial("tcp", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	gc.Close()
	if s := <-ch; s.addr != dst.String() || s.mark != 0x2e {
		t.Errorf("the goroutines' dial: Control saw %q with mark %#x, want %q with 0x2e", s.addr, s.mark, dst)
	}
}
