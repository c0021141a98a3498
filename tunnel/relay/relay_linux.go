package relay

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/tunnel/evloop"
	"golang.org/x/sys/unix"
)

// sys is an Engine's part on Linux: the idle poller, the pools, the pipe
// factory.
type sys struct {
	poller poller
	bufs   sync.Pool // *pipe with a buffer, empty
	pipes  sync.Pool // *pipe with a splice pipe, empty
	// pipe2 makes a pipe; nil means unix.Pipe2. Tests set it to count
	// pipes or to run out of them.
	pipe2 func(fds []int, flags int) error
}

// New returns an Engine whose idle poller runs already (one goroutine, one
// epoll descriptor), so a caller counting them sees them before its first
// relay.
func New() *Engine {
	e := &Engine{}
	e.startPoller()
	return e
}

// startPoller starts the idle poller if it is not running. Without it
// (epoll unavailable), directions wait in the runtime's poller, holding
// their goroutines.
func (e *Engine) startPoller() { e.poller.start() }

// Close stops e's idle poller and closes its descriptor. Call it once no
// relay is running and none will start.
func (e *Engine) Close() error { return e.poller.close() }

// dirSys is what a direction keeps on Linux.
type dirSys struct {
	srcRC, dstRC syscall.RawConn
	p            *pipe     // nil while src is idle
	bulk         bool      // src once filled a whole buffer: splice from now on
	linger       time.Time // while bulk: until when to wait for src in the runtime's poller
	id           uint64    // the direction's key in the idle poller; 0 until parked
	polled       bool      // src is in the poller's epoll set
}

// pump moves d.src to d.dst while src has bytes. Small exchanges (requests,
// responses, keystrokes) go through a pooled buffer, read(2) then write(2).
// Once src fills a whole buffer the direction is bulk and moves by
// splice(2), from src into a pooled pipe and from the pipe into dst, so the
// bytes never enter user space (unless no pipe can be had: see pipe).
//
// When src has nothing queued the pipe or buffer goes back to its pool, the
// direction parks in the idle poller and this goroutine ends; the poller
// starts a new one when src is readable (bytes, EOF or an error). A bulk
// direction first waits up to bulkLinger in the runtime's poller. Only a
// full dst (its peer not reading) keeps a goroutine waiting with bytes in
// hand. The relay's idle timer ends directions stuck either way.
func (d *direction) pump() {
	if d.srcRC == nil && !d.setup() {
		return
	}
	var rd round
	fill := func(fd uintptr) bool { return d.fill(int(fd), &rd) }
	drain := func(fd uintptr) bool { return d.drain(int(fd), &rd) }
	for {
		if d.bulk {
			d.renewLinger()
		}
		err := d.srcRC.Read(fill)
		switch {
		case rd.away:
			return // d is not ours any more
		case errors.Is(err, os.ErrDeadlineExceeded) && !d.linger.IsZero():
			// Nothing came for bulkLinger: park at the next pause.
			d.linger = time.Time{}
			if err := d.src.SetReadDeadline(time.Time{}); err != nil {
				d.end(err)
				return
			}
			d.bulk = false // until it fills a whole buffer again
			continue
		case err != nil:
			d.end(err)
			return
		case rd.serr != nil:
			d.end(opError("read", d.src, rd.serr))
			return
		case rd.eof:
			d.end(nil)
			return
		}
		if d.watch {
			d.firstBytes()
		}
		err = d.dstRC.Write(drain)
		d.r.last.Store(time.Now().UnixNano())
		switch {
		case err != nil:
			d.end(err)
			return
		case rd.serr != nil:
			d.end(opError("write", d.dst, rd.serr))
			return
		}
	}
}

// round is what one pump call learns inside the RawConn callbacks. It is
// the goroutine's own: once d is parked, another pump may run on d.
type round struct {
	away bool  // parked: d belongs to the poller now
	eof  bool  // src is at EOF
	serr error // the read, write or splice's own error
}

// setup takes both sockets' RawConns, on d's first run.
func (d *direction) setup() bool {
	var err error
	if d.srcRC, err = d.src.SyscallConn(); err == nil {
		d.dstRC, err = d.dst.SyscallConn()
	}
	if err != nil {
		d.end(err)
		return false
	}
	return true
}

// renewLinger moves a bulk direction's read deadline on when half of
// bulkLinger is gone: a deadline per round would cost more than it saves.
func (d *direction) renewLinger() {
	if now := time.Now(); d.linger.Sub(now) < bulkLinger/2 {
		d.linger = now.Add(bulkLinger)
		d.src.SetReadDeadline(d.linger)
	}
}

// fill runs inside src's RawConn.Read: it moves what src has queued into
// d's pipe or buffer, and reports false to wait in the runtime's poller.
// With nothing queued it gives the pipe back and parks d in the idle
// poller (rd.away), unless a bulk transfer is lingering.
func (d *direction) fill(fd int, rd *round) bool {
	e := d.r.e
	if d.bulk && d.p != nil && d.p.buf != nil {
		e.release(d.p) // a buffer, but bulk: try for a pipe
		d.p = nil
	}
	if d.p == nil {
		if d.bulk {
			d.p = e.getPipe()
		} else {
			d.p = e.getBuf()
		}
	}
	for {
		n, err := d.p.fill(fd)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			e.release(d.p) // nothing queued: park without a pipe
			d.p = nil
			if !d.linger.IsZero() {
				return false // a bulk transfer pausing: wait here, see bulkLinger
			}
			rd.away = e.poller.park(d, fd)
			return rd.away // false: no poller, wait in the runtime's
		case err != nil:
			rd.serr = os.NewSyscallError(d.p.syscall("read"), err)
		case n == 0:
			rd.eof = true
		case d.p.buf != nil && n == len(d.p.buf):
			d.bulk = true
		}
		return true
	}
}

// drain runs inside dst's RawConn.Write: it moves d's bytes on, and reports
// false to wait for room when dst's send buffer is full.
func (d *direction) drain(fd int, rd *round) bool {
	for d.p.n > 0 {
		n, err := d.p.drain(fd)
		switch {
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			return false
		case err != nil:
			rd.serr = os.NewSyscallError(d.p.syscall("write"), err)
			return true
		default:
			d.n += int64(n)
		}
	}
	return true
}

// bulkLinger is how long a bulk direction waits for more bytes in the
// runtime's poller before it parks in the idle poller. Parking costs an
// epoll_ctl and a goroutine per pause, and a bulk transfer pauses whenever
// detour outpaces the sender; waiting in place keeps those pauses cheap.
// Bulk directions are few, so the goroutines this holds are too.
const bulkLinger = time.Second

// release gives back what d holds once it has ended.
func (d *direction) release() {
	e := d.r.e
	e.release(d.p)
	d.p = nil
	if d.id != 0 {
		e.poller.forget(d.id)
	}
}

// poller waits, in one epoll set, for the sources of parked directions to
// become readable, and starts a goroutine to pump each one that does.
// Entries are one-shot: a direction is armed again each time it parks. Its
// key is an id, not the descriptor: a closed socket leaves the epoll set by
// itself, and its number may be reused before a stale event is read.
type poller struct {
	once sync.Once
	epfd int           // -1 if the poller could not start
	file *os.File      // epfd, as the runtime's poller waits on it
	gone chan struct{} // closed when loop has returned
	mu   sync.Mutex
	dirs map[uint64]*direction
	next uint64
}

func (p *poller) start() bool {
	p.once.Do(func() {
		p.epfd = -1
		fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			return
		}
		// The epoll descriptor waits in the runtime's own poller like a
		// socket (an epoll set is readable while it has events), so the
		// goroutine it wakes runs at once, on the same thread.
		var rc syscall.RawConn
		if err = unix.SetNonblock(fd, true); err == nil {
			p.file = os.NewFile(uintptr(fd), "detour-idle-poller")
			rc, err = p.file.SyscallConn()
		}
		if err != nil {
			unix.Close(fd)
			return
		}
		p.epfd, p.dirs, p.gone = fd, make(map[uint64]*direction), make(chan struct{})
		go p.loop(rc)
	})
	return p.epfd >= 0
}

// park hands d to the poller until its source fd is readable. It is called
// from inside d.src's RawConn.Read, so fd is open; it reports false (d
// still running) when d cannot be parked.
func (p *poller) park(d *direction, fd int) bool {
	if !p.start() {
		return false
	}
	if d.id == 0 {
		p.mu.Lock()
		p.next++
		d.id = p.next
		p.dirs[d.id] = d
		p.mu.Unlock()
	}
	op := unix.EPOLL_CTL_MOD
	if !d.polled {
		op = unix.EPOLL_CTL_ADD
		d.polled = true
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(d.id), Pad: int32(d.id >> 32)}
	// Parked before armed: the event may come at once, and the poller
	// only wakes a parked direction.
	parkedCount := &d.r.e.parked
	parkedCount.Add(1)
	d.state.Store(parked)
	if err := unix.EpollCtl(p.epfd, op, fd, &ev); err != nil {
		if !d.state.CompareAndSwap(parked, running) {
			return true // aborted meanwhile: ended, not ours
		}
		parkedCount.Add(-1)
		d.polled = op == unix.EPOLL_CTL_MOD
		return false
	}
	return true
}

// close stops the loop (its wait on the closed file fails), closes the
// epoll descriptor and waits for the loop to return. A poller that never
// started has nothing to close.
func (p *poller) close() error {
	p.once.Do(func() { p.epfd = -1 }) // never start after this
	if p.file == nil {
		return nil
	}
	err := p.file.Close()
	<-p.gone
	return err
}

// forget drops an ended direction.
func (p *poller) forget(id uint64) {
	p.mu.Lock()
	delete(p.dirs, id)
	p.mu.Unlock()
}

func (p *poller) loop(rc syscall.RawConn) {
	defer close(p.gone)
	events := make([]unix.EpollEvent, 256)
	var ready []*direction
	collect := func(fd uintptr) bool {
		n, err := unix.EpollWait(int(fd), events, 0)
		if err != nil || n <= 0 {
			return false // nothing yet (or EINTR): wait for the set to be readable
		}
		p.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if d := p.dirs[id]; d != nil && d.state.CompareAndSwap(parked, running) {
				d.r.e.parked.Add(-1)
				ready = append(ready, d)
			}
		}
		p.mu.Unlock()
		return true
	}
	for {
		if err := rc.Read(collect); err != nil { // no deadline: closed
			return
		}
		for i, d := range ready {
			go d.pump()
			ready[i] = nil
		}
		ready = ready[:0]
	}
}

func opError(op string, c *net.TCPConn, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// pipeSize is the capacity asked of every pipe: one splice moves up to
// this much (1 MiB is the default /proc/sys/fs/pipe-max-size; a smaller
// pipe still works, with more rounds).
const pipeSize = 1 << 20

// pipe carries one direction's bytes from src to dst: a splice pipe, or a
// buffer, for small exchanges and when no pipe can be had (out of file
// descriptors: a busy gateway slows down rather than failing connections).
type pipe struct {
	r, w int    // the pipe's ends; unused with buf
	buf  []byte // read(2) and write(2) through user space instead
	off  int    // buf[off:off+n] is still to be written
	n    int    // bytes in the pipe (or buf) not yet written to dst

	cleanup runtime.Cleanup // closes the pipe once it is unreachable
}

// syscall names what p moves bytes with, for errors: op, or splice.
func (p *pipe) syscall(op string) string {
	if p.buf != nil {
		return op
	}
	return "splice"
}

// fill moves what src has queued into the empty p; 0 bytes means EOF.
func (p *pipe) fill(src int) (int, error) {
	var n int
	var err error
	if p.buf != nil {
		n, err = evloop.Read(src, p.buf)
		p.off = 0
	} else {
		n, err = rawSplice(src, p.w, pipeSize)
	}
	if err != nil {
		return 0, err
	}
	p.n = n
	return n, nil
}

// drain moves what it can of p's bytes into dst.
func (p *pipe) drain(dst int) (int, error) {
	var n int
	var err error
	if p.buf != nil {
		n, err = evloop.Write(dst, p.buf[p.off:p.off+p.n])
		p.off += max(n, 0)
	} else {
		n, err = rawSplice(p.r, dst, p.n)
	}
	if err != nil {
		return 0, err
	}
	p.n -= n
	return n, nil
}

// The relay's own syscalls are raw (evloop's, and rawSplice): on
// non-blocking descriptors they return at once, so they skip the runtime's
// bookkeeping for a syscall that may block (entersyscall, exitsyscall), and
// sysmon does not hand the goroutine's P to another thread while the kernel
// runs TCP for a write.

func rawSplice(in, out, n int) (int, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(n), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// bufSize is the size of the buffers for small exchanges (and for bulk
// when pipe2 fails).
const bufSize = 16 << 10

// getBuf returns an empty buffer.
func (e *Engine) getBuf() *pipe {
	if p, ok := e.bufs.Get().(*pipe); ok {
		return p
	}
	return &pipe{buf: make([]byte, bufSize)}
}

// getPipe returns an empty pipe: from the pool, new, or (out of file
// descriptors) a buffer. Pipes the pool lets go (it drops what sits unused
// across garbage collections) are closed by their cleanup, so a burst of
// transfers does not hold its pipes for ever.
func (e *Engine) getPipe() *pipe {
	if p, ok := e.pipes.Get().(*pipe); ok {
		return p
	}
	pipe2 := e.pipe2
	if pipe2 == nil {
		pipe2 = unix.Pipe2
	}
	var fds [2]int
	if err := pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return e.getBuf()
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	p := &pipe{r: fds[0], w: fds[1]}
	e.pipeCount.Add(1)
	p.cleanup = runtime.AddCleanup(p, e.closePipe, fds)
	return p
}

// release puts p back in its pool if it is empty, else closes it (a pipe
// with bytes in it cannot be reused). A nil p is fine.
func (e *Engine) release(p *pipe) {
	switch {
	case p == nil:
	case p.buf != nil:
		if p.n == 0 {
			e.bufs.Put(p)
		}
	case p.n == 0:
		e.pipes.Put(p)
	default:
		p.cleanup.Stop()
		e.closePipe([2]int{p.r, p.w})
	}
}

func (e *Engine) closePipe(fds [2]int) {
	syscall.Close(fds[0])
	syscall.Close(fds[1])
	e.pipeCount.Add(-1)
}
