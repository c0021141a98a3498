package tunnel

import (
	"testing"
	"time"
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
