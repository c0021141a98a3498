package upstream

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
)

// Through an HTTP CONNECT proxy, Preconnect opens the TCP connection and
// sends nothing (the request names the target); Dial then sends the
// CONNECT for the target and the tunnel works.
func TestPreconnectHTTPConnect(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	heads := make(chan string, 1)
	p := httpProxy(t, "", "", heads)
	u := &Upstream{Name: "http", Dialer: &HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: time.Second}}}
	g := &Group{Name: "g", Upstreams: []*Upstream{u}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	pending, err := g.Preconnect(ctx, "")
	if err != nil || pending == nil {
		t.Fatalf("Preconnect = %v, %v", pending, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for p.accepted.Load() != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := p.accepted.Load(); n != 1 {
		t.Fatalf("proxy accepted %d connections, want 1", n)
	}
	select {
	case h := <-heads:
		t.Fatalf("the proxy got a request before the target was known: %q", h)
	case <-time.After(50 * time.Millisecond):
	}
	if u.Active() != 1 {
		t.Errorf("active = %d during the pre-connection, want 1", u.Active())
	}
	lease, err := pending.Dial(ctx, echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "CONNECT " + echo + " HTTP/1.1\r\nHost: " + echo + "\r\n\r\n"; <-heads != want {
		t.Fatalf("request head is not %q", want)
	}
	roundTrip(t, lease.Conn, "hello")
	if pending.Close() {
		t.Error("Close after Dial reports an unused connection")
	}
	lease.Conn.Close()
	lease.Release()
	if u.Active() != 0 {
		t.Errorf("active = %d after release, want 0", u.Active())
	}
}

// Only groups whose pick cannot read the name pre-connect.
func TestPicksWithoutName(t *testing.T) {
	for _, tc := range []struct {
		g    *Group
		want bool
	}{
		{&Group{}, true},
		{&Group{Strategy: &Weighted{}}, true},
		{&Group{Strategy: &LeastConn{}}, true},
		{&Group{Strategy: &ConsistentHash{}, Key: HashClient}, true},
		{&Group{Strategy: &ConsistentHash{}, Key: HashHost}, false},
		{&Group{Strategy: &ConsistentHash{}, Key: HashClientDst}, false},
	} {
		if got := tc.g.PicksWithoutName(); got != tc.want {
			t.Errorf("%T key %v: PicksWithoutName = %v, want %v", tc.g.Strategy, tc.g.Key, got, tc.want)
		}
	}
	g := &Group{Strategy: &ConsistentHash{}, Key: HashHost, Upstreams: []*Upstream{{Name: "x", Dialer: &SOCKS5{Proxy: "127.0.0.1:1"}}}}
	if p, err := g.Preconnect(context.Background(), ""); p != nil || err != nil {
		t.Errorf("Preconnect for a host-hashed group = %v, %v; want nothing", p, err)
	}
}
