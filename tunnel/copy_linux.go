package tunnel

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// copy moves src to dst until EOF or an error: splice(2) from src into a
// pipe, then from the pipe into dst, so the bytes never enter user space
// (unless no pipe can be had: see pipe).
//
// The pipe is taken only when src has bytes (the first splice into an
// empty pipe returns EAGAIN otherwise, and the pipe goes back to the pool
// before the goroutine parks), so an idle connection holds its two sockets
// and nothing else. While bytes keep coming the direction keeps its pipe
// and each round is two splices; the deadlines are re-armed only every
// idle/16, not per round:
//
//   - the read deadline is half the idle timeout. When it fires the pipe is
//     empty, so nothing is lost: if anything moved either way within the
//     idle timeout the copy goes on, otherwise the connection is idle.
//   - the write deadline is the idle timeout and ends the copy: the bytes
//     left in the pipe cannot be delivered.
func (r *relay) copy(dst, src *net.TCPConn, idle time.Duration) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		total int64
		p     *pipe // nil while src is idle
		armed time.Time
		serr  error // the splice's own error, from inside the callbacks
		eof   bool
	)
	defer func() { p.release() }()
	fill := func(fd uintptr) bool {
		if p == nil {
			p = getPipe()
		}
		for {
			n, err := p.fill(int(fd))
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				p.release() // nothing queued: park without a pipe
				p = nil
				return false
			case err != nil:
				serr = os.NewSyscallError("splice", err)
			case n == 0:
				eof = true
			}
			return true
		}
	}
	drain := func(fd uintptr) bool {
		for p.n > 0 {
			n, err := p.drain(int(fd))
			switch {
			case err == unix.EINTR:
			case err == unix.EAGAIN:
				return false // dst's send buffer is full: wait for room
			case err != nil:
				serr = os.NewSyscallError("splice", err)
				return true
			default:
				total += int64(n)
			}
		}
		return true
	}
	for {
		if now := time.Now(); now.Sub(armed) > idle/16 {
			if err := src.SetReadDeadline(now.Add(idle / 2)); err != nil {
				return total, err
			}
			if err := dst.SetWriteDeadline(now.Add(idle)); err != nil {
				return total, err
			}
			armed = now
		}
		err := srcRC.Read(fill)
		switch {
		case err == nil && serr != nil:
			return total, opError("read", src, serr)
		case eof:
			return total, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			if time.Now().UnixNano()-r.last.Load() >= int64(idle) {
				return total, errIdle
			}
			armed = time.Time{} // something moved the other way: go on
			continue
		case err != nil:
			return total, err
		}
		err = dstRC.Write(drain)
		r.last.Store(time.Now().UnixNano())
		switch {
		case err == nil && serr != nil:
			return total, opError("write", dst, serr)
		case errors.Is(err, os.ErrDeadlineExceeded):
			return total, errIdle // the bytes left in the pipe are lost
		case err != nil:
			return total, err
		}
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
// buffer when no pipe can be had (out of file descriptors), so a busy
// gateway slows down rather than failing connections.
type pipe struct {
	r, w int    // the pipe's ends; unused with buf
	buf  []byte // the fallback: read(2) and write(2) through user space
	off  int    // buf[off:off+n] is still to be written
	n    int    // bytes in the pipe (or buf) not yet written to dst

	cleanup runtime.Cleanup // closes the pipe once it is unreachable
}

// fill moves what src has queued into the empty p; 0 bytes means EOF.
func (p *pipe) fill(src int) (int, error) {
	var n int
	var err error
	if p.buf != nil {
		n, err = unix.Read(src, p.buf)
		p.off = 0
	} else {
		var m int64
		m, err = unix.Splice(src, nil, p.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		n = int(m)
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
		n, err = unix.Write(dst, p.buf[p.off:p.off+p.n])
		p.off += max(n, 0)
	} else {
		var m int64
		m, err = unix.Splice(p.r, nil, dst, nil, p.n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		n = int(m)
	}
	if err != nil {
		return 0, err
	}
	p.n -= n
	return n, nil
}

// fallbackBuf is the size of the buffer used when pipe2 fails.
const fallbackBuf = 64 << 10

// pipe2 makes a pipe; tests replace it to run out of them.
var pipe2 = unix.Pipe2

// pipes keeps empty pipes for reuse. Pipes the pool lets go (it drops
// what sits unused across garbage collections) are closed by their
// cleanup, so a burst of transfers does not hold its pipes for ever.
var pipes sync.Pool

// getPipe returns an empty pipe: from the pool, new, or (out of file
// descriptors) a buffer.
func getPipe() *pipe {
	if p, ok := pipes.Get().(*pipe); ok {
		return p
	}
	var fds [2]int
	if err := pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return &pipe{buf: make([]byte, fallbackBuf)}
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	p := &pipe{r: fds[0], w: fds[1]}
	p.cleanup = runtime.AddCleanup(p, closePipe, fds)
	return p
}

// release puts p back in the pool if it is an empty pipe, else closes it.
// A nil p is fine.
func (p *pipe) release() {
	switch {
	case p == nil || p.buf != nil:
	case p.n == 0:
		pipes.Put(p)
	default:
		p.cleanup.Stop()
		closePipe([2]int{p.r, p.w})
	}
}

func closePipe(fds [2]int) {
	syscall.Close(fds[0])
	syscall.Close(fds[1])
}
