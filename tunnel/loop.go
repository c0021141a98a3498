package tunnel

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// LoopGuard knows detour's own outbound connections, so that one that comes
// back to detour (a routing loop: capture rules that do not exempt detour's
// socket mark, or a policy rule whose fwmark/mask overlaps it) is recognised
// at its first hop by its peer address, the local address of one of them.
//
// It holds each established outbound connection's local address, added once
// connected (Dialed) and removed at close (Closed; an entry whose socket was
// closed without it is never taken for a loop, and is swept out as the
// table grows), and, while a dial is in flight, its socket (from the
// Dialer's Control hook, Control): a looped connection is accepted as soon
// as its handshake completes, which may be before the dialling goroutine
// has run again, so Looped also asks the in-flight sockets to the same
// destination for their local address, each socket at most once (the
// answer is kept with it).
//
// A looped connection's peer is always one of the host's own addresses, so
// Looped first looks the peer's address up in a cached set of them (the
// interfaces' addresses, read at first use and again at most once a second
// when a peer is not in it, plus every local address Dialed has seen, which
// a new address joins with its first established connection): an ordinary
// connection from another host costs one map lookup and no system call.
// The zero value is ready to use; it is safe for concurrent use.
type LoopGuard struct {
	// Cause is the likely cause named in the "routing loop" line; empty
	// means a generic one.
	Cause string

	shards [loopShards]loopShard
	host   hostAddrs

	// Tests' hooks; nil means the real ones: getsockname(2), and the
	// interfaces' addresses.
	sockName   func(syscall.RawConn) (netip.AddrPort, bool)
	interfaces func() ([]netip.Addr, error)
}

func (g *LoopGuard) cause() string {
	if g.Cause != "" {
		return g.Cause
	}
	return "a connection detour made came back to it: the capture rules do not exempt detour's socket mark, or an ip rule's fwmark/mask matches it"
}

const (
	loopShards = 32
	// maxInFlight bounds the sockets remembered per destination while they
	// connect; beyond it the oldest are forgotten (a loop through one of
	// them is then found at the next hop).
	maxInFlight = 64
)

// dialing is one socket of a dial in flight, and its local address once
// asked (the kernel binds it in connect(2), so it never changes after).
type dialing struct {
	rc    syscall.RawConn
	local atomic.Pointer[netip.AddrPort]
	dead  atomic.Bool // closed (its dial failed): never asked again
}

type loopShard struct {
	mu       sync.Mutex
	local    map[netip.AddrPort]syscall.RawConn // established: local address → socket
	inFlight map[netip.AddrPort][]*dialing      // dialling: destination → sockets
	sweepAt  int                                // sweep closed sockets out of local at this size
}

func loopShardOf(g *LoopGuard, ap netip.AddrPort) *loopShard {
	a := ap.Addr().As16()
	h := uint64(ap.Port())
	for _, b := range a[8:] {
		h = h*0x100000001b3 ^ uint64(b)
	}
	h *= 0x9E3779B97F4A7C15
	return &g.shards[h>>(64-5)]
}

// Control wraps a Dialer Control function (next may be nil): the socket is
// remembered as in flight to address until Dialed or its close.
func (g *LoopGuard) Control(next func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		if next != nil {
			if err := next(network, address, c); err != nil {
				return err
			}
		}
		if network != "tcp" && network != "tcp4" && network != "tcp6" {
			return nil // a UDP session's socket: it is not accepted
		}
		dst, err := netip.ParseAddrPort(address)
		if err != nil {
			return nil // not an IP literal: nothing loops to it by address
		}
		g.track(dst, &dialing{rc: c})
		return nil
	}
}

// track records d, a socket being dialled to dst (d.rc set): Control's
// bookkeeping. The caller may keep d with the socket: one record per
// socket, never reused.
func (g *LoopGuard) track(dst netip.AddrPort, d *dialing) {
	dst = unmap(dst)
	s := loopShardOf(g, dst)
	s.mu.Lock()
	if s.inFlight == nil {
		s.inFlight = map[netip.AddrPort][]*dialing{}
	}
	list := s.inFlight[dst]
	if len(list) >= maxInFlight {
		list = live(list)
		if len(list) >= maxInFlight {
			list = list[1:]
		}
	}
	s.inFlight[dst] = append(list, d)
	s.mu.Unlock()
}

// Dialed records c, a connection detour made, as established: a connection
// from its local address is a loop until Closed(c). It also forgets the
// sockets to c's destination whose dial has ended.
func (g *LoopGuard) Dialed(c *net.TCPConn) {
	local, remote := addrsOf(c)
	if !local.IsValid() {
		return
	}
	crc, err := c.SyscallConn()
	if err != nil {
		return
	}
	g.host.learn(local.Addr())
	s := loopShardOf(g, local)
	s.mu.Lock()
	if s.local == nil {
		s.local, s.sweepAt = map[netip.AddrPort]syscall.RawConn{}, 16
	}
	s.local[local] = crc
	if len(s.local) >= s.sweepAt {
		// Connections closed without Closed: drop them, and sweep again
		// when the table has doubled (amortised O(1) per Dialed).
		for ap, rc := range s.local {
			if rc.Control(func(uintptr) {}) != nil {
				delete(s.local, ap)
			}
		}
		s.sweepAt = max(16, 2*len(s.local))
	}
	s.mu.Unlock()

	// c's own in-flight entry is a socket of a finished dial now. Its fd
	// lives on in c, so it is found by fd number.
	fd := -1
	crc.Control(func(f uintptr) { fd = int(f) })
	s = loopShardOf(g, remote)
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.inFlight[remote]
	out := list[:0]
	for _, d := range list {
		same := false
		if err := d.rc.Control(func(f uintptr) { same = int(f) == fd }); err == nil && !same {
			out = append(out, d)
		}
	}
	clear(list[len(out):])
	if len(out) == 0 {
		delete(s.inFlight, remote)
	} else {
		s.inFlight[remote] = out
	}
}

// dialClosed forgets rc, a socket dialled to dst by an event loop, before
// its descriptor is closed. Such a socket is never Dialed: it stays in
// flight (found by its local address, asked once) until it closes, so the
// established table is not needed for it.
func (g *LoopGuard) dialClosed(dst netip.AddrPort, rc syscall.RawConn) {
	dst = unmap(dst)
	s := loopShardOf(g, dst)
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.inFlight[dst]
	for i, d := range list {
		if d.rc == rc {
			list = append(list[:i], list[i+1:]...)
			list[len(list):cap(list)][0] = nil
			break
		}
	}
	if len(list) == 0 {
		delete(s.inFlight, dst)
	} else {
		s.inFlight[dst] = list
	}
}

// Closed forgets c (call it before or right after closing c; its
// addresses are cached by the net package).
func (g *LoopGuard) Closed(c *net.TCPConn) {
	local, _ := addrsOf(c)
	if !local.IsValid() {
		return
	}
	s := loopShardOf(g, local)
	s.mu.Lock()
	delete(s.local, local)
	s.mu.Unlock()
}

// Looped reports whether a connection accepted from peer, going to dst, is
// one of detour's own connections come back.
//
// A peer that is none of the host's addresses (nor dst's) is no loop: one
// map lookup.
// Otherwise the dials in flight are asked before the established table:
// Dialed adds to the table before it drops the dial, so a connection missed
// by the first look is found by the second.
func (g *LoopGuard) Looped(peer, dst netip.AddrPort) bool {
	peer, dst = unmap(peer), unmap(dst)
	// A route of type local gives a dial the destination's own address as
	// its source; so a peer with dst's address is looked at too.
	if peer.Addr() != dst.Addr() && !g.host.contains(peer.Addr(), g.interfaces) {
		return false
	}
	s := loopShardOf(g, dst)
	s.mu.Lock()
	dialling := len(s.inFlight[dst]) > 0
	s.mu.Unlock()
	if dialling && g.inFlightFrom(s, dst, peer) {
		return true
	}
	s = loopShardOf(g, peer)
	s.mu.Lock()
	rc, mine := s.local[peer]
	s.mu.Unlock()
	// Still open: a socket closed without Closed is not a loop.
	return mine && rc.Control(func(uintptr) {}) == nil
}

// inFlightFrom reports whether one of the sockets being dialled to dst (in
// shard s) has the local address peer. Each socket is asked once; a socket
// asked before connect(2) has bound it (port 0) is asked again next time.
func (g *LoopGuard) inFlightFrom(s *loopShard, dst, peer netip.AddrPort) bool {
	var candidates [maxInFlight]*dialing
	s.mu.Lock()
	n := copy(candidates[:], s.inFlight[dst])
	s.mu.Unlock()
	name := g.sockName
	if name == nil {
		name = sockName
	}
	for i := n - 1; i >= 0; i-- { // the newest dial is the likeliest
		d := candidates[i]
		if d.dead.Load() {
			continue
		}
		if p := d.local.Load(); p != nil {
			if *p == peer && d.rc.Control(func(uintptr) {}) == nil {
				return true
			}
			continue
		}
		local, ok := name(d.rc)
		if !ok {
			if d.rc.Control(func(uintptr) {}) != nil {
				d.dead.Store(true)
			}
			continue
		}
		if local.Port() != 0 {
			d.local.Store(&local)
		}
		if local == peer {
			return true
		}
	}
	return false
}

// hostAddrs is the set of the host's own addresses: the ones a looped
// connection's peer can have, and the proxy port's refused targets. Copy
// on write, read without a lock.
type hostAddrs struct {
	set    atomic.Pointer[map[netip.Addr]struct{}]
	mu     sync.Mutex // one reader of the interfaces at a time; learn
	readAt atomic.Int64
}

// hostRereadEvery spaces the re-reads of the interfaces' addresses that a
// peer not in the set causes (every connection from another host is one).
const hostRereadEvery = int64(time.Second)

// contains reports whether a may be one of the host's addresses. A miss
// reads the interfaces again if the last read is hostRereadEvery old (by
// the one caller that gets the lock; the others use the set as it is).
func (h *hostAddrs) contains(a netip.Addr, interfaces func() ([]netip.Addr, error)) bool {
	a = a.Unmap().WithZone("")
	if a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	set := h.set.Load()
	if set != nil {
		if _, ok := (*set)[a]; ok {
			return true
		}
		if time.Now().UnixNano()-h.readAt.Load() < hostRereadEvery {
			return false
		}
	}
	if set == nil {
		h.mu.Lock()
	} else if !h.mu.TryLock() {
		return false
	}
	defer h.mu.Unlock()
	if h.set.Load() == set { // not read meanwhile
		h.read(interfaces)
	}
	_, ok := (*h.set.Load())[a]
	return ok
}

// read replaces the set by the interfaces' addresses (h.mu held): learned
// ones gone from the interfaces leave it. A failed read keeps the old set.
func (h *hostAddrs) read(interfaces func() ([]netip.Addr, error)) {
	if interfaces == nil {
		interfaces = interfaceAddrs
	}
	next := map[netip.Addr]struct{}{}
	addrs, err := interfaces()
	for _, ip := range addrs {
		next[ip.Unmap().WithZone("")] = struct{}{}
	}
	if old := h.set.Load(); old != nil && err != nil {
		for ip := range *old { // keep what was known rather than nothing
			next[ip] = struct{}{}
		}
	}
	h.set.Store(&next)
	h.readAt.Store(time.Now().UnixNano())
}

// learn adds a, the local address of an established outbound connection,
// to the set if it is not in it (an address added since the last read).
func (h *hostAddrs) learn(a netip.Addr) {
	a = a.WithZone("")
	if a.IsLoopback() || a.IsUnspecified() {
		return
	}
	if set := h.set.Load(); set != nil {
		if _, ok := (*set)[a]; ok {
			return
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	old := h.set.Load()
	next := make(map[netip.Addr]struct{}, 1)
	if old != nil {
		next = make(map[netip.Addr]struct{}, len(*old)+1)
		for ip := range *old {
			next[ip] = struct{}{}
		}
	}
	next[a] = struct{}{}
	h.set.Store(&next)
}

// interfaceAddrs is the addresses of the host's interfaces.
func interfaceAddrs() ([]netip.Addr, error) {
	ifas, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(ifas))
	for _, ifa := range ifas {
		if n, ok := ifa.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip)
			}
		}
	}
	return out, nil
}

// addrsOf is c's local and remote address, IPv4-mapped ones unmapped.
func addrsOf(c *net.TCPConn) (local, remote netip.AddrPort) {
	if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
		local = unmap(a.AddrPort())
	}
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		remote = unmap(a.AddrPort())
	}
	return local, remote
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// live drops the sockets that were closed (their dial failed, or they
// were dialled and closed).
func live(list []*dialing) []*dialing {
	out := list[:0]
	for _, d := range list {
		if d.rc.Control(func(uintptr) {}) == nil {
			out = append(out, d)
		}
	}
	clear(list[len(out):])
	return out
}
