//go:build linux

package tunnel

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// fakePackets is a PacketListener fed by the test.
type fakePackets struct {
	in     chan fakeDatagram
	closed chan struct{}
	once   sync.Once
}

type fakeDatagram struct {
	client, dst netip.AddrPort
	b           []byte
	drop        string
}

func newFakePackets() *fakePackets {
	return &fakePackets{in: make(chan fakeDatagram, 1024), closed: make(chan struct{})}
}

func (f *fakePackets) ReadDatagram(b, oob []byte) (int, netip.AddrPort, netip.AddrPort, string, error) {
	select {
	case d := <-f.in:
		return copy(b, d.b), d.client, d.dst, d.drop, nil
	case <-f.closed:
		return 0, netip.AddrPort{}, netip.AddrPort{}, "", net.ErrClosed
	}
}
func (f *fakePackets) Close() error        { f.once.Do(func() { close(f.closed) }); return nil }
func (f *fakePackets) LocalAddr() net.Addr { return &net.UDPAddr{} }

func (f *fakePackets) send(client, dst string, b []byte) {
	f.in <- fakeDatagram{client: netip.MustParseAddrPort(client), dst: netip.MustParseAddrPort(dst), b: b}
}

// fakeReplies records what would go back to clients.
type fakeReplies struct {
	mu       sync.Mutex
	out      chan fakeReply
	held     map[netip.AddrPort]int
	acquires int
}

type fakeReply struct {
	from, to netip.AddrPort
	b        []byte
}

func newFakeReplies() *fakeReplies {
	return &fakeReplies{out: make(chan fakeReply, 1024), held: map[netip.AddrPort]int{}}
}

func (f *fakeReplies) AcquireReply(from netip.AddrPort) (ReplySender, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.held[from]++
	f.acquires++
	return &fakeSender{f: f, from: from}, nil
}

func (f *fakeReplies) heldTotal() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, v := range f.held {
		n += v
	}
	return n
}

type fakeSender struct {
	f    *fakeReplies
	from netip.AddrPort
}

func (s *fakeSender) WriteTo(b []byte, to netip.AddrPort) error {
	s.f.out <- fakeReply{from: s.from, to: to, b: append([]byte(nil), b...)}
	return nil
}

func (s *fakeSender) Release() {
	s.f.mu.Lock()
	s.f.held[s.from]--
	s.f.mu.Unlock()
}

// syncBuf is a log sink tests read while the server writes.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// records returns the JSON log records with message msg.
func (s *syncBuf) records(msg string) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(s.b.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

func (s *syncBuf) waitRecord(t *testing.T, msg, key, val string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for _, r := range s.records(msg) {
			if fmt.Sprint(r[key]) == val {
				return r
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no %q record with %s=%s; log:\n%s", msg, key, val, s.b.String())
	return nil
}

// udpEcho is a UDP server on loopback that answers each datagram with
// "echo:" and the datagram.
func udpEcho(t *testing.T, network, addr string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			c.WriteTo(append([]byte("echo:"), buf[:n]...), from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

type udpHarness struct {
	srv     *UDPServer
	ln      *fakePackets
	replies *fakeReplies
	log     *syncBuf
	done    chan error
}

func startUDP(t *testing.T, opts UDPOptions, router *Router) *udpHarness {
	t.Helper()
	goroutines := runtime.NumGoroutine()
	h := &udpHarness{ln: newFakePackets(), replies: newFakeReplies(), log: &syncBuf{}, done: make(chan error, 1)}
	tun := &Tunnel{Log: slog.New(slog.NewJSONHandler(h.log, nil))}
	tun.SetRouter(router)
	h.srv = &UDPServer{Tunnel: tun, Replies: h.replies, Options: opts}
	go func() { h.done <- h.srv.ServeUDP(h.ln) }()
	t.Cleanup(func() {
		h.srv.Shutdown()
		if err := <-h.done; err == nil {
			t.Error("ServeUDP returned nil")
		}
		if n := h.replies.heldTotal(); n != 0 {
			t.Errorf("%d reply senders not released after Shutdown", n)
		}
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := runtime.NumGoroutine(); n > goroutines {
			t.Errorf("%d goroutines after Shutdown, %d before", n, goroutines)
		}
	})
	return h
}

func (h *udpHarness) reply(t *testing.T) fakeReply {
	t.Helper()
	select {
	case r := <-h.replies.out:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no reply within 5s")
	}
	return fakeReply{}
}

// dnsQuery builds a standard query for name (type A, with an EDNS OPT
// record as dig sends).
func dnsQuery(id uint16, name string) []byte {
	b := []byte{byte(id >> 8), byte(id), 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1}
	for _, l := range strings.Split(name, ".") {
		b = append(b, byte(len(l)))
		b = append(b, l...)
	}
	b = append(b, 0, 0, 1, 0, 1)
	// OPT: root name, type 41, class 1232, TTL 0, no data.
	return append(b, 0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0)
}

// Direct sessions: datagrams reach the destination from one socket per
// session, replies go back from the original destination's address, a DNS
// session names its QNAME and ends after its idle timeout with one access
// line counting datagrams and bytes each way.
func TestUDPDirectSession(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	h := startUDP(t, UDPOptions{DNSTimeout: 200 * time.Millisecond}, nil)
	client := "127.0.0.9:5000"
	q := dnsQuery(7, "Example.COM")
	h.ln.send(client, echo.String(), q)
	r := h.reply(t)
	if r.from != echo || r.to.String() != client || !bytes.Equal(r.b, append([]byte("echo:"), q...)) {
		t.Fatalf("reply from %v to %v: %q", r.from, r.to, r.b)
	}
	h.ln.send(client, echo.String(), q)
	h.reply(t)
	rec := h.log.waitRecord(t, "udp", "client", client)
	want := map[string]string{"dst": echo.String(), "proto": "dns", "host": "example.com", "sniff": "found", "route": "direct",
		"dgrams_up": "2", "dgrams_down": "2", "up": fmt.Sprint(2 * len(q)), "down": fmt.Sprint(2 * (len(q) + 5)), "end": "idle", "error": ""}
	for k, v := range want {
		if fmt.Sprint(rec[k]) != v {
			t.Errorf("access line %s = %v, want %s (%v)", k, rec[k], v, rec)
		}
	}
	if n := h.srv.Sessions(); n != 0 {
		t.Fatalf("%d sessions after the idle timeout", n)
	}
}

// Sessions are per (client, destination); beyond MaxSessions the session
// idle longest goes, with its access line saying so.
func TestUDPSessionCapEvictsOldest(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	h := startUDP(t, UDPOptions{MaxSessions: 3}, nil)
	for i := range 3 {
		h.ln.send(fmt.Sprintf("127.0.0.9:%d", 6000+i), echo.String(), []byte("x"))
		h.reply(t)
	}
	// The first client talks again: the second is now the oldest.
	h.ln.send("127.0.0.9:6000", echo.String(), []byte("x"))
	h.reply(t)
	h.ln.send("127.0.0.9:6003", echo.String(), []byte("x"))
	h.reply(t)
	rec := h.log.waitRecord(t, "udp", "end", "evicted")
	if rec["client"] != "127.0.0.9:6001" {
		t.Fatalf("evicted %v, want the session idle longest (127.0.0.9:6001)", rec["client"])
	}
	if n := h.srv.Sessions(); n != 3 {
		t.Fatalf("%d sessions, want the cap 3", n)
	}
}

// A reject route carries nothing and dials nothing; dropped datagrams
// named by the listener never make a session.
func TestUDPRejectAndDrops(t *testing.T) {
	obs := &countingUDPObserver{}
	router := &Router{Rules: []Rule{{Networks: NetUDP, Ports: mustPorts("53"), Action: Action{Kind: ActionReject}}}}
	h := startUDP(t, UDPOptions{IdleTimeout: 100 * time.Millisecond, DNSTimeout: 100 * time.Millisecond}, router)
	h.srv.Observer = obs
	h.ln.in <- fakeDatagram{drop: "no_orig_dst", b: []byte("x")}
	h.ln.send("127.0.0.9:7000", "127.0.0.1:53", dnsQuery(1, "blocked.test"))
	rec := h.log.waitRecord(t, "udp", "client", "127.0.0.9:7000")
	if rec["route"] != "reject" || rec["host"] != "blocked.test" || rec["dgrams_down"] != 0.0 {
		t.Fatalf("access line = %v; want route reject, host blocked.test, nothing down", rec)
	}
	if h.replies.acquires != 0 {
		t.Fatal("a rejected session acquired a reply socket")
	}
	if got := obs.get("drop:no_orig_dst"); got != 1 {
		t.Fatalf("no_orig_dst drops = %d, want 1", got)
	}
	// The same rule does not hold for TCP.
	if a, _ := router.Route("", sniff.Unknown, netip.MustParseAddrPort("127.0.0.1:53")); a.Kind != ActionDirect {
		t.Fatalf("a udp-only rule matched TCP: %v", a)
	}
	if a, final := router.RouteByAddr(netip.MustParseAddrPort("127.0.0.1:53")); a.Kind != ActionDirect || !final {
		t.Fatalf("RouteByAddr took a udp-only rule for TCP: %v", a)
	}
}

func mustPorts(s string) []ports.Range {
	p, err := ports.Parse(s)
	if err != nil {
		panic(err)
	}
	return p
}

type countingUDPObserver struct {
	mu sync.Mutex
	n  map[string]int
}

func (o *countingUDPObserver) add(k string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.n == nil {
		o.n = map[string]int{}
	}
	o.n[k]++
}

func (o *countingUDPObserver) get(k string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.n[k]
}

func (o *countingUDPObserver) UDPSessionStarted() { o.add("started") }
func (o *countingUDPObserver) UDPSessionEnded(route, end string, dgUp, dgDown, up, down int64) {
	o.add("ended:" + end)
}
func (o *countingUDPObserver) UDPDropped(reason string) { o.add("drop:" + reason) }
func (o *countingUDPObserver) UDPSniffed(p sniff.Proto, outcome string) {
	o.add("sniff:" + p.String() + ":" + outcome)
}

// A fake SOCKS5 server with UDP ASSOCIATE: it checks the request (client
// address 0.0.0.0:0) and relays datagrams to an echo server, answering
// with the header naming the sender.
func fakeSOCKS5UDP(t *testing.T, echo netip.AddrPort, seen chan<- string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 512)
				if _, err := io.ReadFull(c, buf[:3]); err != nil {
					return
				}
				c.Write([]byte{5, 0})
				if _, err := io.ReadFull(c, buf[:10]); err != nil {
					return
				}
				if !bytes.Equal(buf[:10], []byte{5, 3, 0, 1, 0, 0, 0, 0, 0, 0}) {
					seen <- fmt.Sprintf("bad request % x", buf[:10])
					return
				}
				relay, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
				if err != nil {
					return
				}
				defer relay.Close()
				p := relay.LocalAddr().(*net.UDPAddr).Port
				c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, byte(p >> 8), byte(p)}) // BND 0.0.0.0: the proxy's address
				go func() {
					b := make([]byte, 64<<10)
					for {
						n, from, err := relay.ReadFromUDPAddrPort(b)
						if err != nil {
							return
						}
						d := b[:n]
						var payload []byte
						switch d[3] {
						case 1:
							seen <- "ATYP 1"
							payload = d[4+4+2:]
						case 3:
							l := int(d[4])
							seen <- string(d[5 : 5+l])
							payload = d[5+l+2:]
						default:
							seen <- fmt.Sprintf("ATYP %d", d[3])
							continue
						}
						hdr := []byte{0, 0, 0, 1, 127, 0, 0, 1, byte(echo.Port() >> 8), byte(echo.Port())}
						relay.WriteToUDPAddrPort(append(hdr, append([]byte("echo:"), payload...)...), from)
					}
				}()
				io.Copy(io.Discard, c) // the association lives as long as this connection
			}()
		}
	}()
	return ln.Addr().String()
}

// Through a SOCKS5 upstream a QUIC-less session asks for the original
// IP; the session's reply comes back through the association.
func TestUDPThroughSOCKS5(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	seen := make(chan string, 16)
	proxy := fakeSOCKS5UDP(t, echo, seen)
	u, err := upstream.Parse("socks5://"+proxy, nil)
	if err != nil {
		t.Fatal(err)
	}
	g := &upstream.Group{Name: "socks", Upstreams: []*upstream.Upstream{u}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	h := startUDP(t, UDPOptions{IdleTimeout: 200 * time.Millisecond}, &Router{Default: Action{Kind: ActionProxy, Group: g}})
	// An unknown protocol to a name-less target: the IP is asked for,
	// which the fake relay reports as "ATYP 1".
	h.ln.send("127.0.0.9:8000", echo.String(), []byte("hello"))
	r := h.reply(t)
	if string(r.b) != "echo:hello" || r.from != echo {
		t.Fatalf("reply %q from %v", r.b, r.from)
	}
	if got := <-seen; got != "ATYP 1" {
		t.Fatalf("relay saw %q, want the IP (ATYP 1)", got)
	}
	rec := h.log.waitRecord(t, "udp", "client", "127.0.0.9:8000")
	if rec["route"] != "socks" || rec["upstream"] != "socks5://"+proxy || rec["target"] != echo.String() {
		t.Fatalf("access line = %v", rec)
	}
	if u.Active() != 0 {
		t.Fatalf("upstream active = %d after the session ended", u.Active())
	}
}

// A group of HTTP CONNECT upstreams cannot carry UDP: its fallback decides.
func TestUDPFallbackForHTTPGroup(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	for _, fb := range []upstream.UDPFallback{upstream.UDPReject, upstream.UDPDirect} {
		t.Run(fb.String(), func(t *testing.T) {
			u, err := upstream.Parse("http://127.0.0.1:1", nil)
			if err != nil {
				t.Fatal(err)
			}
			g := &upstream.Group{Name: "http", Upstreams: []*upstream.Upstream{u}, UDPFallback: fb}
			h := startUDP(t, UDPOptions{IdleTimeout: 100 * time.Millisecond}, &Router{Default: Action{Kind: ActionProxy, Group: g}})
			h.ln.send("127.0.0.9:9000", echo.String(), []byte("x"))
			rec := h.log.waitRecord(t, "udp", "client", "127.0.0.9:9000")
			if rec["route"] != fb.String() {
				t.Fatalf("route = %v, want %s", rec["route"], fb)
			}
			if fb == upstream.UDPDirect && rec["dgrams_down"] != 1.0 {
				t.Fatalf("direct fallback carried nothing: %v", rec)
			}
			if fb == upstream.UDPReject && !strings.Contains(fmt.Sprint(rec["error"]), "carries UDP") {
				t.Fatalf("reject fallback error = %v", rec["error"])
			}
		})
	}
}

type discardReplies struct{}

func (discardReplies) AcquireReply(netip.AddrPort) (ReplySender, error) { return discardSender{}, nil }

type discardSender struct{}

func (discardSender) WriteTo([]byte, netip.AddrPort) error { return nil }
func (discardSender) Release()                             {}

// BenchmarkUDPSessionSetup: the cost of a new direct session (first
// datagram to a new destination: session, sniff, route, socket, send),
// with the cap evicting the oldest as a flood of new sessions would.
func BenchmarkUDPSessionSetup(b *testing.B) {
	ln := newFakePackets()
	tun := &Tunnel{Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	srv := &UDPServer{Tunnel: tun, Replies: discardReplies{}, Options: UDPOptions{MaxSessions: 4096}}
	if err := srv.init(); err != nil {
		b.Fatal(err)
	}
	defer srv.Shutdown()
	buf := make([]byte, maxUDPHeader+64)
	copy(buf[maxUDPHeader:], "x")
	client := netip.MustParseAddrPort("127.0.0.9:5000")
	ip := netip.MustParseAddr("127.0.0.1")
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		// Port 9: discard; nothing listens, but a connected UDP socket
		// learns that only from an ICMP error, after the send.
		srv.datagram(buf, 1, udpKey{client, netip.AddrPortFrom(ip, uint16(10000+i%50000))})
	}
	b.StopTimer()
	_ = ln
}

// chromiumQUIC are the two datagrams of Chromium's first flight (its
// post-quantum ClientHello spans both), captured by
// scripts/capture-first-flight.sh; the SNI is site.test.
func chromiumQUIC(t *testing.T) [][]byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "sniff", "testdata", "datagrams", "chromium-quic.bin"))
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for len(b) >= 2 {
		n := min(int(binary.BigEndian.Uint16(b)), len(b)-2)
		out = append(out, b[2:2+n])
		b = b[2+n:]
	}
	if len(out) < 2 {
		t.Fatalf("chromium-quic.bin holds %d datagrams, want 2 or more", len(out))
	}
	return out
}

// A QUIC session is held until its ClientHello is whole, in whatever order
// its datagrams come, then routed by the SNI with every held datagram sent
// on; one whose ClientHello never completes goes by IP after the sniff
// timeout.
func TestUDPQUICSniff(t *testing.T) {
	flight := chromiumQUIC(t)
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	router := &Router{Rules: []Rule{{Domains: []string{"site.test"}, Action: Action{Kind: ActionDirect}}},
		Default: Action{Kind: ActionReject}}
	h := startUDP(t, UDPOptions{QUICTimeout: 300 * time.Millisecond, SniffTimeout: 100 * time.Millisecond}, router)
	reversed := append([][]byte{}, flight...)
	slices.Reverse(reversed)
	for _, tc := range []struct {
		client string
		send   [][]byte
		want   map[string]string
	}{
		{"127.0.0.9:11001", flight, map[string]string{"host": "site.test", "proto": "quic", "sniff": "found", "route": "direct", "dgrams_up": fmt.Sprint(len(flight))}},
		{"127.0.0.9:11002", reversed, map[string]string{"host": "site.test", "proto": "quic", "sniff": "found", "route": "direct", "dgrams_up": fmt.Sprint(len(flight))}},
		{"127.0.0.9:11003", flight[:1], map[string]string{"host": "", "proto": "quic", "sniff": "timeout", "route": "reject"}},
	} {
		for _, d := range tc.send {
			h.ln.send(tc.client, echo.String(), d)
		}
		rec := h.log.waitRecord(t, "udp", "client", tc.client)
		for k, v := range tc.want {
			if fmt.Sprint(rec[k]) != v {
				t.Errorf("%s: access line %s = %v, want %s (%v)", tc.client, k, rec[k], v, rec)
			}
		}
	}
}
