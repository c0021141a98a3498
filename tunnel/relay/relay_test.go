package relay

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
)

// errCut is what the tests abort relays with.
var errCut = errors.New("cut by the test")

// testEngine is an Engine of the test's own, closed when the test ends.
// A test (not a benchmark) also checks then that every goroutine it started
// is gone, the engine's poller included.
func testEngine(tb testing.TB) *Engine {
	if t, ok := tb.(*testing.T); ok {
		testkit.CheckGoroutines(t)
	}
	e := New()
	tb.Cleanup(func() { e.Close() })
	return e
}

type relayResult struct {
	up, down int64
	err      error
}

// startRelay wires app client ⇄ relay ⇄ app server over loopback and runs
// the relay on e (a fresh testEngine if nil) in the background.
func startRelay(t *testing.T, e *Engine, idle time.Duration) (client, server *net.TCPConn, r *Relay, done <-chan relayResult) {
	t.Helper()
	if e == nil {
		e = testEngine(t)
	}
	client, proxyClient := testkit.TCPPair(t)
	proxyServer, server := testkit.TCPPair(t)
	ch := make(chan relayResult, 1)
	r = e.Start(proxyClient, proxyServer, idle, func(up, down int64, err error) { ch <- relayResult{up, down, err} })
	return client, server, r, ch
}

func wait(t *testing.T, done <-chan relayResult, within time.Duration) relayResult {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(within):
		t.Fatalf("relay still running after %v", within)
		return relayResult{}
	}
}

var randomBytes = testkit.RandomBytes

func TestRelayBothWaysByteExact(t *testing.T) {
	client, server, _, done := startRelay(t, nil, time.Minute)
	upData, downData := randomBytes(8<<20, 1), randomBytes(8<<20, 2)

	got := make(chan [32]byte, 2)
	read := func(c *net.TCPConn) {
		h := sha256.New()
		io.Copy(h, c)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- sum
	}
	go read(server)
	go read(client)
	for _, w := range []struct {
		c    *net.TCPConn
		data []byte
	}{{client, upData}, {server, downData}} {
		go func() {
			w.c.Write(w.data)
			w.c.CloseWrite()
		}()
	}
	a, b := <-got, <-got
	want := map[[32]byte]bool{sha256.Sum256(upData): true, sha256.Sum256(downData): true}
	if !want[a] || !want[b] || a == b {
		t.Fatal("data arrived corrupted")
	}
	res := wait(t, done, 5*time.Second)
	if res.err != nil || res.up != int64(len(upData)) || res.down != int64(len(downData)) {
		t.Fatalf("relay = up %d down %d err %v; want %d %d nil", res.up, res.down, res.err, len(upData), len(downData))
	}
}

// The regression test every relay needs (tcpproxy's TestBufferedClose): the
// client half-closes after its request; the reply still arrives whole.
func TestRelayHalfClose(t *testing.T) {
	client, server, _, done := startRelay(t, nil, time.Minute)
	reply := randomBytes(1<<20, 3)
	client.Write([]byte("request"))
	client.CloseWrite()

	req, err := io.ReadAll(server) // ends only if the FIN was passed on
	if err != nil || string(req) != "request" {
		t.Fatalf("server read %q, %v", req, err)
	}
	server.Write(reply)
	server.Close()

	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("client got %d bytes (%v), want %d", len(got), err, len(reply))
	}
	if res := wait(t, done, 5*time.Second); res.err != nil {
		t.Fatalf("relay error: %v", res.err)
	}
}

func TestRelayPassesResets(t *testing.T) {
	for _, from := range []string{"server", "client"} {
		t.Run("from "+from, func(t *testing.T) {
			client, server, _, done := startRelay(t, nil, time.Minute)
			resetter, victim := server, client
			if from == "client" {
				resetter, victim = client, server
			}
			// Make sure the relay is connected end to end first.
			client.Write([]byte("x"))
			if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			resetter.SetLinger(0)
			resetter.Close()
			victim.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := victim.Read(make([]byte, 1))
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("%s side read error = %v, want connection reset", map[bool]string{true: "client", false: "server"}[victim == client], err)
			}
			if res := wait(t, done, 5*time.Second); !IsReset(res.err) {
				t.Fatalf("relay error = %v, want a reset", res.err)
			}
		})
	}
}

func TestRelayIdleTimeout(t *testing.T) {
	const idle = 200 * time.Millisecond
	e := testEngine(t)
	client, proxyClient := testkit.TCPPair(t)
	proxyServer, _ := testkit.TCPPair(t)
	done := make(chan relayResult, 1)
	// Taken before Start, whose clock starts inside: after it, a test
	// goroutine held up before reading the clock saw the timeout early.
	start := time.Now()
	e.Start(proxyClient, proxyServer, idle, func(up, down int64, err error) { done <- relayResult{up, down, err} })
	res := wait(t, done, 10*idle)
	if !errors.Is(res.err, errIdle) {
		t.Fatalf("relay error = %v, want idle timeout", res.err)
	}
	if d := time.Since(start); d < idle {
		t.Fatalf("idle connection closed after %v, before the idle timeout %v", d, idle)
	}
	client.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := client.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client read after idle close = %v, want EOF", err)
	}
}

// A peer that half-closed and then went silent must not hold the relay
// forever.
func TestRelayIdleHalfClosed(t *testing.T) {
	const idle = 200 * time.Millisecond
	client, server, _, done := startRelay(t, nil, idle)
	client.CloseWrite()
	if _, err := io.ReadAll(server); err != nil { // FIN passed on
		t.Fatal(err)
	}
	if res := wait(t, done, 10*idle); !errors.Is(res.err, errIdle) {
		t.Fatalf("relay error = %v, want idle timeout", res.err)
	}
}

// Traffic in one direction keeps the connection alive even when the other
// direction is closed: a slow download after a half-close completes even
// though it lasts many idle timeouts.
func TestRelaySlowDownloadOutlivesIdle(t *testing.T) {
	// Generous margins: the gap between writes is a fifth of the idle
	// timeout. Still, a loaded machine can hold the writer up for longer
	// than the idle timeout, and then the relay is right to end; such a
	// run says nothing and is repeated (at most 3 times).
	const idle = 400 * time.Millisecond
	for attempt := 1; ; attempt++ {
		gap, err := slowDownload(t, idle)
		if err == nil {
			return
		}
		if gap < idle || attempt == 3 {
			t.Fatalf("%v (longest wait between the writer's bytes %v, idle timeout %v)", err, gap, idle)
		}
		t.Logf("attempt %d: %v, but the writer was held up %v (idle timeout %v): again", attempt, err, gap, idle)
	}
}

// slowDownload runs one relay with the idle timeout idle and a server that
// writes 20 bytes, one every idle/5, after the client half-closed. It
// reports what went wrong, if anything, and the longest time before the
// relay ended that it had no new byte to move (from Start to the first
// write, then between writes).
func slowDownload(t *testing.T, idle time.Duration) (gap time.Duration, err error) {
	e := testEngine(t)
	client, proxyClient := testkit.TCPPair(t)
	proxyServer, server := testkit.TCPPair(t)
	done := make(chan relayResult, 1)
	var ended time.Time
	writes := []time.Time{time.Now()} // before Start: the relay's clock starts inside
	e.Start(proxyClient, proxyServer, idle, func(up, down int64, err error) {
		ended = time.Now()
		done <- relayResult{up, down, err}
	})
	client.CloseWrite()
	io.ReadAll(server)
	written := make(chan []time.Time, 1)
	go func() {
		for i := range 20 { // 20 × 80 ms = 1.6 s = 4 idle timeouts
			if _, err := server.Write([]byte{byte(i)}); err != nil {
				break
			}
			writes = append(writes, time.Now())
			time.Sleep(idle / 5)
		}
		server.Close()
		written <- append(writes, time.Now())
	}()
	got, rerr := io.ReadAll(client)
	res := wait(t, done, 5*time.Second)
	writes = <-written
	for i := 1; i < len(writes) && writes[i-1].Before(ended); i++ {
		gap = max(gap, writes[i].Sub(writes[i-1]))
	}
	switch {
	case rerr != nil || len(got) != 20:
		return gap, fmt.Errorf("client got %d bytes (%v), want 20; relay = down %d err %v", len(got), rerr, res.down, res.err)
	case res.err != nil || res.down != 20:
		return gap, fmt.Errorf("relay = down %d err %v; want 20 nil", res.down, res.err)
	}
	return gap, nil
}

func TestRelayAbortWhileRunning(t *testing.T) {
	client, _, r, done := startRelay(t, nil, time.Minute)
	time.Sleep(20 * time.Millisecond)
	r.Abort(errCut)
	if res := wait(t, done, 5*time.Second); !errors.Is(res.err, errCut) {
		t.Fatalf("err = %v, want the abort's", res.err)
	}
	r.Abort(errors.New("again")) // a second abort changes nothing
	client.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read = %v, want reset after an abort", err)
	}
}

func BenchmarkRelayLoopback(b *testing.B) {
	e := testEngine(b)
	client, proxyClient := testkit.TCPPair(b)
	proxyServer, server := testkit.TCPPair(b)
	e.Start(proxyClient, proxyServer, time.Minute, func(int64, int64, error) {})
	buf := make([]byte, 256<<10)
	go io.Copy(io.Discard, server)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for b.Loop() {
		client.Write(buf)
	}
	b.StopTimer()
	client.Close()
}
