package tunnel

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// verifyCache remembers what sniffed names resolved to, for routes in
// Verify mode, so a busy site costs one lookup a minute rather than one per
// connection. It is bounded; the zero value is ready to use.
type verifyCache struct {
	mu      sync.Mutex
	entries map[string]verifyEntry
}

type verifyEntry struct {
	addrs   []netip.Addr
	expires time.Time
}

const (
	verifyTTL     = time.Minute
	verifyEntries = 4096
)

// resolvesTo reports whether host resolves to ip. A failed lookup is a no.
func (v *verifyCache) resolvesTo(ctx context.Context, r *net.Resolver, host string, ip netip.Addr) bool {
	ip = ip.Unmap()
	now := time.Now()
	v.mu.Lock()
	e, ok := v.entries[host]
	v.mu.Unlock()
	if !ok || now.After(e.expires) {
		addrs, err := r.LookupNetIP(ctx, "ip", host)
		if err != nil {
			return false
		}
		for i := range addrs {
			addrs[i] = addrs[i].Unmap()
		}
		e = verifyEntry{addrs: addrs, expires: now.Add(verifyTTL)}
		v.mu.Lock()
		if v.entries == nil || len(v.entries) >= verifyEntries {
			v.entries = make(map[string]verifyEntry) // crude but bounded: start over
		}
		v.entries[host] = e
		v.mu.Unlock()
	}
	return slices.Contains(e.addrs, ip)
}
