package relay

import (
	"fmt"
	"os"

	"github.com/detour-proxy/detour/tunnel/evloop"
	"golang.org/x/sys/unix"
)

// Pair is a relay of two bare non-blocking sockets driven by their
// readiness events on one event loop's goroutine (package evloop): the
// Engine's relay without goroutines. The caller registers both sockets,
// tells the Pair what each event says (Event), and calls Run, which moves
// what can be moved now and says whether the relay is over, waits for
// events, or stopped short to let others run.
//
// The rules are Start's: small exchanges go through the loop's scratch
// buffer (read, then write at once: nothing is held unless the
// destination is full), a direction that fills the scratch buffer is bulk
// and moves by splice(2) through a pipe, EOF half-closes the other side,
// an error ends both, and a reset is passed on as a reset. A Pair holds a
// buffer or a pipe only while bytes wait for a full destination.
type Pair struct {
	kit   *Kit
	fd    [2]int  // client, server
	can   [2]Can  // what each socket's events allow
	flows [2]flow // client->server, server->client
	err   error   // the first error: the relay is over
	reset bool    // err came from a reset: pass it on
	shut  int     // flows whose destination has its FIN
	watch func(server bool)
}

// Can is what a socket's readiness events allow, as far as known: a read
// or a write that may not meet EAGAIN.
type Can uint8

// What a socket can do.
const (
	CanRead Can = 1 << iota
	CanWrite
	// PeerDone: the peer shut its side down, or the socket failed. An
	// edge-triggered socket reports that once: from then on reads are not
	// given up on a short count (see ShortRead).
	PeerDone
	// PeerFin: the peer's FIN came (EPOLLRDHUP without EPOLLERR): once the
	// bytes before it are read, the end of the stream follows.
	PeerFin
)

// CanFrom is what the epoll events ev allow.
func CanFrom(ev uint32) Can {
	var c Can
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		c |= CanRead
	}
	if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		c |= CanWrite
	}
	if ev&(unix.EPOLLRDHUP|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		c |= PeerDone
	}
	if ev&(unix.EPOLLRDHUP|unix.EPOLLERR) == unix.EPOLLRDHUP {
		c |= PeerFin
	}
	return c
}

// ShortRead updates c after a read that returned fewer bytes than asked:
// the socket's queue was empty, so the next read would meet EAGAIN; the
// next bytes bring an event of their own (edge-triggered sockets report
// every arrival). Not so once the peer is done: its FIN came with the last
// event, and no other will say so. This spares a read(2) per exchange, as
// nginx does.
func (c *Can) ShortRead() {
	if *c&PeerDone == 0 {
		*c &^= CanRead
	}
}

// flow is one direction of a Pair.
type flow struct {
	buf   []byte // bytes waiting for dst: buf[off:off+n]; nil when none
	off   int
	n     int
	p     *pipe // while bulk and bytes wait in it
	bulk  bool  // src once filled the scratch buffer: splice from now on
	eof   bool  // src is at EOF
	shut  bool  // dst has our FIN (or needs none: the relay is ending)
	moved int64
}

// Status is what Run found.
type Status uint8

const (
	// Waiting: nothing more moves until an event.
	Waiting Status = iota
	// Again: Run stopped after its share of bytes; call it again soon.
	Again
	// Over: both directions are done, or one failed (Err says). The caller
	// closes both sockets with Close.
	Over
)

// runBudget is how many bytes one Run moves before it lets the loop's other
// connections have their turn.
const runBudget = 1 << 20

// Kit is what the Pairs of one loop share: the scratch buffer, spare
// buffers and pipes. It is the loop goroutine's own.
type Kit struct {
	e       *Engine // counts pipes; its pipe2 hook, for tests
	scratch []byte
	bufs    [][]byte
	pipes   []*pipe
	taken   bool // a spare was taken since the last Trim
}

// maxSpare bounds the spare buffers and pipes a Kit keeps.
const maxSpare = 64

// NewKit returns a Kit whose pipes e counts (Stats.Pipes).
func (e *Engine) NewKit() *Kit {
	return &Kit{e: e, scratch: make([]byte, bufSize)}
}

// Init readies p to relay client and server (connected, non-blocking,
// registered with the caller's loop edge-triggered), which can do what
// can says (what their events since registration allowed and no EAGAIN
// took back). first, if any, is written to the server before anything
// else (the bytes sniffed), and down to the client (the server's first
// bytes that came with a proxy's reply): buffers from the Kit (GetBuf),
// which p owns from now on. watch, if not nil, hears once whose bytes were read first:
// the server's (true) or the client's.
func (p *Pair) Init(k *Kit, client, server int, first, down []byte, can [2]Can, watch func(server bool)) {
	*p = Pair{kit: k, fd: [2]int{client, server}, can: can, watch: watch}
	for i, b := range [2][]byte{first, down} {
		if len(b) > 0 {
			f := &p.flows[i]
			f.buf, f.n = b[:cap(b)], len(b)
		} else if b != nil {
			k.PutBuf(b)
		}
	}
	k.e.relays.Add(1)
}

// Scratch is the kit's scratch buffer, for the loop's own short-lived use
// outside Run (a proxy handshake's messages): what is in it is gone at the
// next Run.
func (k *Kit) Scratch() []byte { return k.scratch }

// Event records what an event on side (0 the client, 1 the server) allows.
func (p *Pair) Event(side int, ev uint32) { p.can[side] |= CanFrom(ev) }

// Run moves bytes both ways until both wait for events, its share is
// spent, or the relay is over.
func (p *Pair) Run() Status {
	budget := runBudget
	for p.err == nil {
		m0 := p.pump(0, &budget)
		m1 := p.pump(1, &budget)
		switch {
		case p.err != nil:
		case p.shut == 2:
			return Over
		case budget <= 0:
			return Again
		case !m0 && !m1:
			return Waiting
		}
	}
	return Over
}

// Err is the error that ended the relay, nil if both directions reached
// EOF; Moved the bytes each way.
func (p *Pair) Err() error { return p.err }

// Moved returns the bytes written client→server and server→client.
func (p *Pair) Moved() (up, down int64) { return p.flows[0].moved, p.flows[1].moved }

// Abort ends the relay with err; Close then closes both sockets, with a
// reset if reset is set.
func (p *Pair) Abort(err error, reset bool) {
	if p.err == nil {
		p.err, p.reset = err, reset
	}
}

// Close closes both sockets (with a reset if the relay ended on one or was
// aborted) and gives back what the flows hold. It leaves the descriptors'
// numbers free for reuse: the caller forgets them first.
func (p *Pair) Close() {
	for i := range p.flows {
		p.flows[i].release(p.kit)
	}
	for _, fd := range p.fd {
		evloop.Close(fd, p.reset)
	}
	p.kit.e.relays.Add(-1)
}

var dirNames = [2]string{"client->server", "server->client"}

// pump moves flow i while it can, within budget, and reports whether it
// did anything.
func (p *Pair) pump(i int, budget *int) bool {
	f := &p.flows[i]
	src, dst := i, 1-i
	moved := false
	for !f.shut && p.err == nil {
		if f.n > 0 {
			if p.can[dst]&CanWrite == 0 {
				return moved
			}
			n, err := f.drain(p.fd[dst])
			if err == unix.EAGAIN {
				p.can[dst] &^= CanWrite
				return moved
			}
			if err != nil {
				p.fail(i, f.syscall("write"), err)
				return true
			}
			f.moved += int64(n)
			*budget -= n
			moved = true
			if f.n == 0 {
				f.release(p.kit)
			}
			continue
		}
		if f.eof {
			p.half(i)
			return true
		}
		if p.can[src]&CanRead == 0 || *budget <= 0 {
			return moved
		}
		if !p.fill(i) {
			return moved
		}
		moved = true
	}
	return moved
}

// fill reads what src has for flow i: into the scratch buffer, written on
// at once (what does not fit waits in a buffer of its own), or, once bulk,
// spliced into a pipe. It reports false when src has nothing.
func (p *Pair) fill(i int) bool {
	f, src, dst := &p.flows[i], p.fd[i], p.fd[1-i]
	if f.bulk {
		return p.fillPipe(i)
	}
	n, err := evloop.Read(src, p.kit.scratch)
	switch {
	case err == unix.EINTR:
		return true
	case err == unix.EAGAIN:
		p.can[i] &^= CanRead
		return false
	case err != nil:
		p.fail(i, "read", err)
		return true
	case n == 0:
		f.eof = true
		return true
	}
	p.first(i)
	last := false
	if n == len(p.kit.scratch) {
		f.bulk = true
	} else {
		p.can[i].ShortRead()
		// The last bytes before src's FIN: the next read is its end, and
		// dst's FIN follows at once, in the same segment as these (one
		// packet less for the peer, as when a server's response and its
		// close arrive together).
		last = p.can[i]&PeerFin != 0
	}
	w := 0
	if p.can[1-i]&CanWrite != 0 {
		if last {
			w, err = evloop.WriteMore(dst, p.kit.scratch[:n])
		} else {
			w, err = evloop.Write(dst, p.kit.scratch[:n])
		}
		switch {
		case err == unix.EAGAIN:
			p.can[1-i] &^= CanWrite
			w = 0
		case err != nil:
			p.fail(i, "write", err)
			return true
		case w < n: // the send buffer is full
			p.can[1-i] &^= CanWrite
		}
	}
	f.moved += int64(w)
	if w < n {
		f.stash(p.kit, p.kit.scratch[w:n])
	}
	return true
}

// fillPipe splices what src has into flow i's pipe (taken from the kit).
func (p *Pair) fillPipe(i int) bool {
	f := &p.flows[i]
	if f.p == nil {
		f.p = p.kit.getPipe()
		if f.p.buf != nil { // no pipe to be had: stay with buffers
			p.kit.putPipe(f.p)
			f.p, f.bulk = nil, false
			return true
		}
	}
	n, err := rawSplice(p.fd[i], f.p.w, pipeSize)
	switch {
	case err == unix.EINTR:
		return true
	case err == unix.EAGAIN:
		p.can[i] &^= CanRead
		f.release(p.kit)
		return false
	case err != nil:
		p.fail(i, "splice", err)
		return true
	case n == 0:
		f.eof = true
		f.release(p.kit)
		return true
	}
	p.first(i)
	f.p.n = n
	f.n = n
	return true
}

// first tells Watch whose bytes came first.
func (p *Pair) first(i int) {
	if p.watch != nil {
		w := p.watch
		p.watch = nil
		w(i == 1)
	}
}

// half ends flow i at src's EOF: dst gets a FIN, unless the other flow is
// over too, when the close sends it (one syscall less).
func (p *Pair) half(i int) {
	f := &p.flows[i]
	f.shut = true
	p.shut++
	if p.shut == 2 {
		return
	}
	if err := evloop.ShutdownWrite(p.fd[1-i]); err != nil && err != unix.ENOTCONN {
		p.fail(i, "shutdown", err)
	}
}

// fail ends the relay with flow i's error.
func (p *Pair) fail(i int, op string, err error) {
	if p.err != nil {
		return
	}
	p.reset = true // an error mid-relay: neither side gets a clean end
	p.err = fmt.Errorf("%s: %w", dirNames[i], os.NewSyscallError(op, err))
}

// stash keeps b (copied) as bytes waiting for dst.
func (f *flow) stash(k *Kit, b []byte) {
	if f.buf == nil {
		f.buf = k.getBuf()
	}
	if len(b) > len(f.buf) {
		f.buf = make([]byte, len(b))
	}
	f.off, f.n = 0, copy(f.buf, b)
}

// drain writes what waits in f to dst.
func (f *flow) drain(dst int) (int, error) {
	if f.p != nil {
		n, err := rawSplice(f.p.r, dst, f.n)
		if err == nil {
			f.n -= n
			f.p.n = f.n
		}
		return n, err
	}
	n, err := evloop.Write(dst, f.buf[f.off:f.off+f.n])
	if err == nil {
		f.off += n
		f.n -= n
	}
	return n, err
}

func (f *flow) syscall(op string) string {
	if f.p != nil {
		return "splice"
	}
	return op
}

// release gives f's buffer or empty pipe back to the kit; a pipe with
// bytes in it cannot be reused and is closed.
func (f *flow) release(k *Kit) {
	if f.buf != nil {
		k.putBuf(f.buf)
		f.buf = nil
	}
	if f.p != nil {
		f.p.n = f.n
		k.putPipe(f.p)
		f.p = nil
	}
	f.off, f.n = 0, 0
}

// GetBuf returns a buffer of the relay's size (16 KiB), length 0.
func (k *Kit) GetBuf() []byte { return k.getBuf()[:0] }

// PutBuf gives back a buffer from GetBuf.
func (k *Kit) PutBuf(b []byte) { k.putBuf(b[:cap(b)]) }

func (k *Kit) getBuf() []byte {
	if n := len(k.bufs); n > 0 {
		b := k.bufs[n-1]
		k.bufs = k.bufs[:n-1]
		return b
	}
	return make([]byte, bufSize)
}

func (k *Kit) putBuf(b []byte) {
	if len(b) == bufSize && len(k.bufs) < maxSpare {
		k.bufs = append(k.bufs, b)
	}
}

// getPipe returns an empty pipe: a spare one, a new one, or (out of file
// descriptors) a pipe with a buffer, which the caller gives back.
func (k *Kit) getPipe() *pipe {
	if n := len(k.pipes); n > 0 {
		p := k.pipes[n-1]
		k.pipes = k.pipes[:n-1]
		k.taken = true
		return p
	}
	return k.e.getPipe()
}

// putPipe keeps an empty pipe as a spare (up to maxSpare), and closes a
// pipe with bytes in it, or one too many.
func (k *Kit) putPipe(p *pipe) {
	switch {
	case p.buf != nil:
		k.e.release(p)
	case p.n == 0 && len(k.pipes) < maxSpare:
		k.pipes = append(k.pipes, p)
	default:
		p.cleanup.Stop()
		k.e.closePipe([2]int{p.r, p.w})
	}
}

// Spares is how many spare pipes k keeps open.
func (k *Kit) Spares() int { return len(k.pipes) }

// Trim closes the spare pipes and drops the spare buffers when none was
// taken since the last Trim, and reports whether spares are left: a loop
// calls it every so often, so pipes a burst of bulk transfers left behind
// do not hold descriptors for ever, while a steady stream reuses its own.
func (k *Kit) Trim() bool {
	if k.taken {
		k.taken = false
		return len(k.pipes) > 0
	}
	k.Free()
	return false
}

// Free closes the kit's spare pipes and drops its spare buffers.
func (k *Kit) Free() {
	for _, p := range k.pipes {
		p.cleanup.Stop()
		k.e.closePipe([2]int{p.r, p.w})
	}
	k.pipes, k.bufs = nil, nil
}
