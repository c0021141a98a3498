package tunnel

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
)

// fakeListener is a loopback listener whose every connection "was going" to
// dst, or fails OriginalDst with err. Like *redirect.Listener it hands out
// bare descriptors too (OriginalDstFD), so Serve serves it on the event
// loops; with DETOUR_TEST_GOROUTINES=1 in the environment startTunnel
// serves it on goroutines instead (make unit runs the package both ways).
type fakeListener struct {
	*net.TCPListener
	dst netip.AddrPort
	err error
}

func (f *fakeListener) Accept() (*net.TCPConn, error) { return f.AcceptTCP() }

func (f *fakeListener) OriginalDst(*net.TCPConn) (netip.AddrPort, error) { return f.dst, f.err }

func (f *fakeListener) OriginalDstFD(int, netip.AddrPort) (netip.AddrPort, error) {
	return f.dst, f.err
}

// onGoroutines: startTunnel serves every connection on goroutines of its
// own (Tunnel.NoEventLoops), the data path of listeners without bare
// descriptors and of the proxy port.
var onGoroutines = os.Getenv("DETOUR_TEST_GOROUTINES") == "1"

func newFakeListener(t *testing.T, dst netip.AddrPort, err error) *fakeListener {
	t.Helper()
	ln, err2 := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err2 != nil {
		t.Fatal(err2)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeListener{TCPListener: ln, dst: dst, err: err}
}

func startTunnel(t *testing.T, ln Listener, tun *Tunnel) *testkit.LogBuffer {
	t.Helper()
	if onGoroutines {
		tun.NoEventLoops = true
	}
	return serveTunnel(t, ln, tun)
}

// serveTunnel is startTunnel on the path tun says.
func serveTunnel(t *testing.T, ln Listener, tun *Tunnel) *testkit.LogBuffer {
	t.Helper()
	logs := &testkit.LogBuffer{}
	tun.Log = slog.New(slog.NewTextHandler(logs, nil))
	done := make(chan error, 1)
	go func() { done <- tun.Serve(ln) }()
	t.Cleanup(func() {
		tun.Shutdown(context.Background())
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return logs
}

// echoServer accepts connections and echoes them until EOF, then closes.
var echoServer = testkit.EchoServer

func TestServeCarriesToOriginalDst(t *testing.T) {
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	logs := startTunnel(t, ln, &Tunnel{Mode: "redirect"})

	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	logs.WaitFor(t, "msg=conn")
	for _, want := range []string{"dst=" + dst.String(), "mode=redirect", "up=5", "down=5", `error=""`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("access line lacks %q: %s", want, logs.String())
		}
	}
}

func TestServeRefusesWithoutDialling(t *testing.T) {
	dst, accepted := echoServer(t)
	ln := newFakeListener(t, dst, errors.New("not redirected"))
	logs := startTunnel(t, ln, &Tunnel{})

	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("refused connection read = %d, %v; want it closed", n, err)
	}
	logs.WaitFor(t, "msg=refused")
	if !strings.Contains(logs.String(), "not redirected") {
		t.Errorf("refusal not logged with its reason: %s", logs.String())
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("destination saw %d connections; a refused one must not be dialled", n)
	}
}

func TestServeDialFailureResetsClient(t *testing.T) {
	// A port nobody listens on: take one and close it.
	l, _ := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	dead := l.Addr().(*net.TCPAddr).AddrPort()
	l.Close()
	ln := newFakeListener(t, dead, nil)
	logs := startTunnel(t, ln, &Tunnel{})

	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
	} // else the reset came before connect returned: just as good
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read = %v, want a reset when the destination refuses", err)
	}
	logs.WaitFor(t, "connection refused")
}

func TestShutdownWaitsThenCuts(t *testing.T) {
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	tun := &Tunnel{}
	logs := &testkit.LogBuffer{}
	tun.Log = slog.New(slog.NewTextHandler(logs, nil))
	served := make(chan error, 1)
	go func() { served <- tun.Serve(ln) }()

	// One connection that finishes within the grace period…
	quick, _ := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	defer quick.Close()
	// …and one that never would.
	stuck, _ := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	defer stuck.Close()
	for _, c := range []*net.TCPConn{quick, stuck} {
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- tun.Shutdown(ctx) }()

	// Still served during the grace period.
	quick.Write([]byte("y"))
	quick.CloseWrite()
	if got, err := io.ReadAll(quick); err != nil || string(got) != "y" {
		t.Fatalf("connection during grace period: %q, %v", got, err)
	}
	if err := <-shut; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want deadline exceeded (one connection was cut)", err)
	}
	stuck.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := stuck.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("stuck connection read = %v, want reset at the end of the grace period", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve = %v, want ErrServerClosed", err)
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Fatal("listener still accepts after Shutdown")
	}
	if !strings.Contains(logs.String(), "closed by shutdown") {
		t.Errorf("cut connection not logged as such: %s", logs.String())
	}
}

// countingObserver records what the tunnel reports.
type countingObserver struct {
	mu                     sync.Mutex
	accepted, closed       int
	refused, sniffOutcomes map[string]int
}

func newCountingObserver() *countingObserver {
	return &countingObserver{refused: map[string]int{}, sniffOutcomes: map[string]int{}}
}
func (o *countingObserver) Accepted() { o.mu.Lock(); o.accepted++; o.mu.Unlock() }
func (o *countingObserver) Refused(reason string) {
	o.mu.Lock()
	o.refused[reason]++
	o.mu.Unlock()
}
func (o *countingObserver) Sniffed(_ sniff.Result, outcome string, _ time.Duration) {
	o.mu.Lock()
	o.sniffOutcomes[outcome]++
	o.mu.Unlock()
}
func (o *countingObserver) Dialed(string, time.Duration, error) {}
func (o *countingObserver) Closed(string, int64, int64)         { o.mu.Lock(); o.closed++; o.mu.Unlock() }
func (o *countingObserver) get(f func(*countingObserver) int) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return f(o)
}

func TestMaxConnsResetsBeyondLimit(t *testing.T) {
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	obs := newCountingObserver()
	logs := startTunnel(t, ln, &Tunnel{MaxConns: 2, Observer: obs})
	var held []*net.TCPConn
	for range 2 {
		c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	extra, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err == nil {
		defer extra.Close()
		extra.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = extra.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("third connection over a limit of 2: %v, want a reset", err)
	}
	logs.WaitFor(t, "connection limit reached")
	if n := obs.get(func(o *countingObserver) int { return o.refused["limit"] }); n != 1 {
		t.Errorf("refused for limit = %d, want 1", n)
	}
	held[0].Close()
	deadline := time.Now().Add(5 * time.Second)
	for obs.get(func(o *countingObserver) int { return o.closed }) < 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	// A slot is free again.
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("y"))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("connection after one closed: %v", err)
	}
}

func TestMaxSniffingRoutesBusyByIP(t *testing.T) {
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	obs := newCountingObserver()
	startTunnel(t, ln, &Tunnel{MaxSniffing: 1, Observer: obs, Sniff: SniffOptions{Timeout: 3 * time.Second}})
	silent, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr)) // holds the one slot
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	time.Sleep(50 * time.Millisecond)
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.Write([]byte("GET / HTTP/1.1\r\n"))
	if _, err := io.ReadFull(c, make([]byte, 16)); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("second connection waited %v behind a silent one", took)
	}
	if n := obs.get(func(o *countingObserver) int { return o.sniffOutcomes["busy"] }); n != 1 {
		t.Errorf("busy sniff outcomes = %d, want 1", n)
	}
}

// acceptingServer hands every connection it accepts to the test, which
// serves it; all are closed when the test ends.
func acceptingServer(t *testing.T) (netip.AddrPort, <-chan *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan *net.TCPConn, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		close(conns)
		for c := range conns {
			c.Close()
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort(), conns
}

// accepted waits for the destination's next connection.
func accepted(t *testing.T, conns <-chan *net.TCPConn, within time.Duration) *net.TCPConn {
	t.Helper()
	select {
	case c := <-conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(within):
		t.Fatalf("destination accepted nothing within %v", within)
		return nil
	}
}

// echoOnce reads a request of len(want) bytes on the destination's side,
// checks it is want and sends it back.
func echoOnce(t *testing.T, c *net.TCPConn, want string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("destination read %q, %v; want %q", got, err, want)
	}
	if _, err := c.Write(got); err != nil {
		t.Fatal(err)
	}
}

// sniffingTunnel serves a fake listener whose connections go to a fresh
// accepting destination, routed by router, with a sniff timeout long enough
// that a test fails on what it checks, not on the timeout.
func sniffingTunnel(t *testing.T, router *Router) (*fakeListener, <-chan *net.TCPConn, *testkit.LogBuffer) {
	t.Helper()
	dst, conns := acceptingServer(t)
	ln := newFakeListener(t, dst, nil)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
	tun.SetRouter(router)
	return ln, conns, startTunnel(t, ln, tun)
}

// readEcho reads want back at the client.
func readEcho(t *testing.T, c *net.TCPConn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(want))); err != nil {
		t.Fatalf("client reading the echo: %v", err)
	}
}

func dialTunnel(t *testing.T, ln *fakeListener) *net.TCPConn {
	t.Helper()
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

const earlyRequest = "GET / HTTP/1.1\r\nHost: early.test\r\n\r\n"

// When no rule can look at the name, a direct route connects while the
// client's first bytes are awaited: the destination accepts before the
// client says anything (the sniff timeout is far away).
func TestServeDialsDirectWhileSniffing(t *testing.T) {
	for name, router := range map[string]*Router{
		"no router": nil,
		"address rules": {Rules: []Rule{
			{CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Action: Action{Kind: ActionReject}},
			{Suffixes: []string{"early.test"}, Ports: []ports.Range{{Lo: 1, Hi: 1}}, Action: Action{Kind: ActionReject}},
		}, Default: Action{Kind: ActionDirect}},
	} {
		t.Run(name, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			ln, conns, logs := sniffingTunnel(t, router)

			c := dialTunnel(t, ln)
			server := accepted(t, conns, 5*time.Second) // before any byte was sent
			c.Write([]byte(earlyRequest))
			echoOnce(t, server, earlyRequest)
			readEcho(t, c, earlyRequest)
			c.Close()
			server.Close()
			logs.WaitFor(t, "msg=conn")
			for _, want := range []string{"host=early.test", "proto=http", "sniff=found", "route=direct", `error=""`} {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("access line lacks %q: %s", want, logs.String())
				}
			}
		})
	}
}

// A rule on the name keeps the dial after the sniff: nothing reaches the
// destination before the client's bytes, and a rejected name never does.
func TestServeDialsAfterSniffForNameRules(t *testing.T) {
	router := &Router{
		Rules:   []Rule{{Domains: []string{"blocked.test"}, Action: Action{Kind: ActionReject}}},
		Default: Action{Kind: ActionDirect},
	}
	t.Run("allowed", func(t *testing.T) {
		ln, conns, logs := sniffingTunnel(t, router)

		c := dialTunnel(t, ln)
		time.Sleep(100 * time.Millisecond) // time enough for an early dial
		select {
		case <-conns:
			t.Fatal("destination dialled before the client sent its name")
		default:
		}
		c.Write([]byte(earlyRequest))
		server := accepted(t, conns, 5*time.Second)
		echoOnce(t, server, earlyRequest)
		readEcho(t, c, earlyRequest)
		c.Close()
		server.Close()
		logs.WaitFor(t, "msg=conn")
		if !strings.Contains(logs.String(), "route=direct") {
			t.Errorf("access line: %s", logs.String())
		}
	})
	t.Run("rejected", func(t *testing.T) {
		ln, conns, logs := sniffingTunnel(t, router)

		c := dialTunnel(t, ln)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("rejected client read = %v, want a reset", err)
		}
		logs.WaitFor(t, "msg=conn")
		if !strings.Contains(logs.String(), "route=reject") {
			t.Errorf("access line: %s", logs.String())
		}
		select {
		case <-conns:
			t.Fatal("destination dialled for a rejected name")
		default:
		}
	})
}

// A client that goes away while being sniffed takes the early connection
// with it: a reset is passed on as a reset; a close is relayed as today
// (the destination sees EOF). Either way the access line has the sniff's
// outcome, and nothing is left running.
func TestServeClientGoneDuringEarlyDial(t *testing.T) {
	for _, tc := range []struct {
		name       string
		reset      bool
		serverErrs []error // what the destination's read may return
		logErr     string  // in the access line
	}{
		// A reset that comes while the dial is returning cancels it, and
		// the dialer closes the socket itself (EOF at the destination).
		{"reset", true, []error{syscall.ECONNRESET, io.EOF}, `error="client: `},
		{"close", false, []error{io.EOF}, `error=""`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			dst, conns := acceptingServer(t)
			ln := newFakeListener(t, dst, nil)
			logs := startTunnel(t, ln, &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}})

			c := dialTunnel(t, ln)
			server := accepted(t, conns, 5*time.Second)
			if tc.reset {
				c.SetLinger(0)
			}
			c.Close()
			server.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := server.Read(make([]byte, 1))
			if n != 0 || !slices.ContainsFunc(tc.serverErrs, func(want error) bool { return errors.Is(err, want) }) {
				t.Fatalf("destination read = %d, %v; want one of %v", n, err, tc.serverErrs)
			}
			server.Close()
			logs.WaitFor(t, "msg=conn")
			for _, want := range []string{"sniff=closed", "route=direct", "up=0", tc.logErr} {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("access line lacks %q: %s", want, logs.String())
				}
			}
		})
	}
}

// Shutdown cutting a connection during its sniff resets the connection
// dialled early, as it resets a relayed one.
func TestShutdownResetsEarlyDial(t *testing.T) {
	testkit.CheckGoroutines(t)
	dst, conns := acceptingServer(t)
	ln := newFakeListener(t, dst, nil)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 10 * time.Second}}
	logs := startTunnel(t, ln, tun)

	dialTunnel(t, ln)
	server := accepted(t, conns, 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := tun.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want deadline exceeded", err)
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("destination read = %v, want a reset at the end of the grace period", err)
	}
	logs.WaitFor(t, "msg=conn")
	if !strings.Contains(logs.String(), "closed by shutdown") {
		t.Errorf("access line: %s", logs.String())
	}
}
