package tunnel

import (
	"net"
	"net/netip"
	"sync"
	"syscall"
)

// LoopGuard knows detour's own outbound connections, so that one that comes
// back to detour (a routing loop: capture rules that do not exempt detour's
// socket mark, or a policy rule whose fwmark/mask overlaps it) is recognised
// at its first hop by its peer address, the local address of one of them.
//
// It holds each established outbound connection's local address, added once
// connected (Dialed) and removed at close (Closed; an entry whose socket was
// closed without it is never taken for a loop, and is swept out as the
// table grows), and, while a dial is in
// flight, its socket (from the Dialer's Control hook, Control): a looped
// connection is accepted as soon as its handshake completes, which may be
// before the dialling goroutine has run again, so Looped also asks the
// in-flight sockets to the same destination for their local address. A
// lookup for an ordinary connection is one map lookup under a sharded lock
// (and a second one when connections to the same destination are being
// dialled). The zero value is ready to use; it is safe for concurrent use.
type LoopGuard struct {
	// Cause is the likely cause named in the "routing loop" line; empty
	// means a generic one.
	Cause string

	shards [loopShards]loopShard
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

type loopShard struct {
	mu       sync.Mutex
	local    map[netip.AddrPort]syscall.RawConn   // established: local address → socket
	inFlight map[netip.AddrPort][]syscall.RawConn // dialling: destination → sockets
	sweepAt  int                                  // sweep closed sockets out of local at this size
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
		dst = unmap(dst)
		s := loopShardOf(g, dst)
		s.mu.Lock()
		if s.inFlight == nil {
			s.inFlight = map[netip.AddrPort][]syscall.RawConn{}
		}
		list := s.inFlight[dst]
		if len(list) >= maxInFlight {
			list = live(list)
			if len(list) >= maxInFlight {
				list = list[1:]
			}
		}
		s.inFlight[dst] = append(list, c)
		s.mu.Unlock()
		return nil
	}
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
	for _, rc := range list {
		same := false
		if err := rc.Control(func(f uintptr) { same = int(f) == fd }); err == nil && !same {
			out = append(out, rc)
		}
	}
	clear(list[len(out):])
	if len(out) == 0 {
		delete(s.inFlight, remote)
	} else {
		s.inFlight[remote] = out
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
// The dials in flight are asked before the established table: Dialed adds
// to the table before it drops the dial, so a connection missed by the
// first look is found by the second.
func (g *LoopGuard) Looped(peer, dst netip.AddrPort) bool {
	peer, dst = unmap(peer), unmap(dst)
	s := loopShardOf(g, dst)
	s.mu.Lock()
	dialling := len(s.inFlight[dst]) > 0
	s.mu.Unlock()
	if dialling && inFlightFrom(s, dst, peer) {
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
// shard s) has the local address peer.
func inFlightFrom(s *loopShard, dst, peer netip.AddrPort) bool {
	var candidates [maxInFlight]syscall.RawConn
	s.mu.Lock()
	n := copy(candidates[:], s.inFlight[dst])
	s.mu.Unlock()
	for i := n - 1; i >= 0; i-- { // the newest dial is the likeliest
		if local, ok := sockName(candidates[i]); ok && local == peer {
			return true
		}
	}
	return false
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
func live(list []syscall.RawConn) []syscall.RawConn {
	out := list[:0]
	for _, rc := range list {
		if rc.Control(func(uintptr) {}) == nil {
			out = append(out, rc)
		}
	}
	clear(list[len(out):])
	return out
}
