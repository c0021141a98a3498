package sniff

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// quicSeeds are the captured QUIC flows, the variant files, more variants
// (reversed, coalesced, re-framed, re-sealed as v2, cut, bit-flipped) and the
// synthetic cases of TestQUICAssembler, each as length-prefixed datagrams.
func quicSeeds(f *testing.F) [][]byte {
	var seeds [][]byte
	rng := rand.New(rand.NewPCG(14, 1))
	for _, fl := range loadFlows(f, QUIC) {
		ds := fl.datagrams
		rev := slices.Clone(ds)
		slices.Reverse(rev)
		seeds = append(seeds, joinDatagrams(ds), joinDatagrams(rev), joinDatagrams(coalesce(f, ds)),
			joinDatagrams(reseal(f, ds, quicV2, 200, 3, rng)), joinDatagrams(reseal(f, ds, 0, 7, 40, rng)))
		cut := slices.Clone(ds)
		cut[0] = cut[0][:len(cut[0])/2]
		seeds = append(seeds, joinDatagrams(cut))
		flipped := joinDatagrams(ds)
		flipped[2+rng.IntN(len(flipped)-2)] ^= 0x10
		seeds = append(seeds, flipped)
	}
	vs, err := os.ReadDir(filepath.Join("testdata", "datagrams", "variants"))
	if err != nil {
		f.Fatal(err)
	}
	for _, v := range vs {
		seeds = append(seeds, joinDatagrams(readDatagrams(f, filepath.Join("variants", v.Name()))))
	}
	ch := quicHello(sniExt("a.example"), alpnExt("h3"))
	seeds = append(seeds,
		joinDatagrams(dgrams(pkt(cat(cryptoFrame(9, ch[9:]), ackFrame(5, 2, true), connCloseFrame("x"), cryptoFrame(0, ch[:9]))))),
		joinDatagrams(dgrams(cat(pkt(cryptoFrame(0, ch[:20]), withSize(0), withVersion(quicV2)), pkt(cryptoFrame(20, ch[20:]), withVersion(quicV2))))),
		joinDatagrams(dgrams(zeroRTT(testDCID), pkt(backwards(ch)))),
		joinDatagrams(dgrams(dnsQuery("example.com", 1, nil))),
	)
	return seeds
}

// fuzzQUICMax bounds FuzzQUIC's inputs: a few full-size datagrams.
const fuzzQUICMax = 6000

// FuzzQUIC feeds length-prefixed datagrams to an assembler: no panic, every
// answer well-formed, final answers final, the datagram limit kept, and the
// same answer again after Reset.
func FuzzQUIC(f *testing.F) {
	for _, s := range quicSeeds(f) {
		if len(s) <= fuzzQUICMax {
			f.Add(s)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > fuzzQUICMax {
			return // bigger inputs only slow the fuzzer: the 8-datagram limit is checked below
		}
		ds := splitDatagrams(data)
		a := NewQUICAssembler(QUICLimits{MaxDatagrams: 8})
		var r Result
		var st QUICStatus
		for _, d := range ds {
			r2, st2 := a.Add(d)
			checkQUICResult(t, r2, st2, a)
			if st != QUICNeedMore && (st2 != st || r2 != r) {
				t.Fatalf("final %v %+v became %v %+v", st, r, st2, r2)
			}
			r, st = r2, st2
		}
		if a.Datagrams() > 8 {
			t.Fatalf("%d datagrams taken, limit 8", a.Datagrams())
		}
		a.Reset()
		var r3 Result
		var st3 QUICStatus
		for _, d := range ds {
			if r3, st3 = a.Add(d); st3 != QUICNeedMore {
				break
			}
		}
		if len(ds) > 0 && (r3 != r || st3 != st) {
			t.Fatalf("after Reset: %v %+v, before: %v %+v", st3, r3, st, r)
		}
	})
}

// FuzzQUICFrames seals fuzzed plaintext as the payloads of two Initial
// packets, so that the frame reader is fuzzed behind valid encryption, and
// compares the answer with a plain reference reading of the frames.
func FuzzQUICFrames(f *testing.F) {
	ch := quicHello(sniExt("a.example"), alpnExt("h3", "h3-29"), ext(extECH, []byte{1}))
	f.Add(cat(cryptoFrame(0, ch)), uint16(0), false)
	f.Add(cat(cryptoFrame(30, ch[30:]), []byte{framePing}, ackFrame(9, 3, false), cryptoFrame(0, ch[:30])), uint16(40), true)
	f.Add(cat(connCloseFrame("bye"), cryptoFrame(0, ch[:5]), make([]byte, 10), cryptoFrame(5, ch[5:])), uint16(300), false)
	f.Add(backwards(ch), uint16(500), true)
	f.Add(cat(cryptoFrame(16383, []byte{1}), cryptoFrame(0, ch)), uint16(1), false)
	f.Fuzz(func(t *testing.T, payload []byte, split uint16, v2 bool) {
		if len(payload) > 8000 {
			return
		}
		k := 0
		if len(payload) > 0 {
			k = int(split) % (len(payload) + 1)
		}
		version := uint32(quicV1)
		if v2 {
			version = quicV2
		}
		parts := [][]byte{payload[:k], payload[k:]}
		var ds [][]byte
		for i, p := range parts {
			ds = append(ds, initialPacket{version: version, dcid: testDCID, pn: uint64(i), payload: p, size: 1200}.seal())
		}
		r, st, a := feed(ds)
		checkQUICResult(t, r, st, a)

		hello, valid := refFrames(parts)
		if !valid {
			return
		}
		if hello != nil {
			want := parseClientHello(hello[handshakeHeaderLen:])
			want.Proto = QUIC
			if st != QUICDone || r != want {
				t.Fatalf("reference reads a ClientHello (%+v), the assembler %v %+v (%s)", want, st, r, a.Reason())
			}
		} else if st == QUICDone {
			t.Fatalf("the reference finds no whole ClientHello, the assembler %+v", r)
		}
	})
}

// refFrames reads Initial payloads the simple way, a byte map for the
// CRYPTO stream. valid is false if a frame is malformed or not allowed, a
// byte arrives twice (overlaps may differ), or data reaches past 16 KiB;
// hello is the ClientHello if the stream holds a whole one from offset 0.
func refFrames(payloads [][]byte) (hello []byte, valid bool) {
	got := map[int]byte{}
	for _, p := range payloads {
		for len(p) > 0 {
			typ := p[0]
			p = p[1:]
			var v []uint64
			var ok bool
			switch typ {
			case framePadding, framePing:
				continue
			case frameAck, frameAckECN:
				v = make([]uint64, 4)
				if p, ok = varints(p, v); !ok {
					return nil, false
				}
				for i := uint64(0); i < v[2]; i++ {
					if p, ok = varints(p, v[:2]); !ok {
						return nil, false
					}
				}
				if typ == frameAckECN {
					if p, ok = varints(p, v[:3]); !ok {
						return nil, false
					}
				}
			case frameCrypto:
				v = make([]uint64, 2)
				if p, ok = varints(p, v); !ok || uint64(len(p)) < v[1] || v[0]+v[1] > 16<<10 {
					return nil, false
				}
				for i, c := range p[:v[1]] {
					if _, dup := got[int(v[0])+i]; dup {
						return nil, false
					}
					got[int(v[0])+i] = c
				}
				p = p[v[1]:]
			case frameConnClose:
				v = make([]uint64, 3)
				if p, ok = varints(p, v); !ok || uint64(len(p)) < v[2] {
					return nil, false
				}
				p = p[v[2]:]
			default:
				return nil, false
			}
		}
	}
	var stream []byte
	for c, ok := got[0]; ok; c, ok = got[len(stream)] {
		stream = append(stream, c)
	}
	if len(stream) >= 4 && stream[0] != typeClientHello {
		return nil, false // the assembler gives up on it as soon as it sees it
	}
	if len(stream) < 4 {
		return nil, true
	}
	end := 4 + (int(stream[1])<<16 | int(stream[2])<<8 | int(stream[3]))
	if end > 16<<10 {
		return nil, false
	}
	if len(stream) < end {
		return nil, true
	}
	return stream[:end], true
}

// FuzzDNS checks DNSQuery's invariants, and that whatever it accepts
// golang.org/x/net/dns/dnsmessage reads as the same one-question query.
func FuzzDNS(f *testing.F) {
	for _, fl := range loadFlows(f, DNS) {
		f.Add(fl.datagrams[0])
	}
	f.Add(dnsQuery("example.com", 1, [][]byte{optRR}))
	f.Add(dnsQuery("a.b", 28, [][]byte{optRR, cat([]byte{0xc0, 12, 0, 250, 0, 255, 0, 0, 0, 0, 0, 2, 1, 2})}))
	f.Add(cat(dnsQuery("x", 1, nil)[:12], []byte{0xc0, 12, 0, 1, 0, 1}))
	f.Add(selfPointer())
	f.Fuzz(func(t *testing.T, data []byte) {
		name, qtype, ok := DNSQuery(data)
		if !ok {
			if name != "" || qtype != 0 {
				t.Fatalf("not ok, but %q %d", name, qtype)
			}
			return
		}
		if name != "" && wantHost(name) != name {
			t.Fatalf("%q is not a normalised host name", name)
		}
		var p dnsmessage.Parser
		h, err := p.Start(data)
		if err != nil || h.Response || h.OpCode != 0 {
			t.Fatalf("dnsmessage: %v %+v", err, h)
		}
		q, err := p.Question()
		if err != nil {
			// dnsmessage refuses some names DNSQuery takes as a message
			// but does not report: a dot inside a label, its own length
			// rule at the edge.
			if name == "" || len(name) > 250 {
				return
			}
			t.Fatalf("dnsmessage question: %v", err)
		}
		if uint16(q.Type) != qtype {
			t.Fatalf("dnsmessage reads type %d, DNSQuery %d", q.Type, qtype)
		}
		if want := strings.ToLower(strings.TrimSuffix(q.Name.String(), ".")); name != "" && want != name {
			t.Fatalf("dnsmessage reads %q, DNSQuery %q", q.Name.String(), name)
		}
		if err := p.SkipAllQuestions(); err != nil {
			t.Fatalf("dnsmessage: %v", err)
		}
		if _, err := p.AllAnswers(); err != nil {
			t.Fatalf("dnsmessage: %v", err)
		}
	})
}
