package sniff

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// Sources for the tests: each learns as a different client.
var (
	srcA = netip.MustParseAddr("198.18.1.2")
	srcB = netip.MustParseAddr("198.18.1.3")
)

func TestSilentCacheZeroValue(t *testing.T) {
	var c SilentCache
	a := netip.MustParseAddrPort("198.18.0.1:22")
	if c.Silent(a) || c.size() != 0 {
		t.Fatal("empty cache has an entry")
	}
	c.Forget(a) // no-op on an empty cache
	c.Learn(a, srcA)
	if !c.Silent(a) || c.size() != 1 {
		t.Fatal("learned entry missing")
	}
	if c.Silent(netip.MustParseAddrPort("198.18.0.1:25")) {
		t.Fatal("other port is silent")
	}
	c.Forget(a)
	if c.Silent(a) || c.size() != 0 {
		t.Fatal("forgotten entry remains")
	}
}

func TestSilentCacheTTL(t *testing.T) {
	clk := testkit.ClockAt(time.Unix(1000, 0))
	c := SilentCache{TTL: time.Minute, Now: clk.Now}
	a := netip.MustParseAddrPort("198.18.0.1:22")
	b := netip.MustParseAddrPort("[fd00::1]:25")
	c.Learn(a, srcA)
	clk.Advance(30 * time.Second)
	c.Learn(b, srcA)
	clk.Advance(29 * time.Second)
	if !c.Silent(a) || !c.Silent(b) {
		t.Fatal("entries expired early")
	}
	clk.Advance(time.Second) // a is 60s old
	if c.Silent(a) || !c.Silent(b) {
		t.Fatal("a should have expired, b not")
	}
	c.Learn(b, srcB) // renewed by another source
	clk.Advance(59 * time.Second)
	if !c.Silent(b) {
		t.Fatal("renewed entry expired")
	}
	clk.Advance(time.Minute)
	c.Learn(netip.MustParseAddrPort("198.18.0.2:22"), srcA) // drops the expired b
	if c.size() != 1 {
		t.Fatalf("Len = %d after expiry", c.size())
	}
}

// One source cannot keep an entry alive: its own renewals do not count,
// and another source's do, once each in turn.
func TestSilentCacheRenewalNeedsAnotherSource(t *testing.T) {
	clk := testkit.ClockAt(time.Unix(1000, 0))
	c := SilentCache{TTL: time.Minute, Now: clk.Now}
	a := netip.MustParseAddrPort("198.18.0.1:2222")
	c.Learn(a, srcA)
	for range 2 {
		clk.Advance(20 * time.Second)
		c.Learn(a, srcA)
	}
	clk.Advance(20 * time.Second)
	if c.Silent(a) {
		t.Fatal("one source kept its entry alive past the TTL by learning it again")
	}

	// Another address of the same IPv6 /64 is the same source too.

	v6 := netip.MustParseAddrPort("[fd00::2]:2222")
	c.Learn(v6, netip.MustParseAddr("fd00:1::1"))
	clk.Advance(50 * time.Second)
	c.Learn(v6, netip.MustParseAddr("fd00:1::ffff:2")) // same /64
	clk.Advance(10 * time.Second)
	if c.Silent(v6) {
		t.Fatal("another address of the same /64 renewed the entry")
	}

	c.Learn(a, srcA)
	clk.Advance(50 * time.Second)
	c.Learn(a, srcB) // renews
	clk.Advance(50 * time.Second)
	c.Learn(a, srcB) // B again: does not
	clk.Advance(10 * time.Second)
	if c.Silent(a) {
		t.Fatal("the same second source renewed twice in a row")
	}
}

// One source cannot fill the cache: past its quota it replaces its own
// oldest entry, and the other sources' entries stay.
func TestSilentCachePerSourceQuota(t *testing.T) {
	clk := testkit.ClockAt(time.Unix(1000, 0))
	c := SilentCache{MaxEntries: 8, PerSource: 2, Now: clk.Now}
	dst := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 9, byte(i)}), 2222)
	}
	c.Learn(dst(100), srcB)
	for i := range 50 {
		c.Learn(dst(i), srcA)
		clk.Advance(time.Millisecond)
	}
	if c.size() != 3 {
		t.Fatalf("Len = %d, want B's entry and A's quota of 2", c.size())
	}
	if !c.Silent(dst(100)) || !c.Silent(dst(48)) || !c.Silent(dst(49)) || c.Silent(dst(47)) {
		t.Fatal("want B's entry and A's two newest")
	}

	// The default quota is a 64th of the entries.
	var d SilentCache
	for i := range 1000 {
		d.Learn(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 2222), srcA)
	}
	if d.size() != DefaultSilentMaxEntries/64 {
		t.Fatalf("one source holds %d entries, want %d", d.size(), DefaultSilentMaxEntries/64)
	}
}

func TestSilentCacheDefaultTTL(t *testing.T) {
	clk := testkit.ClockAt(time.Unix(1000, 0))
	c := SilentCache{Now: clk.Now}
	a := netip.MustParseAddrPort("198.18.0.1:22")
	c.Learn(a, srcA)
	clk.Advance(DefaultSilentTTL - time.Nanosecond)
	if !c.Silent(a) {
		t.Fatal("expired before the default TTL")
	}
	clk.Advance(time.Nanosecond)
	if c.Silent(a) {
		t.Fatal("alive after the default TTL")
	}
}

// source i is a distinct IPv4 client.
func source(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)}) }

func TestSilentCacheBound(t *testing.T) {
	clk := testkit.ClockAt(time.Unix(1000, 0))
	c := SilentCache{MaxEntries: 3, Now: clk.Now}
	addr := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 22)
	}
	for i := range 3 {
		c.Learn(addr(i), source(i))
		clk.Advance(time.Second)
	}
	c.Learn(addr(0), source(9)) // renewing 0 makes 1 the oldest
	c.Learn(addr(3), source(3))
	if c.size() != 3 || c.Silent(addr(1)) || !c.Silent(addr(0)) || !c.Silent(addr(2)) || !c.Silent(addr(3)) {
		t.Fatalf("after eviction: len %d", c.size())
	}

	var d SilentCache
	for i := range DefaultSilentMaxEntries + 10 {
		d.Learn(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 22), source(i))
	}
	if d.size() != DefaultSilentMaxEntries {
		t.Fatalf("default bound: len %d", d.size())
	}
}

func TestSilentCacheUnmaps(t *testing.T) {
	var c SilentCache
	c.Learn(netip.MustParseAddrPort("[::ffff:198.18.0.1]:22"), netip.MustParseAddr("::ffff:198.18.1.2"))
	if !c.Silent(netip.MustParseAddrPort("198.18.0.1:22")) {
		t.Fatal("mapped and plain IPv4 differ")
	}
	c.Learn(netip.MustParseAddrPort("198.18.0.1:22"), srcA) // the same source, unmapped
	if c.size() != 1 {
		t.Fatalf("Len = %d", c.size())
	}
}

func TestSourceKey(t *testing.T) {
	for in, want := range map[string]string{
		"198.18.1.2":         "198.18.1.2/32",
		"::ffff:198.18.1.2":  "198.18.1.2/32",
		"fd00:1:2:3:4:5:6:7": "fd00:1:2:3::/64",
	} {
		if got := SourceKey(netip.MustParseAddr(in)); got.String() != want {
			t.Errorf("SourceKey(%s) = %s, want %s", in, got, want)
		}
	}
	if k := SourceKey(netip.Addr{}); k.IsValid() {
		t.Errorf("SourceKey(zero) = %v, want the zero Prefix", k)
	}
}

// TestSilentCacheConcurrent is for the race detector.
func TestSilentCacheConcurrent(t *testing.T) {
	c := SilentCache{MaxEntries: 50, PerSource: 20, TTL: time.Millisecond}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				a := netip.MustParseAddrPort(fmt.Sprintf("198.18.%d.%d:22", g, i%100))
				switch i % 3 {
				case 0:
					c.Learn(a, source(i%7))
				case 1:
					c.Silent(a)
				default:
					c.Forget(a)
				}
			}
		}()
	}
	wg.Wait()
	if n := c.size(); n > 50 {
		t.Fatalf("len %d over the bound", n)
	}
}
