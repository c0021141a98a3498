package tunnel

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func loopListener(t testing.TB) (*net.TCPListener, netip.AddrPort) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener), ln.Addr().(*net.TCPAddr).AddrPort()
}

func guardedDial(t testing.TB, g *LoopGuard, addr netip.AddrPort) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Control: g.Control(nil)}
	c, err := d.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func peerOf(t testing.TB, ln *net.TCPListener) netip.AddrPort {
	t.Helper()
	a, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	return a.RemoteAddr().(*net.TCPAddr).AddrPort()
}

// A connection from the local address of one of detour's own connections is
// a loop: while its dial is in flight (before Dialed), once established, and
// no more after Closed. Other peers are not.
func TestLoopGuard(t *testing.T) {
	var g LoopGuard
	ln, dst := loopListener(t)

	// Connected, but Dialed not called yet: the in-flight socket answers.
	c := guardedDial(t, &g, dst)
	peer := peerOf(t, ln)
	if !g.Looped(peer, dst) {
		t.Fatal("a connection from an in-flight dial's socket is not a loop")
	}
	g.Dialed(c)
	if n := len(loopShardOf(&g, dst).inFlight[dst]); n != 0 {
		t.Errorf("%d in-flight sockets left after Dialed, want 0", n)
	}
	if !g.Looped(peer, dst) {
		t.Fatal("a connection from an established connection's local address is not a loop")
	}
	// IPv4-mapped forms are the same address.
	mapped := netip.AddrPortFrom(netip.AddrFrom16(peer.Addr().As16()), peer.Port())
	if !g.Looped(mapped, dst) {
		t.Error("the IPv4-mapped peer address is not recognised")
	}
	other := netip.AddrPortFrom(peer.Addr(), peer.Port()+1)
	if g.Looped(other, dst) {
		t.Error("another port of the same host is a loop")
	}
	g.Closed(c)
	if g.Looped(peer, dst) {
		t.Error("still a loop after Closed")
	}
}

// A connection closed without Closed is no loop, and is swept out of the
// table as it grows.
func TestLoopGuardClosedWithoutClosed(t *testing.T) {
	var g LoopGuard
	ln, dst := loopListener(t)
	go func() {
		for {
			a, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			a.Close()
		}
	}()
	var locals []netip.AddrPort
	for range 2000 {
		c := guardedDial(t, &g, dst)
		g.Dialed(c)
		locals = append(locals, c.LocalAddr().(*net.TCPAddr).AddrPort())
		c.Close()
	}
	for _, l := range locals {
		if g.Looped(l, dst) {
			t.Fatalf("closed connection %s taken for a loop", l)
		}
	}
	n := 0
	for i := range g.shards {
		n += len(g.shards[i].local)
	}
	if n >= 1000 {
		t.Errorf("%d entries of closed connections kept; want them swept", n)
	}
}

// A failed dial leaves nothing that matches, and is forgotten.
func TestLoopGuardFailedDial(t *testing.T) {
	var g LoopGuard
	ln, dst := loopListener(t)
	ln.Close()
	d := net.Dialer{Control: g.Control(nil)}
	if c, err := d.Dial("tcp", dst.String()); err == nil {
		c.Close()
		t.Skip("the closed port accepted a connection")
	}
	if g.Looped(netip.MustParseAddrPort("127.0.0.1:1"), dst) {
		t.Error("a failed dial made a loop")
	}
	s := loopShardOf(&g, dst)
	s.mu.Lock()
	s.inFlight[dst] = live(s.inFlight[dst])
	n := len(s.inFlight[dst])
	s.mu.Unlock()
	if n != 0 {
		t.Errorf("%d sockets of failed dials kept, want 0", n)
	}
}

// Many dials, checks and closes at once: each connection is recognised at
// accept, whether its dialer has called Dialed yet or not (and the race
// detector watches).
func TestLoopGuardConcurrent(t *testing.T) {
	var g LoopGuard
	ln, dst := loopListener(t)
	var seen sync.Map // peer → recognised at accept
	go func() {
		for {
			a, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			peer := a.RemoteAddr().(*net.TCPAddr).AddrPort()
			seen.Store(peer, g.Looped(peer, dst))
			a.Close()
		}
	}()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 50 {
				d := net.Dialer{Control: g.Control(nil)}
				c, err := d.Dial("tcp", dst.String())
				if err != nil {
					t.Error(err)
					return
				}
				tc := c.(*net.TCPConn)
				g.Dialed(tc)
				local := tc.LocalAddr().(*net.TCPAddr).AddrPort()
				deadline := time.Now().Add(5 * time.Second)
				for {
					if v, ok := seen.LoadAndDelete(local); ok {
						if !v.(bool) {
							t.Errorf("connection from %s not recognised at accept", local)
						}
						break
					}
					if time.Now().After(deadline) {
						t.Error("not accepted within 5s")
						break
					}
					time.Sleep(time.Millisecond)
				}
				g.Closed(tc)
				c.Close()
			}
		}()
	}
	wg.Wait()
	if n := len(loopShardOf(&g, dst).inFlight[dst]); n != 0 {
		t.Errorf("%d in-flight sockets left, want 0", n)
	}
}

// countSockName counts the getsockname calls the guard makes.
func countSockName(g *LoopGuard) *atomic.Int64 {
	var n atomic.Int64
	g.sockName = func(rc syscall.RawConn) (netip.AddrPort, bool) {
		n.Add(1)
		return sockName(rc)
	}
	return &n
}

// An ordinary connection costs the guard no getsockname: one from another
// host none at all, even with dials to its destination in flight; one from
// a local address that is not detour's asks each in-flight socket once,
// and never again. A looped one is still found while its dial is in flight.
func TestLoopGuardOrdinaryAcceptNoSockName(t *testing.T) {
	g := &LoopGuard{interfaces: func() ([]netip.Addr, error) { return nil, nil }}
	calls := countSockName(g)
	ln, dst := loopListener(t)
	var peers []netip.AddrPort
	for range 3 { // dials to dst in flight (connected, Dialed not called)
		guardedDial(t, g, dst)
		peers = append(peers, peerOf(t, ln))
	}
	lan := netip.MustParseAddrPort("198.18.1.2:40000")
	for range 100 {
		if g.Looped(lan, dst) {
			t.Fatal("a connection from another host is a loop")
		}
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("100 accepts from another host made %d getsockname calls, want 0", n)
	}
	local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), 1)
	if g.Looped(local, dst) {
		t.Fatal("a local peer that is none of detour's is a loop")
	}
	if n := calls.Load(); n != 3 {
		t.Fatalf("the first local accept made %d getsockname calls, want 3 (one per in-flight dial)", n)
	}
	for range 100 {
		if g.Looped(local, dst) {
			t.Fatal("a local peer that is none of detour's is a loop")
		}
	}
	for _, p := range peers {
		if !g.Looped(p, dst) {
			t.Fatalf("the connection from in-flight dial %s is not a loop", p)
		}
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("%d getsockname calls after 100 more local accepts and 3 loops, want still 3", n)
	}

	// A failed dial's socket (closed while in flight) is asked once.
	c := guardedDial(t, &LoopGuard{}, dst)
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Control(nil)("tcp4", dst.String(), rc); err != nil {
		t.Fatal(err)
	}
	c.Close()
	before := calls.Load()
	for range 100 {
		g.Looped(local, dst)
	}
	if n := calls.Load() - before; n != 1 {
		t.Errorf("a closed in-flight socket was asked %d times in 100 local accepts, want 1", n)
	}
}

// An address the host gains while detour runs: a peer from it is found
// once the interfaces are read again (at most once per hostRereadEvery, on
// a miss), or at once when an outbound connection from it was established.
func TestLoopGuardNewHostAddress(t *testing.T) {
	added := netip.MustParseAddr("198.18.7.7")
	var have atomic.Bool
	g := &LoopGuard{interfaces: func() ([]netip.Addr, error) {
		if have.Load() {
			return []netip.Addr{added}, nil
		}
		return nil, nil
	}}
	own := netip.AddrPortFrom(added, 5555)
	g.sockName = func(syscall.RawConn) (netip.AddrPort, bool) { return own, true }
	_, dst := loopListener(t)
	guardedDial(t, g, dst) // in flight; its (faked) local address is own

	if g.Looped(own, dst) {
		t.Fatal("a peer from an address the host does not have is a loop")
	}
	have.Store(true)
	if g.Looped(own, dst) {
		t.Fatal("the interfaces were read again before hostRereadEvery")
	}
	g.host.readAt.Store(time.Now().UnixNano() - hostRereadEvery)
	if !g.Looped(own, dst) {
		t.Fatal("a loop from an address added at runtime is not found after the re-read")
	}

	// A local route makes the destination's address a dial's source.
	self := netip.AddrPortFrom(netip.MustParseAddr("198.18.8.8"), 80)
	g.sockName = func(syscall.RawConn) (netip.AddrPort, bool) {
		return netip.AddrPortFrom(self.Addr(), 4444), true
	}
	// The socket of a loopback connection, registered as in flight to self
	// (nothing is sent there).
	rc, err := guardedDial(t, &LoopGuard{}, dst).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Control(nil)("tcp4", self.String(), rc); err != nil {
		t.Fatal(err)
	}
	if !g.Looped(netip.AddrPortFrom(self.Addr(), 4444), self) {
		t.Error("a loop from the destination's own address (a local route) is not found")
	}

	var h hostAddrs
	none := func() ([]netip.Addr, error) { return nil, nil }
	if h.contains(added, none) {
		t.Fatal("an address not on the interfaces is the host's")
	}
	h.learn(added)
	if !h.contains(added, none) {
		t.Error("the local address of an established outbound connection is not learned")
	}
	if !h.contains(netip.MustParseAddr("::1"), none) || !h.contains(netip.MustParseAddr("127.0.0.9"), none) {
		t.Error("loopback is not the host's")
	}
}

// The cost for an ordinary connection: a peer that is none of detour's,
// with and without a dial to the same destination in flight.
func BenchmarkLoopGuardLooped(b *testing.B) {
	var g LoopGuard
	_, dst := loopListener(b)
	for i := range 10000 { // established connections elsewhere
		ap := netip.AddrPortFrom(netip.MustParseAddr("198.18.2.1"), uint16(10000+i))
		s := loopShardOf(&g, ap)
		if s.local == nil {
			s.local, s.sweepAt = map[netip.AddrPort]syscall.RawConn{}, 1<<30
		}
		s.local[ap] = nil
	}
	peer := netip.MustParseAddrPort("198.18.1.2:40000")
	b.Run("miss", func(b *testing.B) {
		for b.Loop() {
			if g.Looped(peer, dst) {
				b.Fatal("loop")
			}
		}
	})
	b.Run("miss-with-dial-in-flight", func(b *testing.B) {
		guardedDial(b, &g, dst) // never Dialed: stays in flight
		for b.Loop() {
			if g.Looped(peer, dst) {
				b.Fatal("loop")
			}
		}
	})
	// A client on the host itself (OUTPUT capture): its address is the
	// host's, so the in-flight dial is looked at (its address asked once).
	localPeer := netip.MustParseAddrPort("127.0.0.1:1")
	b.Run("local-miss-with-dial-in-flight", func(b *testing.B) {
		guardedDial(b, &g, dst)
		for b.Loop() {
			if g.Looped(localPeer, dst) {
				b.Fatal("loop")
			}
		}
	})
}

// The bookkeeping per outbound connection: Dialed once connected, Closed at
// the end (the dial's Control registration is measured with the dial).
func BenchmarkLoopGuardDialedClosed(b *testing.B) {
	var g LoopGuard
	ln, dst := loopListener(b)
	go func() {
		for {
			a, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			defer a.Close()
		}
	}()
	c := guardedDial(b, &g, dst)
	for b.Loop() {
		g.Dialed(c)
		g.Closed(c)
	}
}
