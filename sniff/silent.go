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

// SilentCache remembers destinations whose clients stayed silent until Peek
// timed out: protocols where the server speaks first (SSH, SMTP, FTP,
// MySQL, …). A caller that finds a destination here can skip sniffing and
// forward by IP at once instead of waiting for the deadline again.
//
// The caller decides what counts as silent; the usual rule is a Timeout
// outcome with no bytes read. Remembering a destination is a bet that its
// next clients will be silent too: while an entry lives, a client of that
// destination that does speak first is forwarded without its host name.
//
// Entries expire TTL after their last Add; when the cache is full the entry
// added longest ago makes room. Addresses are keyed unmapped, so ::ffff:a.b.c.d
// and a.b.c.d are the same destination. The zero value is ready to use; a
// SilentCache must not be copied after first use. It is safe for concurrent
// use.
type SilentCache struct {
	// TTL is how long an entry lasts. Zero or negative means
	// DefaultSilentTTL.
	TTL time.Duration
	// MaxEntries bounds the number of entries. Zero or negative means
	// DefaultSilentMaxEntries.
	MaxEntries int
	// Now returns the current time. Nil means time.Now.
	Now func() time.Time

	mu      sync.Mutex
	entries map[netip.AddrPort]*silentEntry
	list    silentEntry // sentinel of a ring from the oldest Add to the newest
}

type silentEntry struct {
	dst        netip.AddrPort
	expires    time.Time
	prev, next *silentEntry
}

// Add remembers dst as silent, or renews it.
func (c *SilentCache) Add(dst netip.AddrPort) {
	dst = unmap(dst)
	ttl := c.TTL
	if ttl <= 0 {
		ttl = DefaultSilentTTL
	}
	limit := c.MaxEntries
	if limit <= 0 {
		limit = DefaultSilentMaxEntries
	}
	now := c.now()

	c.mu.Lock()
	defer c.mu.Unlock()
	c.init()
	c.expire(now)
	e := c.entries[dst]
	if e != nil {
		c.unlink(e)
	} else {
		for len(c.entries) >= limit {
			c.remove(c.list.next)
		}
		e = &silentEntry{dst: dst}
		c.entries[dst] = e
	}
	e.expires = now.Add(ttl)
	e.prev, e.next = c.list.prev, &c.list
	c.list.prev.next = e
	c.list.prev = e
}

// Silent reports whether dst is remembered as silent and has not expired.
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

// Forget drops dst, for example when a client of it turned out to speak
// first.
func (c *SilentCache) Forget(dst netip.AddrPort) {
	dst = unmap(dst)
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[dst]; e != nil {
		c.remove(e)
	}
}

// Len returns the number of entries, expired ones not yet dropped included.
func (c *SilentCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
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
		c.list.prev, c.list.next = &c.list, &c.list
	}
}

// expire drops the expired entries at the old end of the list. c.mu is held.
func (c *SilentCache) expire(now time.Time) {
	for e := c.list.next; e != &c.list && !now.Before(e.expires); e = c.list.next {
		c.remove(e)
	}
}

// remove drops e. c.mu is held.
func (c *SilentCache) remove(e *silentEntry) {
	c.unlink(e)
	delete(c.entries, e.dst)
}

func (c *SilentCache) unlink(e *silentEntry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func unmap(dst netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
}
