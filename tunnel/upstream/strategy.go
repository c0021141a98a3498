package upstream

import (
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
)

// Strategy picks the upstream for one connection. Implementations are safe
// for concurrent use and do not allocate per pick.
type Strategy interface {
	// Pick returns one of ups for key, skipping those that are not Up and
	// those in tried (the ones that already failed for this connection); nil
	// if none is left.
	Pick(key string, ups, tried []*Upstream) *Upstream
}

var (
	_ Strategy = (*RoundRobin)(nil)
	_ Strategy = (*Weighted)(nil)
	_ Strategy = (*LeastConn)(nil)
	_ Strategy = (*ConsistentHash)(nil)
)

// NewStrategy returns a fresh strategy by its command-line name:
// round-robin, weighted, least-conn or consistent-hash (with the default
// hash and load bound).
func NewStrategy(name string) (Strategy, error) {
	switch name {
	case "round-robin":
		return &RoundRobin{}, nil
	case "weighted":
		return &Weighted{}, nil
	case "least-conn":
		return &LeastConn{}, nil
	case "consistent-hash":
		return &ConsistentHash{}, nil
	}
	return nil, fmt.Errorf("unknown strategy %q (want round-robin, weighted, least-conn or consistent-hash)", name)
}

func usable(u *Upstream, tried []*Upstream) bool {
	return u.Up() && !slices.Contains(tried, u)
}

// RoundRobin takes the upstreams in turn, ignoring weights. The zero value
// is ready to use.
type RoundRobin struct {
	next atomic.Uint64
}

func (r *RoundRobin) Pick(_ string, ups, tried []*Upstream) *Upstream {
	n := uint64(len(ups))
	if n == 0 {
		return nil
	}
	start := r.next.Add(1) - 1
	for i := range n {
		if u := ups[(start+i)%n]; usable(u, tried) {
			return u
		}
	}
	return nil
}

// Weighted is smooth weighted round-robin, as nginx does it: on each pick
// every usable upstream's current value grows by its weight, the largest
// is picked and loses the total. Weights 5:3:1 give a b a c a b a b a,
// interleaved rather than in bursts. The zero value is ready to use; the
// state restarts when the set of upstreams changes.
type Weighted struct {
	mu      sync.Mutex
	members []*Upstream
	current []int64
}

func (w *Weighted) Pick(_ string, ups, tried []*Upstream) *Upstream {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !slices.Equal(w.members, ups) {
		w.members = append(w.members[:0], ups...)
		w.current = make([]int64, len(ups))
	}
	best, total := -1, int64(0)
	for i, u := range ups {
		if !usable(u, tried) {
			continue
		}
		wt := u.weight()
		w.current[i] += wt
		total += wt
		if best < 0 || w.current[i] > w.current[best] {
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	w.current[best] -= total
	return ups[best]
}

// LeastConn picks the upstream with the fewest active connections; among
// equals the heavier, then the next in turn. The zero value is ready to
// use.
type LeastConn struct {
	next atomic.Uint64
}

func (l *LeastConn) Pick(_ string, ups, tried []*Upstream) *Upstream {
	n := uint64(len(ups))
	if n == 0 {
		return nil
	}
	start := l.next.Add(1) - 1
	var best *Upstream
	var bestActive int64
	for i := range n {
		u := ups[(start+i)%n]
		if !usable(u, tried) {
			continue
		}
		a := u.Active()
		if best == nil || a < bestActive || (a == bestActive && u.weight() > best.weight()) {
			best, bestActive = u, a
		}
	}
	return best
}

// ConsistentHash maps each key to a point on a ring of virtual nodes
// (Replicas per unit of weight for each upstream, placed by hashing its
// Name) and takes the first usable upstream clockwise from it. Removing or
// downing one of N upstreams moves only the keys it held, about 1/N of
// them. With the load bound (Mirrokni et al., "Consistent Hashing with
// Bounded Loads"), an upstream already at LoadFactor times its share of
// the active connections is passed over for the next one on the ring, so a
// hot key cannot pile onto one upstream. The zero value is ready to use.
type ConsistentHash struct {
	// Hash maps keys and virtual nodes to the ring. Nil means FNV-1a (64
	// bits) with a splitmix64 finalizer: fixed, so mappings survive
	// restarts.
	Hash func(string) uint64
	// Replicas is the number of virtual nodes per unit of weight. Zero
	// means 160. The ring is capped at about a million points; heavier
	// configurations get fewer per unit.
	Replicas int
	// LoadFactor caps each usable upstream at ceil(LoadFactor × (active+1)
	// × weight/total weight) connections, where active is the sum over
	// usable upstreams. Zero means 1.25; negative turns the bound off;
	// values between 0 and 1 mean 1.
	LoadFactor float64

	mu   sync.Mutex // serializes rebuilding
	ring atomic.Pointer[hashRing]
}

const (
	defaultReplicas   = 160
	maxRingPoints     = 1 << 20
	defaultLoadFactor = 1.25
)

// hashRing is the ring built for one set of upstreams (and weights).
type hashRing struct {
	members []*Upstream
	weights []int64
	points  []ringPoint // sorted by hash
}

type ringPoint struct {
	hash  uint64
	owner int32 // index in members
}

func (r *hashRing) matches(ups []*Upstream) bool {
	if len(r.members) != len(ups) {
		return false
	}
	for i, u := range ups {
		if r.members[i] != u || r.weights[i] != u.weight() {
			return false
		}
	}
	return true
}

func (c *ConsistentHash) hash(s string) uint64 {
	if c.Hash != nil {
		return c.Hash(s)
	}
	return fnv1aMix(s)
}

// ringFor returns the ring for ups, building it when they changed.
func (c *ConsistentHash) ringFor(ups []*Upstream) *hashRing {
	if r := c.ring.Load(); r != nil && r.matches(ups) {
		return r
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.ring.Load(); r != nil && r.matches(ups) {
		return r
	}
	r := &hashRing{members: slices.Clone(ups), weights: make([]int64, len(ups))}
	var total int64
	for i, u := range ups {
		r.weights[i] = u.weight()
		total += r.weights[i]
	}
	replicas := int64(c.Replicas)
	if replicas <= 0 {
		replicas = defaultReplicas
	}
	if total > 0 && replicas*total > maxRingPoints {
		replicas = max(1, maxRingPoints/total)
	}
	r.points = make([]ringPoint, 0, replicas*total)
	for i, u := range ups {
		for v := range replicas * r.weights[i] {
			r.points = append(r.points, ringPoint{hash: c.hash(u.Name + "#" + strconv.FormatInt(v, 10)), owner: int32(i)})
		}
	}
	// Ties (equal names) go to the earlier upstream, so the ring does not
	// depend on sort order.
	sort.Slice(r.points, func(a, b int) bool {
		pa, pb := r.points[a], r.points[b]
		return pa.hash < pb.hash || (pa.hash == pb.hash && pa.owner < pb.owner)
	})
	c.ring.Store(r)
	return r
}

func (c *ConsistentHash) Pick(key string, ups, tried []*Upstream) *Upstream {
	if len(ups) == 0 {
		return nil
	}
	r := c.ringFor(ups)

	// The bound: each usable upstream's capacity is its weighted share of
	// the connections, counting the one being placed.
	lf := c.LoadFactor
	bounded := lf >= 0
	var active, weights int64
	if bounded {
		if lf == 0 {
			lf = defaultLoadFactor
		}
		lf = max(lf, 1)
		for _, u := range ups {
			if usable(u, tried) {
				active += u.Active()
				weights += u.weight()
			}
		}
	}

	h := c.hash(key)
	points := r.points
	start, _ := slices.BinarySearchFunc(points, h, func(p ringPoint, h uint64) int {
		switch {
		case p.hash < h:
			return -1
		case p.hash > h:
			return 1
		}
		return 0
	})
	var first *Upstream // the key's own upstream, when all are at capacity
	last := int32(-1)
	for i := range len(points) {
		p := points[(start+i)%len(points)]
		if p.owner == last {
			continue
		}
		last = p.owner
		u := ups[p.owner]
		if !usable(u, tried) {
			continue
		}
		if !bounded {
			return u
		}
		if first == nil {
			first = u
		}
		capacity := int64(math.Ceil(lf * float64(active+1) * float64(u.weight()) / float64(weights)))
		if u.Active() < capacity {
			return u
		}
	}
	return first
}

// fnv1aMix is FNV-1a (64 bits) followed by the splitmix64 finalizer, which
// spreads FNV's weak low bits over the ring.
func fnv1aMix(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return h
}

// HashKey says what a consistent-hash group hashes to pick an upstream for
// a connection. The zero value is HashHost.
type HashKey uint8

const (
	// HashHost hashes the sniffed hostname, else the destination IP: one
	// site keeps its upstream.
	HashHost HashKey = iota
	// HashClient hashes the client's IP: one client keeps its upstream.
	HashClient
	// HashClientDst hashes the client's IP with the destination (hostname,
	// else IP): one client keeps its upstream per site.
	HashClientDst
)

// ParseHashKey parses "host", "client" or "client+dst"; "" means host.
func ParseHashKey(s string) (HashKey, error) {
	switch s {
	case "host", "":
		return HashHost, nil
	case "client":
		return HashClient, nil
	case "client+dst":
		return HashClientDst, nil
	}
	return 0, fmt.Errorf("unknown hash key %q (want host, client or client+dst)", s)
}

func (k HashKey) String() string {
	switch k {
	case HashHost:
		return "host"
	case HashClient:
		return "client"
	case HashClientDst:
		return "client+dst"
	}
	return "HashKey(" + strconv.Itoa(int(k)) + ")"
}

// Key is the string to hash for a connection from client to dst, with the
// sniffed host ("" if none). Ports are left out.
func (k HashKey) Key(client, dst netip.AddrPort, host string) string {
	site := host
	if site == "" {
		site = dst.Addr().String()
	}
	switch k {
	case HashClient:
		return client.Addr().String()
	case HashClientDst:
		return client.Addr().String() + ">" + site
	}
	return site
}
