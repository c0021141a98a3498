// Package tunnel carries each redirected connection from accept to close:
// it learns the original destination from the listener, dials it, and
// splices both directions until both sides are done, writing one access-log
// line per connection.
//
// It does not touch the kernel's redirection rules or socket options: the
// listener (package redirect) and the socket-mark Control function for
// outbound dials are handed in by the caller.
package tunnel

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Listener is where Serve takes connections from; *redirect.Listener is one.
type Listener interface {
	Accept() (*net.TCPConn, error)
	// OriginalDst is where c was going before the kernel redirected it. An
	// error means c must not be served (not redirected, or unknown).
	OriginalDst(c *net.TCPConn) (netip.AddrPort, error)
	Close() error
	Addr() net.Addr
}

// Tunnel serves redirected connections. The zero value is ready to use;
// Serve may be called for several listeners at once.
type Tunnel struct {
	// Control is set on every outbound socket before it connects; detour
	// uses it to set the socket mark the redirection rules exempt. Nil sets
	// nothing.
	Control func(network, address string, c syscall.RawConn) error
	// DialTimeout bounds connecting to the destination. Zero means 10s.
	DialTimeout time.Duration
	// IdleTimeout ends a connection on which no byte moved either way for
	// this long, open or half-closed. Zero means 5 minutes.
	IdleTimeout time.Duration
	// Log receives one access line per connection and the listener's
	// errors. Nil means slog.Default().
	Log *slog.Logger
	// Mode names the listener's mode in access lines ("redirect", "tproxy").
	Mode string

	mu        sync.Mutex
	listeners map[Listener]struct{}
	active    map[*relay]struct{}
	shutdown  bool
	wg        sync.WaitGroup
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("tunnel: server closed")

// Serve accepts connections from ln until ln is closed or Shutdown is called,
// serving each in its own goroutine. It always returns a non-nil error.
func (t *Tunnel) Serve(ln Listener) error {
	if !t.track(ln) {
		return ErrServerClosed
	}
	defer t.untrack(ln)
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if t.isShutdown() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors, or a connection aborted before
			// accept: wait a little and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t.log().Warn("accept failed; retrying", "listener", ln.Addr().String(), "error", err.Error(), "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		r := newRelay(context.Background(), c)
		if !t.add(r) {
			c.Close()
			return ErrServerClosed
		}
		go t.serveConn(ln, r)
	}
}

// serveConn is the data path of one connection, top to bottom.
func (t *Tunnel) serveConn(ln Listener, r *relay) {
	defer t.remove(r)
	start := time.Now()
	client := r.client
	log := t.log()

	// 1. Where was the client going?
	dst, err := ln.OriginalDst(client)
	if err != nil {
		r.abort(err)
		log.LogAttrs(r.ctx, slog.LevelWarn, "refused",
			slog.String("client", client.RemoteAddr().String()),
			slog.String("dst", addrOrEmpty(dst)),
			slog.String("mode", t.Mode),
			slog.String("error", err.Error()))
		return
	}

	// 2. Connect to it.
	var up, down int64
	server, err := t.dial(r.ctx, dst)
	if err == nil && r.setServer(server) {
		// 3. Splice until both sides are done.
		up, down, err = r.run(t.idleTimeout())
	} else if err != nil {
		// The client sees the failure as a reset, the closest a proxy
		// that already accepted can come to "connection refused".
		r.abort(syscall.ECONNRESET)
		if r.ctx.Err() != nil && errors.Is(err, context.Canceled) {
			err = errShutdown
		}
	} else {
		err = r.close() // aborted (shutdown) while dialling
	}

	// 4. One access line.
	log.LogAttrs(context.Background(), slog.LevelInfo, "conn",
		slog.String("client", client.RemoteAddr().String()),
		slog.String("dst", dst.String()),
		slog.String("mode", t.Mode),
		slog.Int64("up", up),
		slog.Int64("down", down),
		slog.Duration("duration", time.Since(start)),
		slog.String("error", errString(err)))
}

// dial connects to dst directly, with the socket mark set.
func (t *Tunnel) dial(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: t.dialTimeout(), Control: t.Control}
	c, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// Shutdown stops accepting on every listener Serve was given, waits for the
// connections in flight to finish until ctx is done, then resets the ones
// left. It returns ctx's error if any connection had to be cut.
func (t *Tunnel) Shutdown(ctx context.Context) error {
	t.mu.Lock()
	t.shutdown = true
	for ln := range t.listeners {
		ln.Close()
	}
	t.mu.Unlock()

	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	t.mu.Lock()
	for r := range t.active {
		r.abort(errShutdown)
	}
	t.mu.Unlock()
	<-done
	return ctx.Err()
}

// Active is the number of connections being served.
func (t *Tunnel) Active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.active)
}

func (t *Tunnel) track(ln Listener) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return false
	}
	if t.listeners == nil {
		t.listeners = make(map[Listener]struct{})
	}
	t.listeners[ln] = struct{}{}
	return true
}

func (t *Tunnel) untrack(ln Listener) {
	t.mu.Lock()
	delete(t.listeners, ln)
	t.mu.Unlock()
}

func (t *Tunnel) isShutdown() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.shutdown
}

func (t *Tunnel) add(r *relay) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return false
	}
	if t.active == nil {
		t.active = make(map[*relay]struct{})
	}
	t.active[r] = struct{}{}
	t.wg.Add(1)
	return true
}

func (t *Tunnel) remove(r *relay) {
	t.mu.Lock()
	delete(t.active, r)
	t.mu.Unlock()
	t.wg.Done()
}

func (t *Tunnel) log() *slog.Logger {
	if t.Log != nil {
		return t.Log
	}
	return slog.Default()
}

func (t *Tunnel) dialTimeout() time.Duration {
	if t.DialTimeout > 0 {
		return t.DialTimeout
	}
	return 10 * time.Second
}

func (t *Tunnel) idleTimeout() time.Duration {
	if t.IdleTimeout > 0 {
		return t.IdleTimeout
	}
	return 5 * time.Minute
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func addrOrEmpty(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
