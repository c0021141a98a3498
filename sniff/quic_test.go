package sniff

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"encoding/hex"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

func unhex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// TestQUICKeys checks the Initial keys of both versions against RFC 9001
// A.1 and RFC 9369 A.1, for sniff's derivation and the test's own.
func TestQUICKeys(t *testing.T) {
	dcid := unhex("8394c8f03e515708")
	tests := []struct {
		version     uint32
		key, iv, hp string
	}{
		{quicV1, "1f369613dd76d5467730efcbe3b1a22d", "fa044b2f42a3fd3b46fb255c", "9f50449e04a0e810283a1e9933adedd2"},
		{quicV2, "8b1a0bc121284290a29e0971b5cd045d", "91f73e2351d8fa91660e909f", "45b95e15235d6f45a6b19cbcb0294ba9"},
	}
	for _, tt := range tests {
		k := testClientKeys(tt.version, dcid)
		if hex.EncodeToString(k.key) != tt.key || hex.EncodeToString(k.iv) != tt.iv || hex.EncodeToString(k.hp) != tt.hp {
			t.Errorf("%#x: test derivation: key %x iv %x hp %x", tt.version, k.key, k.iv, k.hp)
		}
		var a QUICAssembler
		a.keys(tt.version, dcid)
		if !bytes.Equal(a.iv[:], unhex(tt.iv)) {
			t.Errorf("%#x: iv %x, want %s", tt.version, a.iv, tt.iv)
		}
		// The header protection key: the same mask as the RFC's key gives.
		sample := []byte("0123456789abcdef")
		a.hp.Encrypt(a.mask[:], sample)
		ref, _ := aes.NewCipher(unhex(tt.hp))
		want := make([]byte, 16)
		ref.Encrypt(want, sample)
		if !bytes.Equal(a.mask[:], want) {
			t.Errorf("%#x: header protection key differs from the RFC's", tt.version)
		}
		// The packet key: what the RFC's key seals, sniff's opens.
		block, _ := aes.NewCipher(unhex(tt.key))
		gcm, _ := cipher.NewGCM(block)
		ct := gcm.Seal(nil, unhex(tt.iv), []byte("hello"), nil)
		if pt, err := a.aead.Open(nil, unhex(tt.iv), ct, nil); err != nil || string(pt) != "hello" {
			t.Errorf("%#x: packet key differs from the RFC's", tt.version)
		}
	}
}

// TestQUICCorpus reads every captured flow as captured, and in the variants
// every QUIC flow must survive: datagrams in reverse order (the second
// first), coalesced packets, CRYPTO data re-framed into small shuffled
// frames over shuffled datagrams, and (re-sealed) QUIC v2.
func TestQUICCorpus(t *testing.T) {
	for _, fl := range loadFlows(t, QUIC) {
		r, st, a := feed(fl.datagrams)
		fl.checkQUIC(t, "as captured", r, st, a)

		rev := slices.Clone(fl.datagrams)
		slices.Reverse(rev)
		r, st, a = feed(rev)
		fl.checkQUIC(t, "reversed", r, st, a)

		r, st, a = feed(coalesce(t, fl.datagrams))
		fl.checkQUIC(t, "coalesced", r, st, a)

		rng := rand.New(rand.NewPCG(uint64(len(fl.datagrams[0])), 14))
		for _, v := range []uint32{0, quicV1, quicV2} {
			for _, shape := range []struct{ maxFrame, perPacket int }{{1, 1000}, {50, 12}, {300, 2}, {2000, 1}} {
				ds := reseal(t, fl.datagrams, v, shape.maxFrame, shape.perPacket, rng)
				r, st, a = feed(ds)
				fl.checkQUIC(t, "re-framed", r, st, a)
			}
		}
	}
}

// TestQUICCorpusNeedMore: until the datagram that completes the ClientHello,
// every answer is NeedMore; that datagram gives the answer.
func TestQUICCorpusNeedMore(t *testing.T) {
	for _, fl := range loadFlows(t, QUIC) {
		stream := cryptoStream(t, fl.datagrams)
		helloEnd := handshakeHeaderLen + (int(stream[1])<<16 | int(stream[2])<<8 | int(stream[3]))
		a := NewQUICAssembler(QUICLimits{})
		for i, d := range fl.datagrams {
			_, st := a.Add(d)
			complete := len(cryptoStream(t, fl.datagrams[:i+1])) >= helloEnd
			if complete != (st == QUICDone) {
				t.Errorf("%s: datagram %d of %d: %v (%s), hello complete: %v", fl.file, i+1, len(fl.datagrams), st, a.Reason(), complete)
			}
			if st == QUICDone {
				break
			}
		}
	}
}

// TestQUICCorpusTruncated cuts every datagram of every flow short: a cut
// first datagram is QUICInvalid or NotQUIC (if not even the header is
// left); a later cut one is ignored, so the flow stays NeedMore.
func TestQUICCorpusTruncated(t *testing.T) {
	for _, fl := range loadFlows(t, QUIC) {
		d0 := fl.datagrams[0]
		for _, cut := range []int{1, 5, 6, 7, 20, len(d0) / 2, len(d0) - 17, len(d0) - 1} {
			a := NewQUICAssembler(QUICLimits{})
			r, st := a.Add(d0[:cut])
			checkQUICResult(t, r, st, a)
			if st != QUICInvalid && st != NotQUIC {
				t.Errorf("%s: first datagram cut to %d: %v", fl.file, cut, st)
			}
		}
		if len(fl.datagrams) < 2 {
			continue
		}
		a := NewQUICAssembler(QUICLimits{})
		a.Add(fl.datagrams[0])
		last := fl.datagrams[len(fl.datagrams)-1]
		if r, st := a.Add(last[:len(last)-1]); st != QUICNeedMore {
			t.Errorf("%s: a cut later datagram: %v %+v (%s)", fl.file, st, r, a.Reason())
		}
		r, st := a.Add(last) // the whole one still completes the flow
		for _, d := range fl.datagrams[1 : len(fl.datagrams)-1] {
			r, st = a.Add(d)
		}
		fl.checkQUIC(t, "after a cut datagram", r, st, a)
	}
}

// TestQUICCorpusGarbage flips bits all over the flows: no panic, and the
// answer is never a wrong one (a flip in a protected part fails the AEAD; a
// flip in the first bytes may make it not QUIC at all).
func TestQUICCorpusGarbage(t *testing.T) {
	rng := rand.New(rand.NewPCG(14, 14))
	for _, fl := range loadFlows(t, QUIC) {
		for range 200 {
			ds := make([][]byte, len(fl.datagrams))
			for i, d := range fl.datagrams {
				ds[i] = slices.Clone(d)
			}
			d := ds[rng.IntN(len(ds))]
			for range 1 + rng.IntN(3) {
				d[rng.IntN(len(d))] ^= byte(1 + rng.IntN(255))
			}
			r, st, a := feed(ds)
			checkQUICResult(t, r, st, a)
			if st == QUICDone && (r.Host != fl.want.Host || !slices.Equal(r.ALPN(), fl.alpn)) {
				t.Fatalf("%s with flipped bits: %+v", fl.file, r)
			}
		}
	}
}

// hello for QUIC tests: the ClientHello handshake message, as carried in
// CRYPTO frames.
func quicHello(exts ...[]byte) []byte { return handshake(helloBody(exts...)) }

var testDCID = unhex("0011223344556677")

func pkt(payload []byte, opts ...func(*initialPacket)) []byte {
	p := initialPacket{dcid: testDCID, scid: unhex("aabb"), payload: payload, size: 1200}
	for _, o := range opts {
		o(&p)
	}
	return p.seal()
}

func withVersion(v uint32) func(*initialPacket) { return func(p *initialPacket) { p.version = v } }
func withPN(pn uint64, n int) func(*initialPacket) {
	return func(p *initialPacket) { p.pn, p.pnLen = pn, n }
}
func withSize(n int) func(*initialPacket)       { return func(p *initialPacket) { p.size = n } }
func withDCID(d []byte) func(*initialPacket)    { return func(p *initialPacket) { p.dcid = d } }
func withToken(tok []byte) func(*initialPacket) { return func(p *initialPacket) { p.token = tok } }
func withReserved(b byte) func(*initialPacket)  { return func(p *initialPacket) { p.reservedBits = b } }
func cat(parts ...[]byte) []byte                { return slices.Concat(parts...) }
func dgrams(ds ...[]byte) [][]byte              { return ds }

// TestQUICAssembler covers the framings, versions and failures one by one.
func TestQUICAssembler(t *testing.T) {
	ch := quicHello(sniExt("Www.Example.COM."), alpnExt("h3"))
	half := len(ch) / 2
	long := quicHello(sniExt("big.example"), ext(0x1234, make([]byte, 5000))) // several packets
	chunks := func(b []byte, n int) [][]byte {
		var out [][]byte
		for off := 0; off < len(b); off += n {
			out = append(out, pkt(cryptoFrame(off, b[off:min(off+n, len(b))]), withPN(uint64(off/n), 2)))
		}
		return out
	}
	longDgrams := chunks(long, 1100)
	revLong := slices.Clone(longDgrams)
	slices.Reverse(revLong)
	done := Result{Proto: QUIC, Host: "www.example.com", alpn: "\x02h3"}

	tests := []struct {
		name   string
		in     [][]byte
		want   QUICStatus
		res    Result
		reason string
	}{
		{"one packet", dgrams(pkt(cryptoFrame(0, ch))), QUICDone, done, ""},
		{"v2", dgrams(pkt(cryptoFrame(0, ch), withVersion(quicV2))), QUICDone, done, ""},
		{"4-byte packet number", dgrams(pkt(cryptoFrame(0, ch), withPN(0x01020304, 4))), QUICDone, done, ""},
		{"1-byte packet number, no padding", dgrams(pkt(cryptoFrame(0, ch), withPN(7, 1), withSize(0))), QUICDone, done, ""},
		{"token", dgrams(pkt(cryptoFrame(0, ch), withToken(make([]byte, 300)))), QUICDone, done, ""},
		{"empty DCID", dgrams(pkt(cryptoFrame(0, ch), withDCID(nil))), QUICDone, done, ""},
		{"20-byte DCID", dgrams(pkt(cryptoFrame(0, ch), withDCID(make([]byte, 20)))), QUICDone, done, ""},
		{"other frames first", dgrams(pkt(cat([]byte{framePing, 0, 0}, ackFrame(3, 2, false), ackFrame(1<<40, 0, true),
			connCloseFrame("no"), cryptoFrame(0, ch)))), QUICDone, done, ""},
		{"two frames reversed", dgrams(pkt(cat(cryptoFrame(half, ch[half:]), cryptoFrame(0, ch[:half])))), QUICDone, done, ""},
		{"overlapping frames", dgrams(pkt(cat(cryptoFrame(10, ch[10:]), cryptoFrame(0, ch[:20]), cryptoFrame(5, ch[5:30])))), QUICDone, done, ""},
		{"empty CRYPTO frame", dgrams(pkt(cat(cryptoFrame(0, nil), cryptoFrame(0, ch)))), QUICDone, done, ""},
		{"two datagrams", dgrams(pkt(cryptoFrame(0, ch[:half])), pkt(cryptoFrame(half, ch[half:]), withPN(1, 2))), QUICDone, done, ""},
		{"second datagram first", dgrams(pkt(cryptoFrame(half, ch[half:]), withPN(1, 2)), pkt(cryptoFrame(0, ch[:half]))), QUICDone, done, ""},
		{"coalesced", dgrams(cat(pkt(cryptoFrame(0, ch[:half]), withSize(0)), pkt(cryptoFrame(half, ch[half:]), withPN(1, 2)))), QUICDone, done, ""},
		{"coalesced v2", dgrams(cat(pkt(cryptoFrame(0, ch[:half]), withSize(0), withVersion(quicV2)), pkt(cryptoFrame(half, ch[half:]), withPN(1, 2), withVersion(quicV2)))), QUICDone, done, ""},
		{"coalesced with 0-RTT after", dgrams(cat(pkt(cryptoFrame(0, ch), withSize(0)), zeroRTT(testDCID))), QUICDone, done, ""},
		{"0-RTT datagram first", dgrams(zeroRTT(testDCID), pkt(cryptoFrame(0, ch))), QUICDone, done, ""},
		{"zeros after the packet", dgrams(cat(pkt(cryptoFrame(0, ch), withSize(0)), make([]byte, 500))), QUICDone, done, ""},
		{"another DCID coalesced is ignored", dgrams(cat(pkt(cryptoFrame(0, ch[:half]), withSize(0)), pkt(cryptoFrame(half, ch[half:]), withDCID(unhex("99"))))), QUICNeedMore, Result{}, ""},
		{"new DCID in a later datagram", dgrams(pkt(cryptoFrame(0, ch[:half])), pkt(cryptoFrame(half, ch[half:]), withDCID(unhex("0102030405060708090a")))), QUICDone, done, ""},
		{"retransmission", dgrams(pkt(cryptoFrame(0, ch[:half])), pkt(cryptoFrame(0, ch[:half]), withPN(1, 2)), pkt(cryptoFrame(half, ch[half:]), withPN(2, 2))), QUICDone, done, ""},
		{"5 KB hello in 5 datagrams", longDgrams, QUICDone, Result{Proto: QUIC, Host: "big.example"}, ""},
		{"5 KB hello reversed", revLong, QUICDone, Result{Proto: QUIC, Host: "big.example"}, ""},
		{"no SNI", dgrams(pkt(cryptoFrame(0, quicHello(alpnExt("h3"))))), QUICDone, Result{Proto: QUIC, alpn: "\x02h3"}, ""},
		{"ECH", dgrams(pkt(cryptoFrame(0, quicHello(sniExt("a.example"), ext(extECH, []byte{0}))))), QUICDone, Result{Proto: QUIC, Host: "a.example", ECH: true}, ""},
		{"malformed hello", dgrams(pkt(cryptoFrame(0, handshake([]byte{3, 3, 1})))), QUICDone, Result{Proto: QUIC}, ""},
		{"half a hello", dgrams(pkt(cryptoFrame(0, ch[:half]))), QUICNeedMore, Result{}, ""},
		{"only the end", dgrams(pkt(cryptoFrame(half, ch[half:]))), QUICNeedMore, Result{}, ""},
		{"a gap", dgrams(pkt(cat(cryptoFrame(0, ch[:half]), cryptoFrame(half+1, ch[half+1:])))), QUICNeedMore, Result{}, ""},

		{"empty datagram", dgrams(nil), NotQUIC, Result{}, "not a QUIC"},
		{"short header", dgrams(cat([]byte{0x40}, make([]byte, 1199))), NotQUIC, Result{}, "not a QUIC"},
		{"draft-29", dgrams(cat([]byte{0xc0, 0xff, 0, 0, 0x1d}, make([]byte, 1195))), NotQUIC, Result{}, "not a QUIC"},
		{"version negotiation", dgrams(cat([]byte{0x80, 0, 0, 0, 0, 0, 0}, make([]byte, 8))), NotQUIC, Result{}, "not a QUIC"},
		{"21-byte DCID", dgrams(cat([]byte{0xc0, 0, 0, 0, 1, 21}, make([]byte, 1200))), NotQUIC, Result{}, "not a QUIC"},
		{"DNS query", dgrams(dnsQuery("example.com", 1, nil)), NotQUIC, Result{}, "not a QUIC"},
		{"header cut", dgrams(pkt(cryptoFrame(0, ch))[:12]), QUICInvalid, Result{}, "truncated"},
		{"length past the datagram", dgrams(pkt(cryptoFrame(0, ch))[:1000]), QUICInvalid, Result{}, "truncated"},
		{"retry type", dgrams(cat([]byte{0xf0, 0, 0, 0, 1, 0, 0}, make([]byte, 1200))), QUICInvalid, Result{}, "truncated"},
		{"bad tag", dgrams(flip(pkt(cryptoFrame(0, ch)), 1199)), QUICInvalid, Result{}, "does not decrypt"},
		{"another DCID's keys", dgrams(flip(pkt(cryptoFrame(0, ch)), 6)), QUICInvalid, Result{}, "does not decrypt"},
		{"reserved bits", dgrams(pkt(cryptoFrame(0, ch), withReserved(0x08))), QUICInvalid, Result{}, "does not decrypt"},
		{"payload too short for a sample", dgrams(shortPacket()), QUICInvalid, Result{}, "does not decrypt"},
		{"bad tag after a good packet is ignored", dgrams(pkt(cryptoFrame(0, ch[:half])), flip(pkt(cryptoFrame(half, ch[half:])), 50)), QUICNeedMore, Result{}, ""},
		{"STREAM frame", dgrams(pkt(cat([]byte{0x08, 0, 1, 'x'}, cryptoFrame(0, ch)))), QUICInvalid, Result{}, "not allowed"},
		{"long frame type encoding", dgrams(pkt(cat([]byte{0x40, 0x06}, cryptoFrame(0, ch)))), QUICInvalid, Result{}, "not allowed"},
		{"1-RTT CONNECTION_CLOSE", dgrams(pkt(cat([]byte{0x1d, 0, 0}))), QUICInvalid, Result{}, "not allowed"},
		{"CRYPTO at 16 KiB", dgrams(pkt(cryptoFrame(16<<10, []byte{1}))), QUICInvalid, Result{}, "beyond the limit"},
		{"CRYPTO at 2^62-1", dgrams(pkt(cryptoFrame(1<<62-1, []byte{1}))), QUICInvalid, Result{}, "beyond the limit"},
		{"CRYPTO length past the packet", dgrams(pkt(cat([]byte{frameCrypto, 0, 0x44, 0}, ch), withSize(0))), QUICInvalid, Result{}, "malformed CRYPTO"},
		{"CRYPTO cut in a varint", dgrams(pkt([]byte{framePing, frameCrypto, 0x80, 0}, withSize(0))), QUICInvalid, Result{}, "malformed CRYPTO"},
		{"ACK with a huge range count", dgrams(pkt(cat(appendVarint([]byte{frameAck, 0, 0}, 1<<61), []byte{0}))), QUICInvalid, Result{}, "malformed ACK"},
		{"ACK cut", dgrams(pkt([]byte{frameAckECN, 1, 0, 0, 0, 1}, withSize(0))), QUICInvalid, Result{}, "malformed ACK"},
		{"CONNECTION_CLOSE reason past the packet", dgrams(pkt([]byte{frameConnClose, 0, 0, 0x50, 0}, withSize(0))), QUICInvalid, Result{}, "malformed CONNECTION_CLOSE"},
		{"not a ClientHello", dgrams(pkt(cryptoFrame(0, []byte{2, 0, 0, 1, 0}))), QUICInvalid, Result{}, "does not start with a ClientHello"},
		{"hello over 16 KiB", dgrams(pkt(cryptoFrame(0, []byte{1, 0, 0x40, 0}))), QUICInvalid, Result{}, "longer than the limit"},
		{"many pieces", dgrams(pkt(manyPieces(300))), QUICNeedMore, Result{}, ""},
		{"1-byte frames backwards", dgrams(pkt(backwards(ch))), QUICDone, done, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, st, a := feed(tt.in)
			checkQUICResult(t, r, st, a)
			if st != tt.want || r != tt.res || !strings.Contains(a.Reason(), tt.reason) {
				t.Errorf("got %v %+v (%q), want %v %+v (%q)", st, r, a.Reason(), tt.want, tt.res, tt.reason)
			}
			// A final answer stays.
			if st != QUICNeedMore {
				if r2, st2 := a.Add(pkt(cryptoFrame(0, ch))); r2 != r || st2 != st {
					t.Errorf("after a final answer: %v %+v", st2, r2)
				}
			}
		})
	}
}

// zeroRTT is a 0-RTT long-header packet (never decrypted by sniff).
func zeroRTT(dcid []byte) []byte {
	b := cat([]byte{0xd1, 0, 0, 0, 1, byte(len(dcid))}, dcid, []byte{0})
	b = append(b, 0x40, 100)
	return append(b, make([]byte, 100)...)
}

func flip(b []byte, i int) []byte {
	b[i] ^= 0x20
	return b
}

// backwards is b in one-byte CRYPTO frames, last byte first.
func backwards(b []byte) []byte {
	var out []byte
	for i := len(b) - 1; i >= 0; i-- {
		out = append(out, cryptoFrame(i, b[i:i+1])...)
	}
	return out
}

// shortPacket is an Initial whose length leaves no room for the sample.
func shortPacket() []byte {
	return cat([]byte{0xc0, 0, 0, 0, 1, 8}, testDCID, []byte{0, 0, 10}, make([]byte, 10))
}

// manyPieces is n one-byte CRYPTO frames with gaps between them (and none
// at offset 0).
func manyPieces(n int) []byte {
	var b []byte
	for i := range n {
		b = append(b, cryptoFrame(2+2*i, []byte{'x'})...)
	}
	return b
}

// TestQUICLimits: smaller limits are honoured.
func TestQUICLimits(t *testing.T) {
	ch := quicHello(sniExt("a.example"), ext(0x1234, make([]byte, 200)))
	a := NewQUICAssembler(QUICLimits{MaxCrypto: 100})
	if _, st := a.Add(pkt(cryptoFrame(0, ch))); st != QUICInvalid {
		t.Errorf("hello of %d bytes with MaxCrypto 100: %v", len(ch), st)
	}
	a = NewQUICAssembler(QUICLimits{MaxDatagrams: 2})
	a.Add(pkt(cryptoFrame(0, ch[:10])))
	if _, st := a.Add(pkt(cryptoFrame(10, ch[10:20]))); st != QUICInvalid || !strings.Contains(a.Reason(), "datagram limit") {
		t.Errorf("third datagram with MaxDatagrams 2: %v %q", st, a.Reason())
	}
	if a.Datagrams() != 2 {
		t.Errorf("Datagrams() = %d", a.Datagrams())
	}
	// Reset keeps the limits and forgets the flow.
	a.Reset()
	if r, st := a.Add(pkt(cryptoFrame(0, ch))); st != QUICDone || r.Host != "a.example" || a.Datagrams() != 1 {
		t.Errorf("after Reset: %v %+v", st, r)
	}
	// The zero QUICAssembler works, with the default limits.
	var z QUICAssembler
	if r, st := z.Add(pkt(cryptoFrame(0, ch))); st != QUICDone || r.Host != "a.example" {
		t.Errorf("zero assembler: %v %+v", st, r)
	}
}

// TestQUICDoesNotModifyInput: Add leaves the datagram as it was.
func TestQUICDoesNotModifyInput(t *testing.T) {
	d := pkt(cryptoFrame(0, quicHello(sniExt("a.example"))))
	keep := slices.Clone(d)
	NewQUICAssembler(QUICLimits{}).Add(d)
	if !bytes.Equal(d, keep) {
		t.Error("Add modified the datagram")
	}
}

func TestIsQUICLongHeader(t *testing.T) {
	ch := quicHello(sniExt("a.example"))
	for _, tt := range []struct {
		in   []byte
		want bool
	}{
		{pkt(cryptoFrame(0, ch)), true},
		{pkt(cryptoFrame(0, ch), withVersion(quicV2)), true},
		{zeroRTT(testDCID), true},
		{[]byte{0xc0, 0, 0, 0, 1, 0}, false},
		{cat([]byte{0xc0, 0, 0, 0, 2}, make([]byte, 100)), false},
		{cat([]byte{0x40, 0, 0, 0, 1}, make([]byte, 100)), false},
		{nil, false},
	} {
		if got := IsQUICLongHeader(tt.in); got != tt.want {
			t.Errorf("%x...: %v", tt.in[:min(8, len(tt.in))], got)
		}
	}
}

func TestQUICStatusString(t *testing.T) {
	for st, want := range map[QUICStatus]string{QUICNeedMore: "need-more", QUICDone: "done", NotQUIC: "not-quic", QUICInvalid: "invalid"} {
		if st.String() != want {
			t.Errorf("%d: %q", st, st.String())
		}
	}
}

// TestQUICCorpusChromiumPostQuantum: the Chromium capture is what the issue
// is about, a post-quantum ClientHello (an X25519MLKEM768 key share of
// 1,216 bytes) whose CRYPTO data spans two or more Initial packets.
func TestQUICCorpusChromiumPostQuantum(t *testing.T) {
	ds := readDatagrams(t, "chromium-quic.bin")
	stream := cryptoStream(t, ds)
	if !bytes.Contains(stream, []byte{0x11, 0xec, 0x04, 0xc0}) {
		t.Error("no X25519MLKEM768 key share in Chromium's ClientHello")
	}
	withCrypto := 0
	for _, d := range ds {
		for _, p := range openDatagram(t, d) {
			if hasCryptoFrame(p.frames) {
				withCrypto++
			}
		}
	}
	if withCrypto < 2 {
		t.Errorf("CRYPTO data in %d packets, want 2 or more", withCrypto)
	}
}

// hasCryptoFrame reports whether a decrypted payload has a CRYPTO frame.
func hasCryptoFrame(f []byte) bool {
	for len(f) > 0 {
		switch f[0] {
		case framePadding, framePing:
			f = f[1:]
		case frameCrypto:
			return true
		default: // ACK and the rest: Chromium's first packets have none
			return false
		}
	}
	return false
}
