// Package relay is detour's byte engine: it carries bytes both ways between
// a client's TCP connection and the server's until both directions are
// done, passes a FIN on as a half-close and a reset as a reset, and ends a
// connection on which nothing moved for the idle timeout.
//
// On Linux an idle connection holds no goroutine: each direction moves
// bytes while there are some (through a small pooled buffer, or by
// splice(2) through a pooled pipe once a transfer is bulk), then parks in
// one epoll set shared by every relay of an Engine, so a held connection
// costs its two sockets. Its syscalls are raw: on non-blocking sockets they
// return at once.
//
// It knows nothing of where the connections came from or go to: no
// routing, sniffing, dialling or access log. Its caller hands it two
// connected *net.TCPConns (bare, so splice works) and hears back once, with
// the bytes moved and the error that ended the relay.
package relay

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// errIdle ends a relay on which nothing moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// Engine runs relays: it owns the idle poller, the pools of buffers and
// pipes, and the pipe factory they share. The zero value is ready to use
// (its poller starts with the first relay); New starts the poller at once.
// Close stops it once no relay is left.
type Engine struct {
	sys // the platform's part: the poller, the pools, the pipe factory

	relays    atomic.Int64 // started, not yet done
	parked    atomic.Int64 // directions waiting in the poller
	pipeCount atomic.Int64 // pipes open, in use or pooled
}

// Stats is what an Engine holds at one moment.
type Stats struct {
	Relays int64 // relays started and not yet done
	Parked int64 // directions waiting for bytes without a goroutine
	Pipes  int64 // splice pipes open, in use or pooled (two descriptors each)
}

// Stats reports what e holds now.
func (e *Engine) Stats() Stats {
	return Stats{Relays: e.relays.Load(), Parked: e.parked.Load(), Pipes: e.pipeCount.Load()}
}

// Relay is one client connection relayed to its server, from Start until
// its done function is called.
type Relay struct {
	e              *Engine
	client, server *net.TCPConn

	mu   sync.Mutex
	err  error // the first error that ended the relay
	done bool

	last    atomic.Int64 // UnixNano of the last byte moved in either direction
	dirs    [2]direction // client->server, server->client
	pending atomic.Int32 // directions not yet ended
	idle    time.Duration
	timer   *time.Timer // the idle timeout
	onDone  func(up, down int64, err error)

	// onFirst, when set, hears which side's bytes moved first: the
	// server's (true) or the client's. For relays started without it, it
	// costs one untaken branch per read.
	onFirst func(server bool)
	first   atomic.Bool // a direction has moved bytes (with onFirst set)
}

// Start copies client→server and server→client at once until both
// directions have ended, then closes both connections and calls done, once,
// with the bytes moved each way and the error that ended the relay (nil
// when both directions reached EOF). A direction that reaches EOF
// half-closes its destination (FIN) and the other direction goes on; an
// error in either direction ends both, and a reset on one side is passed to
// the other as a reset. idle bounds the time with no byte moved either way,
// open or half-closed (an "idle timeout" error). done runs on whichever goroutine ended
// the relay: a direction's, the idle timer's, or Abort's caller's.
func (e *Engine) Start(client, server *net.TCPConn, idle time.Duration, done func(up, down int64, err error)) *Relay {
	return e.start(client, server, idle, nil, done)
}

// StartWatching is Start that also calls first, once, with whose bytes
// moved first: the server's (true) or the client's. Neither direction has
// written anything at that moment, so the server's coming first means it
// spoke before hearing the client. (Not on other systems than Linux: a copy
// there reports its bytes after writing them on, too late to tell.)
func (e *Engine) StartWatching(client, server *net.TCPConn, idle time.Duration, first func(server bool), done func(up, down int64, err error)) *Relay {
	return e.start(client, server, idle, first, done)
}

func (e *Engine) start(client, server *net.TCPConn, idle time.Duration, first func(server bool), done func(up, down int64, err error)) *Relay {
	e.startPoller()
	r := &Relay{e: e, client: client, server: server, idle: idle, onDone: done, onFirst: first}
	r.last.Store(time.Now().UnixNano())
	watch := first != nil
	r.dirs[0] = direction{r: r, src: client, dst: server, name: "client->server", watch: watch}
	r.dirs[1] = direction{r: r, src: server, dst: client, name: "server->client", watch: watch}
	r.pending.Store(2)
	e.relays.Add(1)
	r.mu.Lock() // checkIdle reads r.timer
	r.timer = time.AfterFunc(idle, r.checkIdle)
	r.mu.Unlock()
	go r.dirs[0].pump()
	go r.dirs[1].pump()
	return r
}

// Abort cuts the relay: both connections are reset (SO_LINGER 0) and done
// is called with err, unless the relay ended first. It may be called from
// any goroutine, more than once.
func (r *Relay) Abort(err error) { r.abort(err, true) }

// abort ends the relay with err, resetting both ends or closing them. Only
// the first error is kept: the ones it causes in the other direction are
// consequences. A direction parked waiting for bytes ends here (its closed
// socket will never wake it); a running one ends on its next syscall.
func (r *Relay) abort(err error, reset bool) {
	r.mu.Lock()
	if r.done {
		r.mu.Unlock()
		return
	}
	r.done = true
	r.err = err
	for _, c := range []*net.TCPConn{r.client, r.server} {
		if reset {
			c.SetLinger(0)
		}
		c.Close()
	}
	r.mu.Unlock()
	for i := range r.dirs {
		if d := &r.dirs[i]; d.state.CompareAndSwap(parked, ended) {
			r.e.parked.Add(-1)
			d.finish()
		}
	}
}

// close ends a relay whose directions both finished.
func (r *Relay) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.done {
		r.done = true
		r.client.Close()
		r.server.Close()
	}
	return r.err
}

// checkIdle runs when the idle timeout may have passed: it ends the relay
// if nothing moved for that long, else waits for the rest of it.
func (r *Relay) checkIdle() {
	quiet := time.Duration(time.Now().UnixNano() - r.last.Load())
	if quiet >= r.idle {
		r.abort(errIdle, false)
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
	r        *Relay
	src, dst *net.TCPConn
	name     string
	n        int64 // bytes moved; read once the direction ended
	state    atomic.Int32
	watch    bool // its first bytes are still to be reported to r.onFirst
	dirSys        // what the platform's pump keeps
}

// firstBytes is called by pump when d has read its first bytes, if d.watch:
// whichever direction gets here first tells r.onFirst whose bytes came
// first.
func (d *direction) firstBytes() {
	d.watch = false
	if d.r.first.CompareAndSwap(false, true) {
		d.r.onFirst(d == &d.r.dirs[1])
	}
}

// end finishes d after its copy stopped with err (nil at EOF): on EOF it
// half-closes dst; on an error it ends the relay.
func (d *direction) end(err error) {
	// When the other direction has ended already, the relay closes both
	// sockets as soon as this one finishes, and dst's close sends the FIN a
	// shutdown would (dst's own bytes were read to EOF, so nothing unread
	// turns the close into a reset): one syscall less per connection.
	if err == nil && d.r.pending.Load() > 1 {
		// ENOTCONN: dst is gone already (it closed and answered our last
		// bytes with a reset); there is no one left to tell, and its own
		// direction reports whatever happened to it.
		if err = d.dst.CloseWrite(); errors.Is(err, syscall.ENOTCONN) {
			err = nil
		}
	}
	if err != nil {
		d.r.abort(fmt.Errorf("%s: %w", d.name, err), IsReset(err))
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
	r.e.relays.Add(-1)
	r.onDone(r.dirs[0].n, r.dirs[1].n, err)
}

// IsReset reports whether err means the peer reset the connection (or one
// of its ends is gone for good), which a relay passes on as a reset.
func IsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
