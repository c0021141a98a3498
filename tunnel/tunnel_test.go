package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
)

// fakeListener is a loopback listener whose every connection "was going" to
// dst, or fails OriginalDst with err.
type fakeListener struct {
	*net.TCPListener
	dst netip.AddrPort
	err error
}

func (f *fakeListener) Accept() (*net.TCPConn, error) { return f.AcceptTCP() }

func (f *fakeListener) OriginalDst(*net.TCPConn) (netip.AddrPort, error) { return f.dst, f.err }

func newFakeListener(t *testing.T, dst netip.AddrPort, err error) *fakeListener {
	t.Helper()
	ln, err2 := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err2 != nil {
		t.Fatal(err2)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeListener{TCPListener: ln, dst: dst, err: err}
}

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (s *syncBuffer) waitFor(t *testing.T, substr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(s.String(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("log never said %q; log:\n%s", substr, s.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startTunnel(t *testing.T, ln Listener, tun *Tunnel) *syncBuffer {
	t.Helper()
	logs := &syncBuffer{}
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
func echoServer(t *testing.T) (netip.AddrPort, *int32Counter) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := &int32Counter{}
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			accepted.add()
			go func() {
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort(), accepted
}

type int32Counter struct {
	mu sync.Mutex
	n  int
}

func (c *int32Counter) add() { c.mu.Lock(); c.n++; c.mu.Unlock() }
func (c *int32Counter) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

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
	logs.waitFor(t, "msg=conn")
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
	logs.waitFor(t, "msg=refused")
	if !strings.Contains(logs.String(), "not redirected") {
		t.Errorf("refusal not logged with its reason: %s", logs.String())
	}
	if n := accepted.get(); n != 0 {
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
	logs.waitFor(t, "connection refused")
}

func TestShutdownWaitsThenCuts(t *testing.T) {
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	tun := &Tunnel{}
	logs := &syncBuffer{}
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
func (o *countingObserver) Sniffed(_ sniff.Proto, outcome string, _ time.Duration) {
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
	logs.waitFor(t, "connection limit reached")
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
