package tunnel

import (
	"net/netip"
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
)

func TestWarnLimiter(t *testing.T) {
	var l warnLimiter
	t0 := time.Unix(1000, 0)
	for i := range warnBurst {
		if ok, held := l.allow(t0); !ok || held != 0 {
			t.Fatalf("warning %d held back within the burst", i)
		}
	}
	for range 5 {
		if ok, _ := l.allow(t0.Add(500 * time.Millisecond)); ok {
			t.Fatal("warning let through beyond the burst")
		}
	}
	ok, held := l.allow(t0.Add(time.Second))
	if !ok || held != 5 {
		t.Fatalf("next second: allow = %v, suppressed %d; want true, 5", ok, held)
	}
}

// One client's flood of warnings uses a quarter of the burst: the lines
// about the other clients' connections still get through.
func TestWarnLimiterPerSource(t *testing.T) {
	var l warnLimiter
	t0 := time.Unix(1000, 0)
	hog := sniff.SourceKey(netip.MustParseAddr("198.18.1.2"))
	let := 0
	for range 1000 {
		if ok, _ := l.allowFrom(t0, hog, true); ok {
			let++
		}
	}
	if let != warnBurstPerSource {
		t.Fatalf("one source got %d warnings through, want %d", let, warnBurstPerSource)
	}
	for i := range warnBurst - warnBurstPerSource {
		other := sniff.SourceKey(netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + i)}))
		ok, held := l.allowFrom(t0, other, true)
		if !ok {
			t.Fatalf("warning about client %d held back behind one client's flood", i)
		}
		if i == 0 && held != 1000-warnBurstPerSource {
			t.Fatalf("the first line after the flood says %d held back, want %d", held, 1000-warnBurstPerSource)
		}
	}
	if ok, _ := l.allowFrom(t0, sniff.SourceKey(netip.MustParseAddr("198.18.1.99")), true); ok {
		t.Fatal("more than the burst let through in one second")
	}
	ok, held := l.allowFrom(t0.Add(time.Second), hog, true)
	if !ok || held != 1 {
		t.Fatalf("next second: %v, suppressed %d", ok, held)
	}
}
