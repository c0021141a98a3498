package tunnel

import (
	"net/netip"
	"sync"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
)

// skipPort reports whether port is one of the server-first ports never
// sniffed.
func (t *Tunnel) skipPort(port uint16) bool {
	skip := t.Sniff.SkipPorts
	if skip == nil {
		skip = DefaultSkipPorts
	}
	return ports.AnyContains(skip, port)
}

// sniffLimits are the MaxSniffing slots, in all and for one source.
func (t *Tunnel) sniffLimits() (all, perSource int) {
	all = t.MaxSniffing
	if all == 0 {
		all = 1024
	}
	return all, max(all/16, 1)
}

// enterSniffing takes one of MaxSniffing slots for a connection from src,
// unless they are all taken or src holds its share; the caller gives it back
// with leaveSniffing.
func (t *Tunnel) enterSniffing(src netip.Addr) bool {
	all, perSource := t.sniffLimits()
	if all < 0 {
		return true
	}
	if n := t.sniffing.Add(1); n > int64(all) {
		t.sniffing.Add(-1)
		return false
	}
	if !t.sniffers.add(sniff.SourceKey(src), perSource) {
		t.sniffing.Add(-1)
		return false
	}
	return true
}

// leaveSniffing gives back the slot enterSniffing took.
func (t *Tunnel) leaveSniffing(src netip.Addr) {
	if all, _ := t.sniffLimits(); all < 0 {
		return
	}
	t.sniffers.done(sniff.SourceKey(src))
	t.sniffing.Add(-1)
}

// sourceCount counts what each source holds, for per-source limits. The
// zero value is ready to use.
type sourceCount struct {
	mu sync.Mutex
	n  map[netip.Prefix]int
}

// add counts one more for src unless it holds limit already.
func (c *sourceCount) add(src netip.Prefix, limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[src] >= limit {
		return false
	}
	if c.n == nil {
		c.n = make(map[netip.Prefix]int)
	}
	c.n[src]++
	return true
}

// done counts one less for src.
func (c *sourceCount) done(src netip.Prefix) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[src]--; c.n[src] <= 0 {
		delete(c.n, src)
	}
}

// serverFirstWindow bounds how long after the relay starts a server's first
// bytes count as a greeting. Banners come at once; a server that speaks only
// after a long silence (an HTTP server timing out a request it never got)
// is not server-first, and must not turn sniffing off for its clients.
const serverFirstWindow = 5 * time.Second

// watchFirst is the relay's onFirst for a connection to dst from src that
// may teach the silent cache: one whose client sent nothing until the sniff
// timeout, or one not sniffed because dst is in the cache; the relay starts
// at start. The side whose bytes come first decides:
//   - the server's, within serverFirstWindow: dst greets its clients, so
//     later ones skip the sniff (or, for a cached dst, the entry is renewed,
//     if src is not the source that last did);
//   - the client's: dst is not server-first, whatever was learned before;
//     the entry ends at once.
//
// Neither side speaking teaches nothing. So only evidence writes the
// cache, any client can end an entry, and one source cannot fill it or keep
// an entry alive (sniff.SilentCache bounds each source).
func (t *Tunnel) watchFirst(dst netip.AddrPort, src netip.Addr, start time.Time) func(server bool) {
	return func(server bool) {
		switch {
		case !server:
			t.silent.Forget(dst)
		case time.Since(start) < serverFirstWindow:
			t.silent.Learn(dst, src)
		}
	}
}
