package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
)

// dialFrom connects to ln from the loopback address ip, and checks the
// connection is served (an echo comes back).
func dialFrom(t *testing.T, ln *fakeListener, ip, msg string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip)}, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte(msg))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatalf("connection from %s: %v", ip, err)
	}
	c.SetReadDeadline(time.Time{})
	return c
}

// One client holding every one of MaxConns does not lock out another: the
// newcomer is served, and one of the hog's connections is reset instead.
// The hog itself is refused beyond the limit, as before.
func TestMaxConnsOneSourceCannotLockOthersOut(t *testing.T) {
	testkit.CheckGoroutines(t)
	dst, _ := testkit.EchoServer(t)
	ln := newFakeListener(t, dst, nil)
	obs := newCountingObserver()
	const maxConns = 4
	logs := startTunnel(t, ln, &Tunnel{MaxConns: maxConns, Observer: obs})

	var hog []*net.TCPConn
	for range maxConns {
		hog = append(hog, dialFrom(t, ln, "127.0.0.1", "x"))
	}
	// The hog's own next connection is refused.
	extra, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.ParseIP("127.0.0.1")}, ln.Addr().(*net.TCPAddr))
	if err == nil {
		defer extra.Close()
		extra.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = extra.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the hog's connection beyond the limit: %v, want a reset", err)
	}

	// Another client is served; one of the hog's is reset.
	other := dialFrom(t, ln, "127.0.0.2", "y")
	resets := 0
	for _, c := range hog {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, syscall.ECONNRESET) {
			resets++
		}
	}
	if resets != 1 {
		t.Fatalf("%d of the hog's connections were reset, want 1", resets)
	}
	logs.WaitFor(t, "resetting a connection of the client holding the most")
	logs.WaitFor(t, "held the most")
	// Shares even out: a third source is served at the hog's cost (it
	// holds 3 now against 0)…
	dialFrom(t, ln, "127.0.0.3", "z")
	// The reset one's access line may come after the newcomer's echo (on
	// the event loops its reset is posted to its own loop).
	for until := time.Now().Add(5 * time.Second); strings.Count(logs.String(), "held the most") < 2 && time.Now().Before(until); {
		time.Sleep(5 * time.Millisecond)
	}
	if n := strings.Count(logs.String(), "held the most"); n != 2 {
		t.Errorf("%d connections reset for others, want 2:\n%s", n, logs)
	}
	// …but the second source, holding 1 against the hog's 2, is refused:
	// nobody holds two more than it.
	again, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, ln.Addr().(*net.TCPAddr))
	if err == nil {
		defer again.Close()
		again.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = again.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("a source near its share beyond the limit: %v, want a reset", err)
	}
	// Counted just after the reset the client saw.
	deadline := time.Now().Add(5 * time.Second)
	for obs.get(func(o *countingObserver) int { return o.refused["limit"] }) < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := obs.get(func(o *countingObserver) int { return o.refused["limit"] }); n != 2 {
		t.Errorf("refused for limit = %d, want 2", n)
	}
	other.Close()
}

// One client sending a new name on every connection (each a lookup for a
// Verify route) cannot flush the names other clients use from the verify
// cache: past its share it replaces its own entries.
func TestVerifyCacheOneSourceCannotFlushOthers(t *testing.T) {
	var v verifyCache
	lookups := map[string]int{}
	lookup := func(_ context.Context, host string) ([]netip.Addr, error) {
		lookups[host]++
		return []netip.Addr{netip.MustParseAddr("198.18.2.2")}, nil
	}
	dst := netip.MustParseAddr("198.18.2.2")
	a, b := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("fd00:1::2")
	ctx := context.Background()
	for i := range 10 {
		if !v.resolvesTo(ctx, lookup, b, fmt.Sprintf("b%d.test", i), dst) {
			t.Fatal("name not verified")
		}
	}
	for i := range 2 * verifyEntries {
		v.resolvesTo(ctx, lookup, a, fmt.Sprintf("a%d.test", i), dst)
	}
	for i := range 10 {
		host := fmt.Sprintf("b%d.test", i)
		if !v.resolvesTo(ctx, lookup, b, host, dst) || lookups[host] != 1 {
			t.Fatalf("%s looked up %d times: flushed by another client's names", host, lookups[host])
		}
	}
	if n := len(v.entries); n != 10+verifyPerSource {
		t.Fatalf("%d entries, want B's 10 and A's share of %d", n, verifyPerSource)
	}
	// Many sources fill it to the bound, no further.
	for i := range 2 * verifyEntries {
		src := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		v.resolvesTo(ctx, lookup, src, fmt.Sprintf("m%d.test", i), dst)
	}
	if n := len(v.entries); n != verifyEntries {
		t.Fatalf("%d entries, want the bound %d", n, verifyEntries)
	}
	// A failed lookup is a no and is not kept.
	fail := func(context.Context, string) ([]netip.Addr, error) { return nil, errors.New("no such host") }
	if v.resolvesTo(ctx, fail, a, "missing.test", dst) || v.entries["missing.test"] != nil {
		t.Fatal("a failed lookup verified or was kept")
	}
}

// The per-source bookkeeping on the path of every connection: a sniffing
// slot taken and given back, and a connection counted in and out with and
// without MaxConns (go test -bench 'Slots|AddRemove' ./tunnel).
func BenchmarkSniffingSlots(b *testing.B) {
	var tun Tunnel
	src := netip.MustParseAddr("198.18.1.2")
	for b.Loop() {
		tun.enterSniffing(src)
		tun.leaveSniffing(src)
	}
}

func BenchmarkAddRemove(b *testing.B) {
	client, _ := testkit.TCPPair(b)
	for _, maxConns := range []int{0, 1 << 20} {
		b.Run(fmt.Sprintf("MaxConns=%d", maxConns), func(b *testing.B) {
			tun := Tunnel{MaxConns: maxConns}
			cn := &conn{client: client, peer: addrPort(client.RemoteAddr())}
			for b.Loop() {
				tun.add(cn)
				tun.remove(cn)
			}
		})
	}
}
