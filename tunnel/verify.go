package tunnel

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/detour-proxy/detour/sniff"
)

// verifyCache remembers what sniffed names resolved to, for routes in
// Verify mode, so a busy site costs one lookup a minute rather than one per
// connection. It is bounded; the zero value is ready to use.
//
// The names come from clients, and one client can send a new name on every
// connection. So that it cannot flush the entries other clients' names
// use, each source (sniff.SourceKey) may hold verifyPerSource entries it
// added, and past that replaces its own; when the cache is full, an
// expired entry goes first, else any one.
type verifyCache struct {
	mu      sync.Mutex
	entries map[string]*verifyEntry
	owned   map[netip.Prefix]int // entries each source added
}

type verifyEntry struct {
	addrs   []netip.Addr
	expires time.Time
	owner   netip.Prefix
}

const (
	verifyTTL       = time.Minute
	verifyEntries   = 4096
	verifyPerSource = verifyEntries / 64
)

// lookupFunc resolves host to its addresses; (*net.Resolver).LookupNetIP
// with network "ip" is one.
type lookupFunc func(ctx context.Context, host string) ([]netip.Addr, error)

// resolvesTo reports whether host, sniffed from a client at src, resolves
// to ip. A failed lookup is a no, and is not remembered.
func (v *verifyCache) resolvesTo(ctx context.Context, lookup lookupFunc, src netip.Addr, host string, ip netip.Addr) bool {
	ip = ip.Unmap()
	now := time.Now()
	v.mu.Lock()
	var addrs []netip.Addr
	if e := v.entries[host]; e != nil && now.Before(e.expires) {
		addrs = e.addrs
	}
	v.mu.Unlock()
	if addrs == nil {
		var err error
		if addrs, err = lookup(ctx, host); err != nil {
			return false
		}
		for i := range addrs {
			addrs[i] = addrs[i].Unmap()
		}
		v.put(host, addrs, sniff.SourceKey(src), now)
	}
	return slices.Contains(addrs, ip)
}

// put stores what host resolved to, on behalf of owner.
func (v *verifyCache) put(host string, addrs []netip.Addr, owner netip.Prefix, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.entries == nil {
		v.entries = make(map[string]*verifyEntry)
		v.owned = make(map[netip.Prefix]int)
	}
	if old := v.entries[host]; old != nil {
		v.drop(host, old)
	}
	switch {
	case v.owned[owner] >= verifyPerSource:
		v.dropWhere(func(e *verifyEntry) bool { return e.owner == owner })
	case len(v.entries) >= verifyEntries:
		if !v.dropWhere(func(e *verifyEntry) bool { return !now.Before(e.expires) }) {
			v.dropWhere(func(*verifyEntry) bool { return true })
		}
	}
	v.entries[host] = &verifyEntry{addrs: addrs, expires: now.Add(verifyTTL), owner: owner}
	v.owned[owner]++
}

// dropWhere drops one entry for which match holds, and reports whether
// there was one. It walks the map (in Go's random order): only a source at
// its quota, or a full cache, pays for it.
func (v *verifyCache) dropWhere(match func(*verifyEntry) bool) bool {
	for host, e := range v.entries {
		if match(e) {
			v.drop(host, e)
			return true
		}
	}
	return false
}

func (v *verifyCache) drop(host string, e *verifyEntry) {
	delete(v.entries, host)
	if v.owned[e.owner]--; v.owned[e.owner] <= 0 {
		delete(v.owned, e.owner)
	}
}
