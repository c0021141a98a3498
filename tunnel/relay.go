package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// errIdle ends a connection on which nothing moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// errShutdown ends a connection still open when the shutdown grace period ran out.
var errShutdown = errors.New("closed by shutdown")

// relay is one client connection from accept to close. abort may be called
// from any goroutine (a direction on an error, the idle timer, Shutdown at
// the end of the grace period) and closes whatever is open.
//
// Once started, a relay runs without a goroutine of its own: each direction
// runs while its source has bytes and, on Linux, parks in the idle poller
// (see direction.pump) when it has none, so an idle connection costs its
// sockets and this struct, not goroutine stacks. The direction that ends
// last reports the relay done.
type relay struct {
	client *net.TCPConn

	mu         sync.Mutex
	server     *net.TCPConn       // set once dialled
	dialCancel context.CancelFunc // stops the dial in progress, if any
	err        error              // the first error that ended the relay
	done       bool

	last    atomic.Int64 // UnixNano of the last byte moved in either direction
	dirs    [2]direction // client->server, server->client
	pending atomic.Int32 // directions not yet ended
	idle    time.Duration
	timer   *time.Timer // the idle timeout
	onDone  func(up, down int64, err error)

	// onFirst, when set before start, hears which side's bytes moved
	// first: the server's (true) or the client's. The tunnel sets it only
	// on connections that may teach its silent cache, so for all others it
	// costs one untaken branch per read.
	onFirst func(server bool)
	first   atomic.Bool // a direction has moved bytes (with onFirst set)
}

func newRelay(client *net.TCPConn) *relay { return &relay{client: client} }

// dialContext returns the context for a dial on r's behalf: bounded by
// timeout, and cancelled by abort (then reported as errShutdown by
// dialEnded). It reports false, and no context, if r is aborted already.
// The caller calls dialEnded when the dial is over.
func (r *relay) dialContext(parent context.Context, timeout time.Duration) (context.Context, bool) {
	ctx, cancel := context.WithTimeout(parent, timeout)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		cancel()
		return nil, false
	}
	r.dialCancel = cancel
	return ctx, true
}

// dialEnded releases the dial's context; a dial cut by abort becomes
// errShutdown.
func (r *relay) dialEnded(err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dialCancel()
	r.dialCancel = nil
	if r.done && errors.Is(err, context.Canceled) {
		return errShutdown
	}
	return err
}

// setServer attaches the dialled connection; it reports false (and closes
// server, as abort would have) when the relay was aborted during the dial.
func (r *relay) setServer(server *net.TCPConn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		if passesReset(r.err) {
			server.SetLinger(0)
		}
		server.Close()
		return false
	}
	r.server = server
	return true
}

// abort ends the relay with err. A reset seen on either side is passed on
// as a reset (SO_LINGER 0) to both; anything else closes both normally. Only
// the first error is kept: the ones it causes in the other direction are
// consequences. A direction parked waiting for bytes ends here (its closed
// socket will never wake it); a running one ends on its next syscall.
func (r *relay) abort(err error) {
	r.mu.Lock()
	if r.done {
		r.mu.Unlock()
		return
	}
	r.done = true
	r.err = err
	if r.dialCancel != nil {
		r.dialCancel()
	}
	reset := passesReset(err)
	for _, c := range []*net.TCPConn{r.client, r.server} {
		if c == nil {
			continue
		}
		if reset {
			c.SetLinger(0)
		}
		c.Close()
	}
	r.mu.Unlock()
	for i := range r.dirs {
		if d := &r.dirs[i]; d.state.CompareAndSwap(parked, ended) {
			d.finish()
		}
	}
}

// close ends a relay whose directions both finished cleanly.
func (r *relay) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.done {
		r.done = true
		r.client.Close()
		if r.server != nil {
			r.server.Close()
		}
	}
	return r.err
}

// start copies client→server and server→client at once until both
// directions have ended, then calls done with the bytes moved each way and
// the error that ended the relay, if any. A direction that reaches EOF
// half-closes its destination (FIN) and the other direction goes on; an
// error in either direction aborts both. The idle timeout, restarted by
// traffic in either direction, bounds the open and the half-closed state.
func (r *relay) start(idle time.Duration, done func(up, down int64, err error)) {
	r.idle, r.onDone = idle, done
	r.last.Store(time.Now().UnixNano())
	watch := r.onFirst != nil
	r.dirs[0] = direction{r: r, src: r.client, dst: r.server, name: "client->server", watch: watch}
	r.dirs[1] = direction{r: r, src: r.server, dst: r.client, name: "server->client", watch: watch}
	r.pending.Store(2)
	r.mu.Lock() // checkIdle reads r.timer
	r.timer = time.AfterFunc(idle, r.checkIdle)
	r.mu.Unlock()
	go r.dirs[0].pump()
	go r.dirs[1].pump()
}

// checkIdle runs when the idle timeout may have passed: it aborts the relay
// if nothing moved for that long, else waits for the rest of it.
func (r *relay) checkIdle() {
	quiet := time.Duration(time.Now().UnixNano() - r.last.Load())
	if quiet >= r.idle {
		r.abort(errIdle)
		return
	}
	r.mu.Lock()
	r.timer.Reset(r.idle - quiet)
	r.mu.Unlock()
}

// The states of a direction.
const (
	running int32 = iota // a goroutine is moving its bytes
	parked               // waiting for its source, without a goroutine
	ended
)

// direction is one way of a relay.
type direction struct {
	r        *relay
	src, dst *net.TCPConn
	name     string
	n        int64 // bytes moved; read once the direction ended
	state    atomic.Int32
	watch    bool // its first bytes are still to be reported to r.onFirst
	sys           // what the platform's pump keeps
}

// firstBytes is called by pump when d has read its first bytes, if d.watch:
// whichever direction gets here first tells r.onFirst whose bytes came
// first. Neither direction has written anything yet at that moment, so the
// server's bytes coming first mean it spoke before hearing the client.
func (d *direction) firstBytes() {
	d.watch = false
	if d.r.first.CompareAndSwap(false, true) {
		d.r.onFirst(d == &d.r.dirs[1])
	}
}

// end finishes d after its copy stopped with err (nil at EOF): on EOF it
// half-closes dst; on an error it aborts the relay.
func (d *direction) end(err error) {
	if err == nil {
		// ENOTCONN: dst is gone already (it closed and answered our last
		// bytes with a reset); there is no one left to tell, and its own
		// direction reports whatever happened to it.
		if err = d.dst.CloseWrite(); errors.Is(err, syscall.ENOTCONN) {
			err = nil
		}
	}
	if err != nil {
		d.r.abort(fmt.Errorf("%s: %w", d.name, err))
	}
	d.state.Store(ended)
	d.finish()
}

// finish counts d as ended; the last direction ends the relay.
func (d *direction) finish() {
	d.release()
	r := d.r
	if r.pending.Add(-1) > 0 {
		return
	}
	r.timer.Stop()
	err := r.close()
	r.onDone(r.dirs[0].n, r.dirs[1].n, err)
}

// passesReset reports whether a relay ended by err resets both of its ends
// (SO_LINGER 0) rather than closing them.
func passesReset(err error) bool {
	return isReset(err) || errors.Is(err, errShutdown)
}

// isReset reports whether err means the peer reset the connection (or one
// of its ends is gone for good), which is passed on as a reset.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
