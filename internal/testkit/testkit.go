// Package testkit holds the helpers the unit tests of several packages
// share: loopback TCP pairs, echo servers, a settable clock, a log buffer
// safe for concurrent writers, a goroutine-leak check, and the reading of
// a SOCKS5 request's address for the test SOCKS5 servers.
//
// Only tests import it. It knows nothing of detour's own packages, so any
// of them (sniff included, which stays a leaf) can use it.
package testkit

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Listen is a TCP listener on 127.0.0.1 at a free port, closed when the
// test ends.
func Listen(tb testing.TB) *net.TCPListener {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// TCPPair returns the two ends of a fresh loopback TCP connection, both
// closed when the test ends.
func TCPPair(tb testing.TB) (dialed, accepted *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	d, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		tb.Fatal(err)
	}
	a, err := ln.AcceptTCP()
	if err != nil {
		d.Close()
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close(); a.Close() })
	return d, a
}

// DeadPort is a loopback address nobody listens on: connecting to it is
// refused.
func DeadPort(tb testing.TB) netip.AddrPort {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return addr
}

// Server serves loopback TCP connections with handle, each in a goroutine
// of its own, and returns its address. When the test ends it stops
// accepting, closes every connection it accepted and waits for the
// handlers. The count is of the connections it accepted.
func Server(tb testing.TB, handle func(c *net.TCPConn)) (addr netip.AddrPort, accepted *atomic.Int32) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	accepted = new(atomic.Int32)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []*net.TCPConn
		done  bool
	)
	wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			accepted.Add(1)
			mu.Lock()
			if done {
				mu.Unlock()
				c.Close()
				return
			}
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		done = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort(), accepted
}

// EchoServer is a Server that echoes each connection until EOF.
func EchoServer(tb testing.TB) (addr netip.AddrPort, accepted *atomic.Int32) {
	tb.Helper()
	return Server(tb, func(c *net.TCPConn) { io.Copy(c, c) })
}

// CheckGoroutines fails the test if goroutines started during it are
// still running two seconds after it ends. Call it first, so its check runs
// after every other cleanup.
func CheckGoroutines(tb testing.TB) {
	before := runtime.NumGoroutine()
	tb.Cleanup(func() {
		deadline := time.Now().Add(2 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			buf := make([]byte, 1<<16)
			tb.Errorf("%d goroutines leaked:\n%s", n-before, buf[:runtime.Stack(buf, true)])
		}
	})
}

// RandomBytes is n bytes of a fixed pseudo-random stream for seed.
func RandomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

// Clock is a settable time, for code that takes a Now func. Safe for
// concurrent use.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock is a Clock set to a fixed instant.
func NewClock() *Clock { return ClockAt(time.Unix(1_700_000_000, 0)) }

// ClockAt is a Clock set to t.
func ClockAt(t time.Time) *Clock { return &Clock{t: t} }

// Now is the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock on by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// LogBuffer collects log output written from several goroutines.
type LogBuffer struct {
	mu     sync.Mutex
	b      bytes.Buffer
	writes int
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writes++
	return l.b.Write(p)
}

// Snapshot is everything written so far and the number of Write calls
// that wrote it, taken together.
func (l *LogBuffer) Snapshot() (string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String(), l.writes
}

// String is everything written so far.
func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Lines are the lines written so far that contain substr.
func (l *LogBuffer) Lines(substr string) []string {
	var out []string
	for line := range strings.SplitSeq(l.String(), "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return out
}

// WaitFor waits up to five seconds for substr to be written, and fails the
// test if it is not.
func (l *LogBuffer) WaitFor(tb testing.TB, substr string) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(l.String(), substr) {
		if time.Now().After(deadline) {
			tb.Fatalf("log never said %q; log:\n%s", substr, l.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
