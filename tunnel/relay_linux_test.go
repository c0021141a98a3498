package tunnel

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

	"golang.org/x/sys/unix"
)

// Out of file descriptors for pipes, the relay carries the bytes through a
// buffer instead of failing the connection.
func TestRelayWithoutPipes(t *testing.T) {
	emptyPipePool()
	pipe2 = func([]int, int) error { return unix.EMFILE }
	t.Cleanup(func() { pipe2 = unix.Pipe2 })

	client, server, done := startRelay(t, time.Minute)
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
	if p, ok := pipes.Get().(*pipe); ok {
		t.Fatalf("a pipe (%d, %d) in the pool, want none made", p.r, p.w)
	}
}

// emptyPipePool closes the pipes in the pool, so the next getPipe makes one.
func emptyPipePool() {
	for p, ok := pipes.Get().(*pipe); ok; p, ok = pipes.Get().(*pipe) {
		p.cleanup.Stop()
		closePipe([2]int{p.r, p.w})
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
	runtime.GC()
	runtime.GC()
	before := openFDs()
	var ps []*pipe
	for range 20 {
		ps = append(ps, getPipe())
	}
	if n := openFDs(); n < before+40 {
		t.Fatalf("%d open files after making 20 pipes, want at least %d", n, before+40)
	}
	for _, p := range ps {
		p.release()
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

// startRelayNoWait is startRelay without a goroutine waiting for the end;
// before is the goroutine count just before the relay started.
func startRelayNoWait(t *testing.T) (client, server *net.TCPConn, before int, done <-chan relayResult) {
	checkGoroutines(t)
	client, proxyClient := pair(t)
	proxyServer, server := pair(t)
	before = runtime.NumGoroutine()
	r := newRelay(proxyClient)
	r.setServer(proxyServer)
	ch := make(chan relayResult, 1)
	r.start(time.Minute, func(up, down int64, err error) { ch <- relayResult{up, down, err} })
	return client, server, before, ch
}

// An idle relay parks both directions in the idle poller: no goroutine
// (and no stack) is held for it until bytes come.
func TestRelayIdleHoldsNoGoroutine(t *testing.T) {
	client, server, before, done := startRelayNoWait(t)

	idle := func(when string) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > before {
			t.Fatalf("%s: %d goroutines held by an idle relay, want 0", when, n-before)
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
}

// Small exchanges go through a buffer; a direction that fills one whole
// buffer moves on to splice, with a pipe.
func TestRelaySplicesOnlyBulk(t *testing.T) {
	var made atomic.Int32
	pipe2 = func(fds []int, flags int) error { made.Add(1); return unix.Pipe2(fds, flags) }
	t.Cleanup(func() { pipe2 = unix.Pipe2 })
	emptyPipePool()

	client, server, done := startRelay(t, time.Minute)
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
	client, server, before, done := startRelayNoWait(t)

	bulk := randomBytes(4<<20, 4)
	go client.Write(bulk)
	if _, err := io.ReadFull(server, make([]byte, len(bulk))); err != nil {
		t.Fatal(err)
	}
	time.Sleep(bulkLinger / 4)
	if n := runtime.NumGoroutine() - before; n != 1 {
		t.Fatalf("%d goroutines just after a bulk transfer, want 1 (the bulk direction lingering)", n)
	}
	deadline := time.Now().Add(bulkLinger + 2*time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine() - before; n != 0 {
		t.Fatalf("%d goroutines %v after a bulk transfer, want 0", n, bulkLinger+2*time.Second)
	}
	// Still relaying after parking.
	client.Write([]byte("more"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "more" {
		t.Fatalf("after parking, server read %q (%v)", got, err)
	}
	client.Close()
	server.Close()
	if res := wait(t, done, 5*time.Second); res.up != int64(len(bulk))+4 {
		t.Fatalf("relay = up %d err %v, want %d", res.up, res.err, len(bulk)+4)
	}
}
