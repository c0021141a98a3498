package sniff

import (
	"testing"
)

// benchQUICFlows returns two flows with different Destination Connection
// IDs, each a post-quantum-sized (about 2 KB) ClientHello over two Initial
// packets in two datagrams: the captured Chromium flow and a re-keyed copy
// if the corpus has it, else synthetic ones.
func benchQUICFlows(tb testing.TB) [2][][]byte {
	hello := quicHello(sniExt("www.example.com"), alpnExt("h3"), ext(0x11ec, make([]byte, 1250)), ext(extECH, make([]byte, 200)))
	half := len(hello) / 2
	var flows [2][][]byte
	for i := range flows {
		dcid := []byte{byte(i), 1, 2, 3, 4, 5, 6, 7}
		flows[i] = [][]byte{
			pkt(cryptoFrame(0, hello[:half]), withDCID(dcid)),
			pkt(cryptoFrame(half, hello[half:]), withDCID(dcid), withPN(1, 2)),
		}
	}
	return flows
}

// BenchmarkQUICFlow: a whole flow per operation (two datagrams, a 2 KB
// ClientHello), with a new Connection ID each time, so each op pays the key
// derivation; the assembler is reused (Reset), as a pool would.
func BenchmarkQUICFlow(b *testing.B) {
	flows := benchQUICFlows(b)
	a := NewQUICAssembler(QUICLimits{})
	b.SetBytes(int64(len(flows[0][0]) + len(flows[0][1])))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		a.Reset()
		f := flows[i&1]
		i++
		a.Add(f[0])
		if _, st := a.Add(f[1]); st != QUICDone {
			b.Fatal(st, a.Reason())
		}
	}
}

// BenchmarkQUICFlowSameDCID: the same, with the keys cached: the cost of
// header protection, decryption, frames and the TLS parse alone.
func BenchmarkQUICFlowSameDCID(b *testing.B) {
	f := benchQUICFlows(b)[0]
	a := NewQUICAssembler(QUICLimits{})
	b.SetBytes(int64(len(f[0]) + len(f[1])))
	b.ReportAllocs()
	for b.Loop() {
		a.Reset()
		a.Add(f[0])
		if _, st := a.Add(f[1]); st != QUICDone {
			b.Fatal(st, a.Reason())
		}
	}
}

// BenchmarkQUICNotQUIC: the cost of turning away a datagram that is not
// QUIC (a DNS query).
func BenchmarkQUICNotQUIC(b *testing.B) {
	d := dnsQuery("www.example.com", 1, [][]byte{optRR})
	var a QUICAssembler
	b.ReportAllocs()
	for b.Loop() {
		a.Reset()
		if _, st := a.Add(d); st != NotQUIC {
			b.Fatal(st)
		}
	}
}

func BenchmarkDNSQuery(b *testing.B) {
	d := dnsQuery("www.example.com", 28, [][]byte{optRR})
	b.SetBytes(int64(len(d)))
	b.ReportAllocs()
	for b.Loop() {
		if _, _, ok := DNSQuery(d); !ok {
			b.Fatal("not ok")
		}
	}
}

// TestQUICAllocs pins the allocations the QUIC and DNS parsers promise.
func TestQUICAllocs(t *testing.T) {
	if testing.CoverMode() != "" {
		t.Skip("coverage instrumentation allocates")
	}
	flows := benchQUICFlows(t)
	a := NewQUICAssembler(QUICLimits{})
	a.Add(flows[0][0]) // buffers grown, keys cached
	a.Reset()
	if n := testing.AllocsPerRun(100, func() {
		a.Reset()
		if _, st := a.Add(flows[0][0]); st != QUICNeedMore {
			t.Fatal(st)
		}
	}); n != 0 {
		t.Errorf("a datagram with cached keys: %v allocations, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() {
		a.Reset()
		a.Add(flows[0][0])
		a.Add(flows[0][1])
	}); n != 1 {
		t.Errorf("a flow with cached keys: %v allocations, want 1 (the result)", n)
	}
	var z QUICAssembler
	d := dnsQuery("www.example.com", 1, nil)
	if n := testing.AllocsPerRun(100, func() { z.Reset(); z.Add(d) }); n != 0 {
		t.Errorf("not QUIC: %v allocations, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() { DNSQuery(d) }); n != 1 {
		t.Errorf("DNS query: %v allocations, want 1", n)
	}
	root := dnsQuery(".", 1, nil)
	if n := testing.AllocsPerRun(100, func() { DNSQuery(root) }); n != 0 {
		t.Errorf("DNS root query: %v allocations, want 0", n)
	}
}

// BenchmarkQUICChromium: the captured Chromium flow (a post-quantum
// ClientHello over two 1,250-byte datagrams), keys derived every time.
func BenchmarkQUICChromium(b *testing.B) {
	ds := readDatagrams(b, "chromium-quic.bin")
	a := NewQUICAssembler(QUICLimits{})
	n := 0
	for _, d := range ds {
		n += len(d)
	}
	b.SetBytes(int64(n))
	b.ReportAllocs()
	for b.Loop() {
		a.Reset()
		a.aead = nil // forget the cached keys: each flow has its own DCID
		var st QUICStatus
		for _, d := range ds {
			_, st = a.Add(d)
		}
		if st != QUICDone {
			b.Fatal(st, a.Reason())
		}
	}
}
