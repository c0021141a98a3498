package tunnel

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
)

// One client opening session after session at the cap evicts only its
// own once it holds the most: another client's idle session, the oldest of
// all, stays; a newcomer from a third client is admitted at the heavy
// client's cost.
func TestUDPOneSourceEvictsOnlyItsOwn(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	h := startUDP(t, UDPOptions{MaxSessions: 8}, nil)
	const other, third = "127.0.0.10:7000", "127.0.0.11:7000"
	h.ln.send(other, echo.String(), []byte("x"))
	h.reply(t)
	const flood = 50
	for i := range flood {
		h.ln.send(fmt.Sprintf("127.0.0.9:%d", 6000+i), echo.String(), []byte("x"))
		h.reply(t)
	}
	if n := h.srv.Sessions(); n != 8 {
		t.Fatalf("%d sessions, want the cap 8", n)
	}
	h.ln.send(third, echo.String(), []byte("x"))
	h.reply(t)
	// The other client's session is still the same one: no eviction names it.
	h.ln.send(other, echo.String(), []byte("y"))
	h.reply(t)
	want := flood - 7 + 1 // the flood beyond its 7 places, and one for the third client
	deadline := time.Now().Add(5 * time.Second)
	for len(h.log.records("udp")) < want && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	recs := h.log.records("udp")
	for _, rec := range recs {
		if rec["client"] == other || rec["client"] == third {
			t.Fatalf("%v's session evicted by another client's flood: %v", rec["client"], rec)
		}
		if rec["end"] != "evicted" {
			t.Fatalf("access line %v, want only evictions", rec)
		}
	}
	if len(recs) != want {
		t.Fatalf("%d sessions evicted, want %d", len(recs), want)
	}
}

// chromiumFirstDatagram is the first datagram of Chromium's QUIC flow: an
// Initial whose ClientHello needs the second one (sniff answers need-more).
func chromiumFirstDatagram(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "sniff", "testdata", "datagrams", "chromium-quic.bin"))
	if err != nil {
		t.Fatal(err)
	}
	n := int(binary.BigEndian.Uint16(b))
	return b[2 : 2+n]
}

// One client holding QUIC sessions in the sniffing stage takes only its
// share of the slots: another client's session is still sniffed.
func TestUDPSniffingSlotsPerSource(t *testing.T) {
	echo := udpEcho(t, "udp4", "127.0.0.1:0")
	obs := &countingUDPObserver{}
	h := startUDP(t, UDPOptions{MaxSniffing: 32, SniffTimeout: 5 * time.Second, QUICTimeout: 200 * time.Millisecond}, nil)
	h.srv.Observer = obs
	first := chromiumFirstDatagram(t)
	for i := range 10 {
		h.ln.send(fmt.Sprintf("127.0.0.9:%d", 6000+i), echo.String(), first)
	}
	waitFor := func(what string, want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for obs.get(what) < want {
			if time.Now().After(deadline) {
				t.Fatalf("%s = %d, want %d", what, obs.get(what), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// 2 of 32 slots per source: 8 of the 10 are routed by IP at once.
	waitFor("sniff:unknown:busy", 8)
	h.ln.send("127.0.0.10:7000", echo.String(), first)
	deadline := time.Now().Add(5 * time.Second)
	for h.srv.sniffing.Load() != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions sniffing, want the first client's 2 and the other's", h.srv.sniffing.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := obs.get("sniff:unknown:busy"); n != 8 {
		t.Fatalf("busy = %d: another client's session found no sniffing slot", n)
	}
}

// countSource keeps the most sessions any source holds as sessions come
// and go, checked against a count from scratch.
func TestUDPCountSource(t *testing.T) {
	var srv UDPServer
	rng := rand.New(rand.NewPCG(1, 2))
	srcs := make([]netip.Prefix, 8)
	for i := range srcs {
		srcs[i] = sniff.SourceKey(netip.AddrFrom4([4]byte{198, 18, 1, byte(i + 2)}))
	}
	held := map[netip.Prefix]int{}
	for i := range 10000 {
		src := srcs[rng.IntN(len(srcs))]
		if held[src] > 0 && rng.IntN(2) == 0 {
			held[src]--
			srv.countSource(src, -1)
		} else {
			held[src]++
			srv.countSource(src, +1)
		}
		most := 0
		for _, n := range held {
			most = max(most, n)
		}
		if srv.srcMost != most || srv.bySource[src] != held[src] {
			t.Fatalf("step %d: most %d, want %d; %v holds %d, want %d", i, srv.srcMost, most, src, srv.bySource[src], held[src])
		}
	}
}
