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
// from any goroutine (the relay itself on an error, Shutdown at the end of
// the grace period) and closes whatever is open.
type relay struct {
	client *net.TCPConn
	ctx    context.Context // cancelled by abort, so a dial in progress stops
	cancel context.CancelFunc

	mu     sync.Mutex
	server *net.TCPConn // set once dialled
	err    error        // the first error that ended the relay
	done   bool

	last atomic.Int64 // UnixNano of the last byte moved in either direction
}

func newRelay(parent context.Context, client *net.TCPConn) *relay {
	r := &relay{client: client}
	r.ctx, r.cancel = context.WithCancel(parent)
	return r
}

// setServer attaches the dialled connection; it reports false (and closes
// server) when the relay was aborted during the dial.
func (r *relay) setServer(server *net.TCPConn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		server.Close()
		return false
	}
	r.server = server
	return true
}

// abort ends the relay with err. A reset seen on either side is passed on
// as a reset (SO_LINGER 0) to both; anything else closes both normally. Only
// the first error is kept: the ones it causes in the other direction are
// consequences.
func (r *relay) abort(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	r.err = err
	r.cancel()
	reset := isReset(err) || errors.Is(err, errShutdown)
	for _, c := range []*net.TCPConn{r.client, r.server} {
		if c == nil {
			continue
		}
		if reset {
			c.SetLinger(0)
		}
		c.Close()
	}
}

// close ends a relay whose directions both finished cleanly.
func (r *relay) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.done {
		r.done = true
		r.cancel()
		r.client.Close()
		if r.server != nil {
			r.server.Close()
		}
	}
	return r.err
}

// run copies client→server and server→client at once until both directions
// have ended, and returns the bytes moved each way. A direction that reaches
// EOF half-closes its destination (FIN) and the other direction goes on; an
// error in either direction aborts both. The idle timeout, restarted by
// traffic in either direction, bounds the open and the half-closed state.
func (r *relay) run(idle time.Duration) (up, down int64, err error) {
	r.last.Store(time.Now().UnixNano())
	upc := make(chan int64, 1)
	go func() { upc <- r.direction(r.server, r.client, idle, "client->server") }()
	down = r.direction(r.client, r.server, idle, "server->client")
	up = <-upc
	return up, down, r.close()
}

// direction copies src to dst until EOF or an error. On EOF it half-closes
// dst; on an error it aborts the relay.
func (r *relay) direction(dst, src *net.TCPConn, idle time.Duration, name string) int64 {
	n, err := r.copy(dst, src, idle)
	if err == nil {
		// ENOTCONN: dst is gone already (it closed and answered our last
		// bytes with a reset); there is no one left to tell, and its own
		// direction reports whatever happened to it.
		if err = dst.CloseWrite(); err == nil || errors.Is(err, syscall.ENOTCONN) {
			return n
		}
	}
	if !errors.Is(err, errIdle) {
		err = fmt.Errorf("%s: %w", name, err)
	}
	r.abort(err)
	return n
}

// isReset reports whether err means the peer reset the connection (or one
// of its ends is gone for good), which is passed on as a reset.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
