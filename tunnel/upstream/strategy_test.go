package upstream

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// testUpstreams makes n upstreams named socks5://10.0.0.i:1080 with the
// given weights (1 for the rest). Pick never dials, so they have no Dialer.
func testUpstreams(n int, weights ...int) []*Upstream {
	ups := make([]*Upstream, n)
	for i := range ups {
		ups[i] = &Upstream{Name: fmt.Sprintf("socks5://10.0.0.%d:1080", i+1), Weight: 1}
		if i < len(weights) {
			ups[i].Weight = weights[i]
		}
	}
	return ups
}

func indexOf(ups []*Upstream, u *Upstream) int {
	for i, v := range ups {
		if v == u {
			return i
		}
	}
	return -1
}

func allStrategies() map[string]Strategy {
	return map[string]Strategy{
		"round-robin":     &RoundRobin{},
		"weighted":        &Weighted{},
		"least-conn":      &LeastConn{},
		"consistent-hash": &ConsistentHash{},
	}
}

func TestRoundRobinCycles(t *testing.T) {
	ups := testUpstreams(3, 5, 1, 1) // weights are ignored
	var got []string
	rr := &RoundRobin{}
	for range 7 {
		got = append(got, strconv.Itoa(indexOf(ups, rr.Pick("", ups, nil))))
	}
	if s := strings.Join(got, ""); s != "0120120" {
		t.Fatalf("round-robin order %s, want 0120120", s)
	}
}

func TestWeightedIsSmoothAndProportional(t *testing.T) {
	ups := testUpstreams(3, 5, 3, 1)
	w := &Weighted{}
	var seq strings.Builder
	counts := make([]int, 3)
	run, maxRun, last := 0, 0, -1
	const picks = 3000
	for range picks {
		i := indexOf(ups, w.Pick("", ups, nil))
		counts[i]++
		if seq.Len() < 9 {
			seq.WriteByte("abc"[i])
		}
		if i == last {
			run++
		} else {
			run, last = 1, i
		}
		maxRun = max(maxRun, run)
	}
	if seq.String() != "abacababa" {
		t.Errorf("first cycle %s, want abacababa (nginx smooth order)", seq.String())
	}
	for i, wt := range []float64{5, 3, 1} {
		want := picks * wt / 9
		if math.Abs(float64(counts[i])-want) > 0.02*want {
			t.Errorf("upstream %d (weight %v): %d picks, want %.0f ±2%%", i, wt, counts[i], want)
		}
	}
	if maxRun > 5 {
		t.Errorf("longest run of one upstream %d, want at most the heaviest weight (5)", maxRun)
	}
	t.Logf("counts %v, longest run %d", counts, maxRun)
}

func TestWeightedRestartsWhenMembersChange(t *testing.T) {
	ups := testUpstreams(3, 5, 3, 1)
	w := &Weighted{}
	w.Pick("", ups, nil)
	two := ups[:2]
	counts := make([]int, 2)
	for range 800 {
		counts[indexOf(two, w.Pick("", two, nil))]++
	}
	if counts[0] != 500 || counts[1] != 300 {
		t.Fatalf("after dropping one upstream: %v, want [500 300]", counts)
	}
}

func TestLeastConnPicksLeastLoaded(t *testing.T) {
	ups := testUpstreams(3)
	ups[0].active.Store(3)
	ups[1].active.Store(1)
	ups[2].active.Store(2)
	lc := &LeastConn{}
	for range 6 {
		if u := lc.Pick("", ups, nil); u != ups[1] {
			t.Fatalf("picked %d, want the least loaded (1)", indexOf(ups, u))
		}
	}
	// Ties go to the heavier upstream…
	ups[0].active.Store(1)
	ups[2].active.Store(1)
	ups[2].Weight = 4
	if u := lc.Pick("", ups, nil); u != ups[2] {
		t.Fatalf("tie picked %d, want the heavier (2)", indexOf(ups, u))
	}
	// …then turn about.
	ups[2].Weight = 1
	seen := map[int]int{}
	for range 300 {
		seen[indexOf(ups, lc.Pick("", ups, nil))]++
	}
	if seen[0] != 100 || seen[1] != 100 || seen[2] != 100 {
		t.Fatalf("ties spread %v, want 100 each", seen)
	}
	// Counting what it hands out keeps the load level.
	for _, u := range ups {
		u.active.Store(0)
	}
	for range 30 {
		lc.Pick("", ups, nil).active.Add(1)
	}
	for i, u := range ups {
		if u.Active() != 10 {
			t.Fatalf("upstream %d has %d connections, want 10 each", i, u.Active())
		}
	}
}

// hostMap maps hosts onto ups with c.
func hostMap(c Strategy, ups []*Upstream, hosts []string) []*Upstream {
	m := make([]*Upstream, len(hosts))
	for i, h := range hosts {
		m[i] = c.Pick(h, ups, nil)
	}
	return m
}

func testHosts(n int) []string {
	hosts := make([]string, n)
	for i := range hosts {
		hosts[i] = fmt.Sprintf("host-%d.example.com", i)
	}
	return hosts
}

// TestConsistentHashMovesOnlyTheRemovedShare: removing (or downing) one of
// five upstreams moves only the hosts it held, about a fifth.
func TestConsistentHashMovesOnlyTheRemovedShare(t *testing.T) {
	const n = 5
	ups := testUpstreams(n)
	hosts := testHosts(10000)
	before := hostMap(&ConsistentHash{}, ups, hosts)

	share := map[*Upstream]int{}
	for _, u := range before {
		share[u]++
	}
	for i, u := range ups {
		if s := share[u]; s < 1500 || s > 2500 {
			t.Errorf("upstream %d holds %d of 10000 hosts, want about 2000", i, s)
		}
	}

	// Restarting (a fresh strategy) maps every host the same way.
	if again := hostMap(&ConsistentHash{}, ups, hosts); fmt.Sprint(again) != fmt.Sprint(before) {
		t.Fatal("a fresh ConsistentHash maps hosts differently")
	}

	removed := ups[2]
	check := func(how string, after []*Upstream) {
		moved := 0
		for i := range hosts {
			if after[i] == removed {
				t.Fatalf("%s: host %s still on the removed upstream", how, hosts[i])
			}
			if after[i] != before[i] {
				moved++
				if before[i] != removed {
					t.Fatalf("%s: host %s moved from %s to %s though its upstream stayed", how, hosts[i], before[i].Name, after[i].Name)
				}
			}
		}
		if limit := 1.2 / n * float64(len(hosts)); float64(moved) > limit {
			t.Fatalf("%s: %d hosts moved, want at most %.0f", how, moved, limit)
		}
		t.Logf("%s: %d of %d hosts moved", how, moved, len(hosts))
	}
	rest := append(append([]*Upstream{}, ups[:2]...), ups[3:]...)
	c := &ConsistentHash{}
	hostMap(c, ups, hosts[:1]) // build the 5-ring first: the cache must notice
	check("removed", hostMap(c, rest, hosts))

	removed.benched.Store(true)
	check("down", hostMap(&ConsistentHash{}, ups, hosts))
}

// TestConsistentHashGolden pins the default hash (values checked against
// an independent FNV-1a + splitmix64): a change would remap every host on
// upgrade.
func TestConsistentHashGolden(t *testing.T) {
	for _, tc := range []struct {
		s    string
		want uint64
	}{
		{"", 0xf52a15e9a9b5e89b},
		{"example.com", 0x4d07e1c6cc597ab7},
	} {
		if got := fnv1aMix(tc.s); got != tc.want {
			t.Errorf("fnv1aMix(%q) = %#x, want %#x", tc.s, got, tc.want)
		}
	}
}

func TestConsistentHashWeights(t *testing.T) {
	ups := testUpstreams(3, 3, 1, 1)
	share := map[*Upstream]int{}
	for _, u := range hostMap(&ConsistentHash{}, ups, testHosts(10000)) {
		share[u]++
	}
	if s := share[ups[0]]; s < 5200 || s > 6800 {
		t.Fatalf("weight 3 of 5 holds %d of 10000 hosts, want about 6000", s)
	}
}

func TestConsistentHashInjectedHash(t *testing.T) {
	ups := testUpstreams(3)
	// Every point and key at 0: the key lands on the first point, which
	// is the first upstream's (ties go to the earlier one).
	c := &ConsistentHash{Hash: func(string) uint64 { return 0 }, LoadFactor: -1}
	if u := c.Pick("anything", ups, nil); u != ups[0] {
		t.Fatalf("picked %d, want 0", indexOf(ups, u))
	}
}

// TestConsistentHashBoundedLoad: one very hot key spills over to the next
// upstreams on the ring instead of piling onto its own.
func TestConsistentHashBoundedLoad(t *testing.T) {
	const n, conns = 5, 1000
	for _, lf := range []float64{0, 2} {
		ups := testUpstreams(n)
		c := &ConsistentHash{LoadFactor: lf}
		home := c.Pick("hot.example.com", ups, nil)
		for range conns {
			c.Pick("hot.example.com", ups, nil).active.Add(1)
		}
		if lf == 0 {
			lf = 1.25
		}
		limit := int64(math.Ceil(lf * conns / n))
		var loads []int64
		for _, u := range ups {
			loads = append(loads, u.Active())
			if u.Active() > limit {
				t.Errorf("factor %v: an upstream holds %d connections, want at most %d", lf, u.Active(), limit)
			}
		}
		if home.Active() != limit {
			t.Errorf("factor %v: the key's own upstream holds %d, want it filled to %d first", lf, home.Active(), limit)
		}
		t.Logf("factor %v: loads %v", lf, loads)
	}

	// Without the bound, it all goes to one.
	ups := testUpstreams(n)
	c := &ConsistentHash{LoadFactor: -1}
	for range conns {
		c.Pick("hot.example.com", ups, nil).active.Add(1)
	}
	hot := 0
	for _, u := range ups {
		if u.Active() == conns {
			hot++
		}
	}
	if hot != 1 {
		t.Fatal("unbounded: the hot key did not stay on one upstream")
	}
}

func TestStrategiesSkipDownAndTried(t *testing.T) {
	for name, s := range allStrategies() {
		t.Run(name, func(t *testing.T) {
			ups := testUpstreams(3, 5, 3, 1)
			ups[1].benched.Store(true)
			for i := range 300 {
				u := s.Pick("key-"+strconv.Itoa(i), ups, nil)
				if u == nil || u == ups[1] {
					t.Fatalf("picked %v with upstream 1 down", u)
				}
				if u2 := s.Pick("key-"+strconv.Itoa(i), ups, []*Upstream{u}); u2 == nil || u2 == u || u2 == ups[1] {
					t.Fatalf("with %s tried and 1 down, picked %v", u.Name, u2)
				}
			}
			if u := s.Pick("k", ups, []*Upstream{ups[0], ups[2]}); u != nil {
				t.Fatalf("picked %s with every upstream down or tried", u.Name)
			}
			for _, u := range ups {
				u.benched.Store(true)
			}
			if u := s.Pick("k", ups, nil); u != nil {
				t.Fatalf("picked %s with every upstream down", u.Name)
			}
			if u := s.Pick("k", nil, nil); u != nil {
				t.Fatal("picked from no upstreams")
			}
		})
	}
}

func TestNewStrategy(t *testing.T) {
	for _, name := range []string{"round-robin", "weighted", "least-conn", "consistent-hash"} {
		if s, err := NewStrategy(name); err != nil || s == nil {
			t.Errorf("NewStrategy(%q) = %v, %v", name, s, err)
		}
	}
	_, err := NewStrategy("random")
	if err == nil || !strings.Contains(err.Error(), `"random"`) || !strings.Contains(err.Error(), "consistent-hash") {
		t.Fatalf("NewStrategy(random) error = %v; want it to name the value and the choices", err)
	}
}

func TestHashKey(t *testing.T) {
	client := netip.MustParseAddrPort("192.168.1.10:51000")
	dst := netip.MustParseAddrPort("[2001:db8::1]:443")
	for _, tc := range []struct {
		name string
		host string
		want string
	}{
		{"host", "example.com", "example.com"},
		{"host", "", "2001:db8::1"},
		{"", "", "2001:db8::1"},
		{"client", "example.com", "192.168.1.10"},
		{"client+dst", "example.com", "192.168.1.10>example.com"},
		{"client+dst", "", "192.168.1.10>2001:db8::1"},
	} {
		k, err := ParseHashKey(tc.name)
		if err != nil {
			t.Fatal(err)
		}
		if got := k.Key(client, dst, tc.host); got != tc.want {
			t.Errorf("%s.Key(host %q) = %q, want %q", k, tc.host, got, tc.want)
		}
	}
	if _, err := ParseHashKey("dst"); err == nil || !strings.Contains(err.Error(), `"dst"`) {
		t.Fatalf("ParseHashKey(dst) error = %v", err)
	}
}

func BenchmarkPick(b *testing.B) {
	keys := testHosts(1024)
	for _, n := range []int{3, 50} {
		for _, name := range []string{"round-robin", "weighted", "least-conn", "consistent-hash"} {
			b.Run(fmt.Sprintf("%s/%d", name, n), func(b *testing.B) {
				ups := testUpstreams(n, 5, 3, 1)
				s, _ := NewStrategy(name)
				s.Pick(keys[0], ups, nil) // build the ring
				b.ReportAllocs()
				i := 0
				for b.Loop() {
					if s.Pick(keys[i&1023], ups, nil) == nil {
						b.Fatal("nil pick")
					}
					i++
				}
			})
		}
	}
}
