package sniff

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// clock is a settable time for SilentCache.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestSilentCacheZeroValue(t *testing.T) {
	var c SilentCache
	a := netip.MustParseAddrPort("198.18.0.1:22")
	if c.Silent(a) || c.Len() != 0 {
		t.Fatal("empty cache has an entry")
	}
	c.Forget(a) // no-op on an empty cache
	c.Add(a)
	if !c.Silent(a) || c.Len() != 1 {
		t.Fatal("added entry missing")
	}
	if c.Silent(netip.MustParseAddrPort("198.18.0.1:25")) {
		t.Fatal("other port is silent")
	}
	c.Forget(a)
	if c.Silent(a) || c.Len() != 0 {
		t.Fatal("forgotten entry remains")
	}
}

func TestSilentCacheTTL(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	c := SilentCache{TTL: time.Minute, Now: clk.Now}
	a := netip.MustParseAddrPort("198.18.0.1:22")
	b := netip.MustParseAddrPort("[fd00::1]:25")
	c.Add(a)
	clk.Advance(30 * time.Second)
	c.Add(b)
	clk.Advance(29 * time.Second)
	if !c.Silent(a) || !c.Silent(b) {
		t.Fatal("entries expired early")
	}
	clk.Advance(time.Second) // a is 60s old
	if c.Silent(a) || !c.Silent(b) {
		t.Fatal("a should have expired, b not")
	}
	c.Add(b) // renew
	clk.Advance(59 * time.Second)
	if !c.Silent(b) {
		t.Fatal("renewed entry expired")
	}
	clk.Advance(time.Minute)
	c.Add(netip.MustParseAddrPort("198.18.0.2:22")) // drops the expired b
	if c.Len() != 1 {
		t.Fatalf("Len = %d after expiry", c.Len())
	}
}

func TestSilentCacheDefaultTTL(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	c := SilentCache{Now: clk.Now}
	a := netip.MustParseAddrPort("198.18.0.1:22")
	c.Add(a)
	clk.Advance(DefaultSilentTTL - time.Nanosecond)
	if !c.Silent(a) {
		t.Fatal("expired before the default TTL")
	}
	clk.Advance(time.Nanosecond)
	if c.Silent(a) {
		t.Fatal("alive after the default TTL")
	}
}

func TestSilentCacheBound(t *testing.T) {
	clk := &clock{t: time.Unix(1000, 0)}
	c := SilentCache{MaxEntries: 3, Now: clk.Now}
	addr := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 22)
	}
	for i := range 3 {
		c.Add(addr(i))
		clk.Advance(time.Second)
	}
	c.Add(addr(0)) // renewing 0 makes 1 the oldest
	c.Add(addr(3))
	if c.Len() != 3 || c.Silent(addr(1)) || !c.Silent(addr(0)) || !c.Silent(addr(2)) || !c.Silent(addr(3)) {
		t.Fatalf("after eviction: len %d", c.Len())
	}

	var d SilentCache
	for i := range DefaultSilentMaxEntries + 10 {
		d.Add(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 22))
	}
	if d.Len() != DefaultSilentMaxEntries {
		t.Fatalf("default bound: len %d", d.Len())
	}
}

func TestSilentCacheUnmaps(t *testing.T) {
	var c SilentCache
	c.Add(netip.MustParseAddrPort("[::ffff:198.18.0.1]:22"))
	if !c.Silent(netip.MustParseAddrPort("198.18.0.1:22")) {
		t.Fatal("mapped and plain IPv4 differ")
	}
}

// TestSilentCacheConcurrent is for the race detector.
func TestSilentCacheConcurrent(t *testing.T) {
	c := SilentCache{MaxEntries: 50, TTL: time.Millisecond}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				a := netip.MustParseAddrPort(fmt.Sprintf("198.18.%d.%d:22", g, i%100))
				switch i % 3 {
				case 0:
					c.Add(a)
				case 1:
					c.Silent(a)
				default:
					c.Forget(a)
				}
			}
		}()
	}
	wg.Wait()
	if n := c.Len(); n > 50 {
		t.Fatalf("len %d over the bound", n)
	}
}
