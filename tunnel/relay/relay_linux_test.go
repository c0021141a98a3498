package relay

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"golang.org/x/sys/unix"
)

// Out of file descriptors for pipes, the relay carries the bytes through a
// buffer instead of failing the connection.
func TestRelayWithoutPipes(t *testing.T) {
	e := testEngine(t)
	e.pipe2 = func([]int, int) error { return unix.EMFILE }

	client, server, _, done := startRelay(t, e, time.Minute)
	up, down := randomBytes(3<<20, 1), randomBytes(2<<20, 2)
	go func() { client.Write(up); client.CloseWrite() }()
	go func() { server.Write(down); server.CloseWrite() }()
	gotUp, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(gotUp, up) {
		t.Fatalf("server got %d bytes (%v), want the %d sent", len(gotUp), err, len(up))
	}
	gotDown, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(gotDown, down) {
		t.Fatalf("client got %d bytes (%v), want the %d sent", len(gotDown), err, len(down))
	}
	if res := wait(t, done, 5*time.Second); res.err != nil || res.up != int64(len(up)) || res.down != int64(len(down)) {
		t.Fatalf("relay = up %d down %d err %v", res.up, res.down, res.err)
	}
	if p, ok := e.pipes.Get().(*pipe); ok {
		t.Fatalf("a pipe (%d, %d) in the pool, want none made", p.r, p.w)
	}
	if n := e.Stats().Pipes; n != 0 {
		t.Fatalf("%d pipes open, want none", n)
	}
}

// Pipes left in the pool are closed once the pool drops them (after a
// couple of garbage collections), so a burst does not hold fds for ever.
func TestPipesClosedWhenDropped(t *testing.T) {
	openFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skipf("cannot count open files: %v", err)
		}
		return len(ents)
	}
	e := testEngine(t)
	runtime.GC()
	runtime.GC()
	before := openFDs()
	var ps []*pipe
	for range 20 {
		ps = append(ps, e.getPipe())
	}
	if n := e.Stats().Pipes; n != 20 {
		t.Fatalf("Stats().Pipes = %d after making 20, want 20", n)
	}
	if n := openFDs(); n < before+40 {
		t.Fatalf("%d open files after making 20 pipes, want at least %d", n, before+40)
	}
	for _, p := range ps {
		e.release(p)
	}
	ps = nil
	deadline := time.Now().Add(5 * time.Second)
	for openFDs() > before && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if n := openFDs(); n > before {
		t.Fatalf("%d open files 5s after the pipes went back to the pool, want %d", n, before)
	}
}

// startRelayCounting is startRelay that also returns the goroutine count
// just before the relay started.
func startRelayCounting(t *testing.T) (client, server *net.TCPConn, e *Engine, before int, done <-chan relayResult) {
	e = testEngine(t)
	client, proxyClient := testkit.TCPPair(t)
	proxyServer, server := testkit.TCPPair(t)
	before = runtime.NumGoroutine()
	ch := make(chan relayResult, 1)
	e.Start(proxyClient, proxyServer, time.Minute, func(up, down int64, err error) { ch <- relayResult{up, down, err} })
	return client, server, e, before, ch
}

// An idle relay parks both directions in the idle poller: no goroutine
// (and no stack) is held for it until bytes come.
func TestRelayIdleHoldsNoGoroutine(t *testing.T) {
	client, server, e, before, done := startRelayCounting(t)

	idle := func(when string) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Fatalf("%s: %d goroutines held by an idle relay, want 0", when, n-before)
		}
		if s := e.Stats(); s.Parked != 2 || s.Relays != 1 {
			t.Fatalf("%s: stats %+v, want 1 relay with 2 directions parked", when, s)
		}
	}
	idle("before any byte")
	for i := range 3 { // woken, moves the bytes, parks again
		client.Write([]byte{byte(i)})
		server.Write([]byte{byte(i), byte(i)})
		b := make([]byte, 2)
		if _, err := io.ReadFull(server, b[:1]); err != nil || b[0] != byte(i) {
			t.Fatalf("server read %v (%v)", b[:1], err)
		}
		if _, err := io.ReadFull(client, b); err != nil || b[1] != byte(i) {
			t.Fatalf("client read %v (%v)", b, err)
		}
		idle(fmt.Sprintf("after exchange %d", i))
	}
	client.Close()
	server.Close()
	if res := wait(t, done, 5*time.Second); res.up != 3 || res.down != 6 {
		t.Fatalf("relay = up %d down %d err %v; want 3 and 6", res.up, res.down, res.err)
	}
	if s := e.Stats(); s.Parked != 0 || s.Relays != 0 {
		t.Fatalf("stats after the end %+v, want nothing held", s)
	}
}

// Small exchanges go through a buffer; a direction that fills one whole
// buffer moves on to splice, with a pipe.
func TestRelaySplicesOnlyBulk(t *testing.T) {
	var made atomic.Int32
	e := testEngine(t)
	e.pipe2 = func(fds []int, flags int) error { made.Add(1); return unix.Pipe2(fds, flags) }

	client, server, _, done := startRelay(t, e, time.Minute)
	buf := make([]byte, 1000)
	for range 20 {
		client.Write(buf)
		if _, err := io.ReadFull(server, buf); err != nil {
			t.Fatal(err)
		}
		server.Write(buf)
		if _, err := io.ReadFull(client, buf); err != nil {
			t.Fatal(err)
		}
	}
	if n := made.Load(); n != 0 {
		t.Fatalf("%d pipes made for 1000-byte exchanges, want none", n)
	}
	bulk := randomBytes(4<<20, 3)
	go func() { client.Write(bulk); client.CloseWrite() }()
	got, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(got, bulk) {
		t.Fatalf("server got %d bytes (%v), want the %d sent", len(got), err, len(bulk))
	}
	if made.Load() == 0 {
		t.Fatal("no pipe made for a 4 MiB transfer, want splice")
	}
	server.Close()
	if res := wait(t, done, 5*time.Second); res.up != 20000+int64(len(bulk)) || res.down != 20000 {
		t.Fatalf("relay = up %d down %d err %v", res.up, res.down, res.err)
	}
}

// A bulk direction that pauses keeps its goroutine for bulkLinger, then
// parks like any idle one.
func TestRelayBulkParksAfterLinger(t *testing.T) {
	client, server, e, _, done := startRelayCounting(t)
	waitFor(t, "both directions parked before any byte", func() bool {
		n, _ := relayGoroutines()
		return n == 0 && e.Stats().Parked == 2
	})

	bulk := randomBytes(4<<20, 4)
	sent := 0
	for attempt := 1; ; attempt++ {
		go client.Write(bulk)
		sent += len(bulk)
		if _, err := io.ReadFull(server, make([]byte, len(bulk))); err != nil {
			t.Fatal(err)
		}
		read := time.Now()
		// The bytes ran out: the bulk direction waits for more in the
		// runtime's poller, holding its goroutine, for at least
		// bulkLinger/2 after its last bytes (the server read them
		// before read). Until then it must not be parked.
		var n, waiting int
		for time.Since(read) < bulkLinger/2 {
			if n, waiting = relayGoroutines(); n != 1 || waiting == 1 {
				break
			}
			time.Sleep(time.Millisecond)
		}
		parked := e.Stats().Parked
		if time.Since(read) < bulkLinger/2 {
			if n != 1 || waiting != 1 || parked != 1 {
				t.Fatalf("just after a bulk transfer: %d relay goroutines (%d waiting for bytes), %d directions parked; want the bulk direction lingering and the other parked", n, waiting, parked)
			}
			break
		}
		// This goroutine was held up (a loaded machine) until the linger
		// may have ended: what it saw says nothing. Again.
		if attempt == 3 {
			t.Fatalf("held up past bulkLinger/2 after each of %d bulk transfers: cannot tell whether the direction lingered", attempt)
		}
		t.Logf("attempt %d: held up %v after the transfer, transferring again", attempt, time.Since(read))
	}
	waitFor(t, "the bulk direction parked after lingering", func() bool {
		n, _ := relayGoroutines()
		return n == 0 && e.Stats().Parked == 2
	})
	// Still relaying after parking.
	client.Write([]byte("more"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "more" {
		t.Fatalf("after parking, server read %q (%v)", got, err)
	}
	client.Close()
	server.Close()
	if res := wait(t, done, 5*time.Second); res.up != int64(sent)+4 {
		t.Fatalf("relay = up %d err %v, want %d", res.up, res.err, sent+4)
	}
}

// relayGoroutines counts the goroutines in a relay direction's pump, and
// how many of them wait in the runtime's poller (a bulk direction
// lingering). Read from their stacks: runtime.NumGoroutine against a
// baseline also counts the test's own goroutines and the previous test's
// still on their way out (its tRunner, its engine's poller loop).
func relayGoroutines() (n, waiting int) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("\ngithub.com/detour-proxy/detour/tunnel/relay.(*direction).pump(")) {
			n++
			if bytes.Contains(g, []byte("[IO wait")) {
				waiting++
			}
		}
	}
	return n, waiting
}

// waitFor polls cond until it holds, failing the test after bulkLinger+5s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(bulkLinger + 5*time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("not %s after %v", what, bulkLinger+5*time.Second)
		}
	}
}

// StartWatching reports whose bytes moved first, once.
func TestRelayReportsFirstSpeaker(t *testing.T) {
	for _, serverFirst := range []bool{true, false} {
		t.Run(fmt.Sprint("server first ", serverFirst), func(t *testing.T) {
			e := testEngine(t)
			client, proxyClient := testkit.TCPPair(t)
			proxyServer, server := testkit.TCPPair(t)
			heard := make(chan bool, 2)
			done := make(chan relayResult, 1)
			e.StartWatching(proxyClient, proxyServer, time.Minute, func(s bool) { heard <- s },
				func(up, down int64, err error) { done <- relayResult{up, down, err} })
			first, second := server, client
			if !serverFirst {
				first, second = client, server
			}
			first.Write([]byte("hello"))
			io.ReadFull(second, make([]byte, 5))
			second.Write([]byte("reply"))
			io.ReadFull(first, make([]byte, 5))
			client.Close()
			server.Close()
			wait(t, done, 5*time.Second)
			if got := <-heard; got != serverFirst {
				t.Fatalf("first speaker reported as server=%v, want %v", got, serverFirst)
			}
			if len(heard) != 0 {
				t.Fatal("first speaker reported twice")
			}
		})
	}
}
