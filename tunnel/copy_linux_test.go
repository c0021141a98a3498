package tunnel

import (
	"bytes"
	"io"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Out of file descriptors for pipes, the relay carries the bytes through a
// buffer instead of failing the connection.
func TestRelayWithoutPipes(t *testing.T) {
	for p, ok := pipes.Get().(*pipe); ok; p, ok = pipes.Get().(*pipe) { // empty the pool
		p.cleanup.Stop()
		closePipe([2]int{p.r, p.w})
	}
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
