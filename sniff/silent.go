package sniff

import (
	"net/netip"
	"sync"
	"time"
)

// Defaults for SilentCache.
const (
	DefaultSilentTTL        = 10 * time.Minute
	DefaultSilentMaxEntries = 4096
)

// SilentCache remembers destinations whose server speaks first (SSH, SMTP,
// FTP, MySQL greet before the client says anything), so that their next
// clients are forwarded at once instead of waiting for the sniff deadline.
//
// An entry is written only on evidence, and only the caller has it: Learn
// is for a connection whose client sent nothing, was connected anyway, and
// then saw the server's first bytes arrive before any byte of the client. A
// client that merely stays silent (a browser's preconnected socket) proves
// nothing and must not be learned: an entry turns sniffing off for that
// destination, for every client. Forget is for the opposite evidence: any
// client of the destination seen speaking first ends the entry at once, so
// a wrong entry lives until that destination's next talkative client.
//
// What one client does here is read by every other client's connections,
// so one source is bounded in what it can write:
//   - it holds at most PerSource entries it created; learning one more
//     drops its own oldest, never another source's;
//   - it cannot keep an entry alive: Learn renews an entry only when the
//     source differs from the one that created or last renewed it;
//   - sources are IPv4 addresses and IPv6 /64s, since one IPv6 host can
//     pick any address in its prefix.
//
// Entries expire TTL after their creation or last renewal; when the cache is
// full the entry renewed longest ago makes room. Destinations are keyed
// unmapped, so ::ffff:a.b.c.d and a.b.c.d are the same. The zero value is
// ready to use; a SilentCache must not be copied after first use. It is safe
// for concurrent use.
type SilentCache struct {
	// TTL is how long an entry lasts. Zero or negative means
	// DefaultSilentTTL.
	TTL time.Duration
	// MaxEntries bounds the number of entries. Zero or negative means
	// DefaultSilentMaxEntries.
	MaxEntries int
	// PerSource bounds the entries one source has created. Zero or negative
	// means MaxEntries/64, at least 1.
	PerSource int
	// Now returns the current time. Nil means time.Now.
	Now func() time.Time

	mu      sync.Mutex
	entries map[netip.AddrPort]*silentEntry
	owned   map[netip.Prefix]int // entries each source created
	list    silentEntry          // sentinel of a ring from the oldest renewal to the newest
}

type silentEntry struct {
	dst        netip.AddrPort
	owner      netip.Prefix // the source that created it
	last       netip.Prefix // the source that created or last renewed it
	expires    time.Time
	prev, next *silentEntry
}

// Learn records that a client at src connected to dst, sent nothing, and
// heard the server speak first. It creates an entry for dst, or renews one
// learned from another source.
func (c *SilentCache) Learn(dst netip.AddrPort, src netip.Addr) {
	dst = unmap(dst)
	from := SourceKey(src)
	limit := c.MaxEntries
	if limit <= 0 {
		limit = DefaultSilentMaxEntries
	}
	perSource := c.PerSource
	if perSource <= 0 {
		perSource = max(limit/64, 1)
	}
	now := c.now()

	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.expire(now)
	e := c.entries[dst]
	switch {
	case e != nil && e.last == from:
		return // the same source again: no renewal
	case e != nil:
		c.unlink(e)
	default:
		if c.owned[from] >= perSource {
			c.remove(c.oldestOf(from))
		} else if len(c.entries) >= limit {
			c.remove(c.list.next)
		}
		e = &silentEntry{dst: dst, owner: from}
		c.entries[dst] = e
		c.owned[from]++
	}
	e.last = from
	e.expires = now.Add(c.ttl())
	e.prev, e.next = c.list.prev, &c.list
	c.list.prev.next = e
	c.list.prev = e
}

// Silent reports whether dst is remembered as server-first and has not
// expired.
func (c *SilentCache) Silent(dst netip.AddrPort) bool {
	dst = unmap(dst)
	now := c.now()

	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[dst]
	if e == nil {
		return false
	}
	if !now.Before(e.expires) {
		c.remove(e)
		return false
	}
	return true
}

// Forget drops dst: a client of it was seen speaking first.
func (c *SilentCache) Forget(dst netip.AddrPort) {
	dst = unmap(dst)
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[dst]; e != nil {
		c.remove(e)
	}
}

// size is the number of entries, expired ones not yet dropped included.
func (c *SilentCache) size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// SourceKey is what counts as one source for per-source bounds: an IPv4
// address, or the /64 of an IPv6 address (one host may use any address of
// its prefix). IPv4-mapped addresses count as IPv4.
func SourceKey(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := 64
	if a.Is4() {
		bits = 32
	}
	p, err := a.Prefix(bits)
	if err != nil {
		return netip.Prefix{} // the zero Addr: one shared key
	}
	return p
}

func (c *SilentCache) ttl() time.Duration {
	if c.TTL <= 0 {
		return DefaultSilentTTL
	}
	return c.TTL
}

func (c *SilentCache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// init makes the zero value usable. c.mu is held.
func (c *SilentCache) init() {
	if c.entries == nil {
		c.entries = make(map[netip.AddrPort]*silentEntry)
		c.owned = make(map[netip.Prefix]int)
		c.list.prev, c.list.next = &c.list, &c.list
	}
}

// expire drops the expired entries at the old end of the list. c.mu is held.
func (c *SilentCache) expire(now time.Time) {
	for e := c.list.next; e != &c.list && !now.Before(e.expires); e = c.list.next {
		c.remove(e)
	}
}

// oldestOf is the entry owner created that was renewed longest ago; owner
// has at least one. c.mu is held. It walks the list, which is bounded, and
// runs only when a source at its quota learns once more.
func (c *SilentCache) oldestOf(owner netip.Prefix) *silentEntry {
	for e := c.list.next; e != &c.list; e = e.next {
		if e.owner == owner {
			return e
		}
	}
	panic("sniff: SilentCache owner count out of step with its entries")
}

// remove drops e. c.mu is held.
func (c *SilentCache) remove(e *silentEntry) {
	c.unlink(e)
	delete(c.entries, e.dst)
	if c.owned[e.owner]--; c.owned[e.owner] <= 0 {
		delete(c.owned, e.owner)
	}
}

func (c *SilentCache) unlink(e *silentEntry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func unmap(dst netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
}
