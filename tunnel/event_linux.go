package tunnel

import (
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/tunnel/evloop"
	"github.com/detour-proxy/detour/tunnel/relay"
)

// The transparent data path on detour's own event loops (package evloop):
// a connection is accepted, sniffed, connected and relayed on bare
// descriptors by the loop's goroutine, in the stages serveConn names
// (evconn_linux.go), with no goroutine of its own and no registration in
// the Go runtime's poller. One loop per CPU the runtime uses; each takes
// connections from every listener, the kernel waking one loop per
// connection. What a loop cannot do without blocking (a route through an
// upstream group) is handed to serveFrom on a goroutine.

// descListener is a Listener whose connections the event loops can take as
// bare descriptors: *redirect.Listener.
type descListener interface {
	Listener
	SyscallConn() (syscall.RawConn, error)
	// OriginalDstFD is OriginalDst for a bare accepted socket fd whose
	// peer is peer.
	OriginalDstFD(fd int, peer netip.AddrPort) (netip.AddrPort, error)
}

// eventLoop is one of the Tunnel's loops, with what its connections share.
type eventLoop struct {
	t    *Tunnel
	l    *evloop.Loop
	kit  *relay.Kit
	trim *evloop.Timer // while the kit keeps spare pipes
	line connInfo      // the access line of the connection ending now (evConn.info)
}

// trimEvery is how often a loop closes the spare pipes its relays did not
// take again since the last time.
const trimEvery = 2 * time.Second

// relayEnded is called when one of lp's relays ends: spare pipes left in the
// kit are trimmed once unused for trimEvery.
func (lp *eventLoop) relayEnded() {
	if lp.trim == nil && lp.kit.Spares() > 0 {
		lp.trim = lp.l.AfterFunc(trimEvery, lp.trimKit)
	}
}

func (lp *eventLoop) trimKit() {
	if lp.kit.Trim() {
		lp.l.Reset(lp.trim, trimEvery)
		return
	}
	lp.trim = nil
}

// evListener is a listener served by the loops: the loops accept on a
// duplicate of its descriptor, theirs to take out of their epoll sets and
// close when the listener stops.
type evListener struct {
	ln      descListener
	fd      int
	toks    []evloop.Token // per loop
	accepts []*evAccept    // per loop
	done    chan struct{}  // closed once no loop accepts on it
	once    sync.Once
}

// errNoLoops: the loops cannot serve this listener; Serve accepts on
// goroutines instead.
var errNoLoops = errors.New("no event loops")

// startLoops makes the loops, once. It reports false when they cannot run.
func (t *Tunnel) startLoops() bool {
	t.evOnce.Do(func() {
		for range max(runtime.GOMAXPROCS(0), 1) {
			l, err := evloop.New()
			if err != nil {
				t.log().Warn("event loop unavailable; serving connections on goroutines", "error", err.Error())
				break
			}
			t.loops = append(t.loops, &eventLoop{t: t, l: l, kit: t.engine.NewKit()})
		}
	})
	return len(t.loops) > 0
}

// serveLoops serves ln on the event loops until the listener is stopped
// (Shutdown). It returns errNoLoops, having served nothing, when the loops
// cannot take ln.
func (t *Tunnel) serveLoops(ln descListener) error {
	if t.NoEventLoops || !t.startLoops() {
		return errNoLoops
	}
	el := &evListener{ln: ln, fd: -1, done: make(chan struct{})}
	if err := el.open(t.loops); err != nil {
		t.log().Warn("event loops cannot take the listener; serving it on goroutines", "listener", ln.Addr().String(), "error", err.Error())
		return errNoLoops
	}
	t.mu.Lock()
	if t.shutdown {
		t.mu.Unlock()
		el.stop(t.loops)
		return ErrServerClosed
	}
	t.evListeners[ln] = el
	t.mu.Unlock()
	<-el.done
	return ErrServerClosed
}

// open duplicates ln's descriptor and registers it with every loop.
func (el *evListener) open(loops []*eventLoop) error {
	rc, err := el.ln.SyscallConn()
	if err != nil {
		return err
	}
	var derr error
	if err := rc.Control(func(fd uintptr) { el.fd, derr = evloop.Dup(int(fd)) }); err != nil {
		return err
	}
	if derr != nil {
		return derr
	}
	el.toks = make([]evloop.Token, len(loops))
	for i, lp := range loops {
		errc := make(chan error, 1)
		a := &evAccept{el: el, lp: lp, i: i}
		el.accepts = append(el.accepts, a)
		if err := lp.l.Post(func() {
			var err error
			el.toks[i], err = lp.l.AddListener(el.fd, a)
			errc <- err
		}); err != nil {
			return err
		}
		if err := <-errc; err != nil {
			el.stop(loops[:i])
			return err
		}
	}
	return nil
}

// stop takes the listener out of the loops' epoll sets, waits until they
// did, and closes the duplicate: no loop accepts on it after this.
func (el *evListener) stop(loops []*eventLoop) {
	el.once.Do(func() {
		var wg sync.WaitGroup
		for i, lp := range loops {
			wg.Add(1)
			if lp.l.Post(func() {
				if a := el.accepts[i]; !a.paused {
					lp.l.Delete(el.toks[i], el.fd)
				}
				el.accepts[i].stopped = true
				wg.Done()
			}) != nil {
				wg.Done()
			}
		}
		wg.Wait()
		if el.fd >= 0 {
			evloop.Close(el.fd, false)
		}
		close(el.done)
	})
}

// stopLoops ends the loops once no connection is left on them.
func (t *Tunnel) stopLoops() {
	for _, lp := range t.loops {
		lp.l.Close()
		lp.kit.Free()
	}
	t.loops = nil
}

// evAccept takes connections from one listener on one loop.
type evAccept struct {
	el      *evListener
	lp      *eventLoop
	i       int           // the loop's index in el
	paused  bool          // out of the epoll set for wait
	stopped bool          // the listener stopped: never back in
	wait    time.Duration // the pause after the last failed accept
}

// acceptBatch bounds the connections one loop takes in one round, so a
// burst is shared among the loops and does not starve connections already
// served.
const acceptBatch = 32

func (a *evAccept) Ready(uint32) {
	for range acceptBatch {
		fd, peer, err := evloop.Accept(a.el.fd)
		switch err {
		case nil:
			a.wait = 0
			a.lp.serve(a.el.ln, fd, peer)
		case syscall.EAGAIN:
			return
		case syscall.EINTR, syscall.ECONNABORTED:
		default:
			a.failed(err)
			return
		}
	}
}

// failed pauses accepting after a failed accept (out of file descriptors,
// out of memory), a little longer each time in a row, as net/http does: the
// listener stays readable, and trying at once again would spin.
func (a *evAccept) failed(err error) {
	t := a.lp.t
	a.wait = min(max(2*a.wait, 5*time.Millisecond), time.Second)
	if ok, held := t.acceptLog.allow(time.Now()); ok {
		t.log().Warn("accept failed; retrying", "listener", a.el.ln.Addr().String(), "error", err.Error(),
			"retry_in", a.wait, "suppressed", held)
	}
	a.paused = true
	l := a.lp.l
	l.Delete(a.el.toks[a.i], a.el.fd)
	l.AfterFunc(a.wait, func() {
		a.paused = false
		if a.stopped {
			return
		}
		tok, err := l.AddListener(a.el.fd, a)
		if err != nil {
			a.failed(err)
			return
		}
		a.el.toks[a.i] = tok
	})
}
