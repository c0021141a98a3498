package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/relay"
)

// Shutdown stops accepting on every listener Serve was given, waits for the
// connections in flight to finish until ctx is done, then resets the ones
// left. It returns ctx's error if any connection had to be cut.
func (t *Tunnel) Shutdown(ctx context.Context) error {
	t.mu.Lock()
	t.shutdown = true
	lns := make([]Listener, 0, len(t.listeners))
	evs := make([]*evListener, 0, len(t.listeners)) // read here: Serve's return deletes them
	for ln := range t.listeners {
		lns = append(lns, ln)
		evs = append(evs, t.evListeners[ln])
	}
	t.mu.Unlock()
	// Outside the lock: the loops take it to count what they accept.
	for i, ln := range lns {
		if el := evs[i]; el != nil {
			el.stop(t.loops)
		}
		ln.Close()
	}

	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	select {
	case <-done:
		t.closeEngine()
		return nil
	case <-ctx.Done():
	}
	// Cut outside the lock: a relay that ends at once removes itself.
	t.mu.Lock()
	left := make([]*conn, 0, len(t.active))
	for c := range t.active {
		left = append(left, c)
	}
	cancelDials := t.cancelDial
	t.mu.Unlock()
	if cancelDials != nil {
		cancelDials()
	}
	for _, c := range left {
		c.cutOff(errShutdown)
	}
	<-done
	t.closeEngine()
	return ctx.Err()
}

// Active is the number of connections being served.
func (t *Tunnel) Active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.active)
}

// RelayStats is what the relay engine holds now (zero before Serve).
func (t *Tunnel) RelayStats() relay.Stats {
	t.mu.Lock()
	e := t.engine
	t.mu.Unlock()
	if e == nil {
		return relay.Stats{}
	}
	return e.Stats()
}

// errEvicted ends a connection reset to make room for another source's.
var errEvicted = errors.New("reset for another client's connection: the connection limit was reached, and this client held the most")

// evictedForLimit reports that evicted was reset to admit c, in a warning
// rate-limited like the others (each connection's access line says it).
func (t *Tunnel) evictedForLimit(evicted *conn, c netip.AddrPort) {
	if ok, held := t.evictions.allow(time.Now()); ok {
		t.log().Warn("connection limit reached; resetting a connection of the client holding the most", "max_conns", t.MaxConns,
			"reset_client", evicted.peer.String(), "client", c.String(), "suppressed", held)
	}
}

// refusedForLimit reports a connection reset because MaxConns were being
// served, logging at most one warning a second (the counter has them all).
func (t *Tunnel) refusedForLimit(c netip.AddrPort) {
	if t.Observer != nil {
		t.Observer.Refused("limit")
	}
	now := time.Now().UnixNano()
	if last := t.limitLog.Load(); now-last >= int64(time.Second) && t.limitLog.CompareAndSwap(last, now) {
		t.log().Warn("connection limit reached; resetting new connections", "max_conns", t.MaxConns,
			"client", c.String())
	}
}

func (t *Tunnel) track(ln Listener) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return false
	}
	if t.listeners == nil {
		t.listeners = make(map[Listener]struct{})
		t.engine = relay.New()
		t.dials, t.cancelDial = context.WithCancel(context.Background())
	}
	t.listeners[ln] = struct{}{}
	if t.evListeners == nil {
		t.evListeners = make(map[Listener]*evListener)
	}
	return true
}

func (t *Tunnel) untrack(ln Listener) {
	t.mu.Lock()
	delete(t.listeners, ln)
	delete(t.evListeners, ln)
	t.mu.Unlock()
}

func (t *Tunnel) isShutdown() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.shutdown
}

// closeEngine stops the relay engine's poller once the last connection is
// gone; Serve will not start another.
func (t *Tunnel) closeEngine() {
	t.workers.stop()
	t.stopLoops()
	t.mu.Lock()
	e := t.engine
	t.engine = nil
	t.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

const (
	added = iota
	addShutdown
	addFull
)

// add counts r as served, unless MaxConns are. Then, if r's source holds
// at least two fewer than the source holding the most (the hog), it is
// added anyway and one of the hog's connections is returned, for the
// caller to cut: one source cannot lock the others out. Finding the hog
// costs a pass over the sources, only when the limit is reached.
func (t *Tunnel) add(r *conn) (result int, evict *conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.shutdown {
		return addShutdown, nil
	}
	if t.MaxConns > 0 {
		r.src = sniff.SourceKey(r.peer.Addr())
		if len(t.active) >= t.MaxConns {
			mine := len(t.bySource[r.src])
			var hog map[*conn]struct{}
			for _, rs := range t.bySource {
				if len(rs) > len(hog) {
					hog = rs
				}
			}
			if len(hog) < mine+2 {
				return addFull, nil
			}
			for v := range hog {
				evict = v // any one: map order is random
				break
			}
		}
	}
	if t.active == nil {
		t.active = make(map[*conn]struct{})
	}
	t.active[r] = struct{}{}
	if t.MaxConns > 0 {
		if t.bySource == nil {
			t.bySource = make(map[netip.Prefix]map[*conn]struct{})
		}
		rs := t.bySource[r.src]
		if rs == nil {
			if n := len(t.spare); n > 0 {
				rs, t.spare = t.spare[n-1], t.spare[:n-1]
			} else {
				rs = make(map[*conn]struct{})
			}
			t.bySource[r.src] = rs
		}
		rs[r] = struct{}{}
	}
	t.wg.Add(1)
	return added, evict
}

func (t *Tunnel) remove(r *conn) {
	t.mu.Lock()
	delete(t.active, r)
	if t.MaxConns > 0 {
		if rs := t.bySource[r.src]; rs != nil {
			delete(rs, r)
			if len(rs) == 0 {
				delete(t.bySource, r.src)
				if len(t.spare) < 64 {
					t.spare = append(t.spare, rs)
				}
			}
		}
	}
	t.mu.Unlock()
	t.wg.Done()
}
