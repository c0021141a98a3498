package relay

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/tunnel/evloop"
	"golang.org/x/sys/unix"
)

// pairRun is one Pair on a loop of its own, as the tunnel drives it: both
// sockets registered edge-triggered, each event recorded, Run until over.
type pairRun struct {
	l    *evloop.Loop
	p    Pair
	toks [2]evloop.Token
	over bool
	done chan pairResult
}

type pairResult struct {
	up, down int64
	err      error
}

type pairSide struct {
	r    *pairRun
	side int
}

func (s *pairSide) Ready(ev uint32) {
	r := s.r
	if r.over {
		return
	}
	r.p.Event(s.side, ev)
	switch r.p.Run() {
	case Over:
		r.over = true
		r.l.Remove(r.toks[0])
		r.l.Remove(r.toks[1])
		r.p.Close()
		up, down := r.p.Moved()
		r.done <- pairResult{up, down, r.p.Err()}
	case Again:
		r.l.Later(s)
	}
}

// startPair relays a fresh loopback connection pair through a Pair: it
// returns the client's and the server's far ends. first is sent to the
// server before anything else; watch, if set, hears who spoke first.
func startPair(t *testing.T, e *Engine, first []byte, watch func(bool)) (client, server *net.TCPConn, r *pairRun) {
	t.Helper()
	return startPairAfter(t, e, first, watch, nil)
}

// startPairAfter is startPair that runs before, if set, on the far ends
// before the relay starts.
func startPairAfter(t *testing.T, e *Engine, first []byte, watch func(bool), before func(client, server *net.TCPConn)) (client, server *net.TCPConn, r *pairRun) {
	t.Helper()
	l, err := evloop.New()
	if err != nil {
		t.Fatal(err)
	}
	kit := e.NewKit()
	t.Cleanup(func() { l.Close(); kit.Free() })
	client, near := testkit.TCPPair(t)      // near: the proxy's client side
	farServer, server := testkit.TCPPair(t) // farServer: the proxy's server side
	cfd, sfd := bareFD(t, near), bareFD(t, farServer)
	if before != nil {
		before(client, server)
	}
	r = &pairRun{l: l, done: make(chan pairResult, 1)}
	var buf []byte
	if first != nil {
		buf = append(kit.GetBuf(), first...)
	}
	started := make(chan error, 1)
	l.Post(func() {
		r.p.Init(kit, cfd, sfd, buf, nil, [2]Can{}, watch)
		var err error
		if r.toks[0], err = l.Add(cfd, &pairSide{r, 0}); err == nil {
			r.toks[1], err = l.Add(sfd, &pairSide{r, 1})
		}
		started <- err
		(&pairSide{r, 0}).Ready(0)
	})
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	return client, server, r
}

// bareFD takes c's socket out of the runtime: a non-blocking duplicate,
// and c closed.
func bareFD(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(f uintptr) { fd, err = evloop.Dup(int(f)) })
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	return fd
}

func (r *pairRun) wait(t *testing.T) pairResult {
	t.Helper()
	select {
	case res := <-r.done:
		return res
	case <-time.After(10 * time.Second):
		t.Fatal("the relay did not end")
	}
	return pairResult{}
}

// Bytes cross both ways, small and bulk (the bulk by splice), the replayed
// first bytes go first, and EOF on each side reaches the other.
func TestPairCarriesBothWays(t *testing.T) {
	e := testEngine(t)
	client, server, r := startPair(t, e, []byte("first:"), nil)
	up, down := randomBytes(3<<20, 3), randomBytes(2<<20, 4)
	go func() { client.Write(up); client.CloseWrite() }()
	go func() { server.Write(down); server.CloseWrite() }()
	gotUp, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(gotUp, append([]byte("first:"), up...)) {
		t.Fatalf("server got %d bytes (%v), want the %d sent after the first 6", len(gotUp), err, len(up))
	}
	gotDown, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(gotDown, down) {
		t.Fatalf("client got %d bytes (%v), want the %d sent", len(gotDown), err, len(down))
	}
	res := r.wait(t)
	if res.err != nil || res.up != int64(len(up)+6) || res.down != int64(len(down)) {
		t.Fatalf("relay = up %d down %d err %v", res.up, res.down, res.err)
	}
	if e.Stats().Relays != 0 {
		t.Fatalf("%d relays counted after the end", e.Stats().Relays)
	}
}

// A half-closed client still gets the whole answer (the server replies
// only after the client's FIN).
func TestPairHalfClose(t *testing.T) {
	e := testEngine(t)
	client, server, r := startPair(t, e, nil, nil)
	client.Write([]byte("request"))
	client.CloseWrite()
	got, err := io.ReadAll(server)
	if err != nil || string(got) != "request" {
		t.Fatalf("server got %q (%v)", got, err)
	}
	reply := randomBytes(1<<20, 5)
	server.Write(reply)
	server.Close()
	gotReply, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(gotReply, reply) {
		t.Fatalf("client got %d bytes (%v), want %d", len(gotReply), err, len(reply))
	}
	if res := r.wait(t); res.err != nil {
		t.Fatalf("relay error %v", res.err)
	}
}

// The last bytes before a FIN leave with the relay's FIN in one segment
// (MSG_MORE, then the shutdown): a response that arrived with the server's
// close reaches the client as one segment, not two.
func TestPairLastBytesCarryTheFIN(t *testing.T) {
	e := testEngine(t)
	reply := []byte("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
	var segs uint32
	client, _, r := startPairAfter(t, e, nil, nil, func(client, server *net.TCPConn) {
		server.Write(reply)
		server.CloseWrite()
		segs = segsIn(t, client)
	})
	got, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("client got %q (%v), want %q", got, err, reply)
	}
	if n := segsIn(t, client) - segs; n != 1 {
		t.Errorf("the reply and the FIN came in %d segments, want 1", n)
	}
	client.Close()
	if res := r.wait(t); res.err != nil || res.down != int64(len(reply)) {
		t.Fatalf("relay = down %d err %v", res.down, res.err)
	}
}

// segsIn is the segments c's socket received (TCP_INFO).
func segsIn(t *testing.T, c *net.TCPConn) uint32 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	rc.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return info.Segs_in
}

// A reset on one side is passed to the other as a reset, both ways.
func TestPairResetPassedOn(t *testing.T) {
	for _, side := range []string{"server", "client"} {
		t.Run(side+" resets", func(t *testing.T) {
			e := testEngine(t)
			client, server, r := startPair(t, e, nil, nil)
			resetter, other := server, client
			if side == "client" {
				resetter, other = client, server
			}
			other.Write([]byte("x"))
			resetter.Read(make([]byte, 1))
			resetter.SetLinger(0)
			resetter.Close()
			other.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := other.Read(make([]byte, 1))
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("%s read = %v, want connection reset", map[bool]string{true: "client", false: "server"}[side == "server"], err)
			}
			if res := r.wait(t); !IsReset(res.err) {
				t.Fatalf("relay error %v, want a reset", res.err)
			}
		})
	}
}

// watch hears whose bytes came first.
func TestPairWatch(t *testing.T) {
	for _, serverFirst := range []bool{true, false} {
		e := testEngine(t)
		heard := make(chan bool, 2)
		client, server, r := startPair(t, e, nil, func(s bool) { heard <- s })
		speaker, listener := client, server
		if serverFirst {
			speaker, listener = server, client
		}
		speaker.Write([]byte("hello"))
		listener.Read(make([]byte, 5))
		if got := <-heard; got != serverFirst {
			t.Fatalf("watch heard server=%v, want %v", got, serverFirst)
		}
		client.Close()
		server.Close()
		r.wait(t)
		if len(heard) != 0 {
			t.Fatal("watch called twice")
		}
	}
}

// pipesAfter frees r's kit on its loop (after the relay ended) and returns
// how many pipes e still counts: none, unless one leaked.
func pipesAfter(t *testing.T, e *Engine, r *pairRun) int64 {
	t.Helper()
	done := make(chan struct{})
	r.l.Post(func() { r.p.kit.Free(); close(done) })
	<-done
	return e.Stats().Pipes
}

// Destinations that do not read for a while: what cannot be written waits
// (in a buffer, or in a pipe once bulk), nothing is lost or reordered, and
// a direction that has more than its share of one round goes on after the
// others had theirs. No pipe is left behind.
func TestPairSlowReaders(t *testing.T) {
	e := testEngine(t)
	client, server, r := startPair(t, e, []byte("first:"), nil)
	up, down := randomBytes(8<<20, 6), randomBytes(6<<20, 7)
	go func() { client.Write(up); client.CloseWrite() }()
	go func() { server.Write(down); server.CloseWrite() }()
	time.Sleep(200 * time.Millisecond) // both ways fill up
	gotDown := make(chan []byte, 1)
	go func() {
		client.SetReadDeadline(time.Now().Add(20 * time.Second))
		b, _ := io.ReadAll(client)
		gotDown <- b
	}()
	server.SetReadDeadline(time.Now().Add(20 * time.Second))
	gotUp, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(gotUp, append([]byte("first:"), up...)) {
		t.Fatalf("server got %d bytes (%v), want the %d sent after the first 6, in order", len(gotUp), err, len(up))
	}
	if b := <-gotDown; !bytes.Equal(b, down) {
		t.Fatalf("client got %d bytes, want the %d sent, in order", len(b), len(down))
	}
	res := r.wait(t)
	if res.err != nil || res.up != int64(len(up)+6) || res.down != int64(len(down)) {
		t.Fatalf("relay = up %d down %d err %v", res.up, res.down, res.err)
	}
	if n := pipesAfter(t, e, r); n != 0 {
		t.Errorf("%d pipes open after the relay ended and its kit was freed", n)
	}
}

// A relay aborted while bytes wait for a destination that does not read
// resets both sides, and closes the pipe that held them.
func TestPairAbortWithBytesWaiting(t *testing.T) {
	e := testEngine(t)
	client, server, r := startPair(t, e, nil, nil)
	go client.Write(randomBytes(8<<20, 8)) // more than the socket buffers hold
	time.Sleep(200 * time.Millisecond)
	if n := e.Stats().Pipes; n == 0 {
		t.Fatal("no pipe holds the bytes waiting for the server")
	}
	aborted := make(chan struct{})
	r.l.Post(func() {
		r.over = true
		r.l.Remove(r.toks[0])
		r.l.Remove(r.toks[1])
		r.p.Abort(errors.New("cut"), true)
		r.p.Close()
		close(aborted)
	})
	<-aborted
	for name, c := range map[string]*net.TCPConn{"client": client, "server": server} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.Copy(io.Discard, c); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s after the abort: %v, want a reset", name, err)
		}
	}
	if n := pipesAfter(t, e, r); n != 0 {
		t.Errorf("%d pipes open after the relay was aborted and its kit freed", n)
	}
	if n := e.Stats().Relays; n != 0 {
		t.Errorf("%d relays counted after the abort", n)
	}
}

// A Kit keeps the pipes its Pairs gave back for the next ones, and Trim
// closes them once none was taken again since the last Trim.
func TestKitTrim(t *testing.T) {
	e := testEngine(t)
	k := e.NewKit()
	defer k.Free()
	p := k.getPipe()
	if p.buf != nil {
		t.Skip("no pipes to be had")
	}
	k.putPipe(p)
	if k.Spares() != 1 || e.Stats().Pipes != 1 {
		t.Fatalf("spares %d, pipes %d after one was given back; want 1, 1", k.Spares(), e.Stats().Pipes)
	}
	k.putPipe(k.getPipe()) // taken again: kept by the next Trim
	if !k.Trim() || k.Spares() != 1 {
		t.Fatalf("Trim after a spare was taken: spares %d, want the pipe kept", k.Spares())
	}
	if k.Trim() || k.Spares() != 0 || e.Stats().Pipes != 0 {
		t.Fatalf("Trim with nothing taken since: spares %d, pipes %d; want all closed", k.Spares(), e.Stats().Pipes)
	}
}
