package sniff

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// --- QUIC Initial packets, built and opened the test's own way ---
//
// The test side derives keys with crypto/hmac (HKDF written out, RFC 5869)
// rather than crypto/hkdf, so that a slip in one is not mirrored in the other.

type testKeys struct{ key, iv, hp []byte }

func hmacSHA256(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// testExpandLabel is HKDF-Expand-Label for outputs of one hash block.
func testExpandLabel(secret []byte, label string, n int) []byte {
	full := "tls13 " + label
	info := slices.Concat(u16(n), []byte{byte(len(full))}, []byte(full), []byte{0})
	return hmacSHA256(secret, info, []byte{1})[:n]
}

func testClientKeys(version uint32, dcid []byte) testKeys {
	salt, prefix := quicSaltV1, "quic "
	if version == quicV2 {
		salt, prefix = quicSaltV2, "quicv2 "
	}
	client := testExpandLabel(hmacSHA256(salt, dcid), "client in", 32)
	return testKeys{
		key: testExpandLabel(client, prefix+"key", 16),
		iv:  testExpandLabel(client, prefix+"iv", 12),
		hp:  testExpandLabel(client, prefix+"hp", 16),
	}
}

func appendVarint(b []byte, v uint64) []byte {
	switch {
	case v < 1<<6:
		return append(b, byte(v))
	case v < 1<<14:
		return binary.BigEndian.AppendUint16(b, uint16(v)|0x4000)
	case v < 1<<30:
		return binary.BigEndian.AppendUint32(b, uint32(v)|0x80000000)
	}
	return binary.BigEndian.AppendUint64(b, v|0xc000000000000000)
}

// Frames.
func cryptoFrame(off int, data []byte) []byte {
	b := appendVarint([]byte{frameCrypto}, uint64(off))
	b = appendVarint(b, uint64(len(data)))
	return append(b, data...)
}

func ackFrame(largest uint64, ranges int, ecn bool) []byte {
	typ := byte(frameAck)
	if ecn {
		typ = frameAckECN
	}
	b := appendVarint([]byte{typ}, largest)
	b = appendVarint(b, 25)             // delay
	b = appendVarint(b, uint64(ranges)) // range count
	b = appendVarint(b, 0)              // first range
	for range ranges {
		b = appendVarint(appendVarint(b, 1), 0)
	}
	if ecn {
		b = appendVarint(appendVarint(appendVarint(b, 1), 2), 300)
	}
	return b
}

func connCloseFrame(reason string) []byte {
	b := appendVarint([]byte{frameConnClose}, 0x0a)
	b = appendVarint(b, 0x06)
	b = appendVarint(b, uint64(len(reason)))
	return append(b, reason...)
}

// initialPacket describes a client Initial packet to build.
type initialPacket struct {
	version      uint32
	dcid, scid   []byte
	token        []byte
	pn           uint64
	pnLen        int
	payload      []byte // frames
	size         int    // pad with PADDING to this many bytes, if larger
	reservedBits byte   // set these reserved bits (0x0c) in the first byte
}

// seal builds the protected packet (RFC 9001 §5.3, §5.4).
func (p initialPacket) seal() []byte {
	if p.version == 0 {
		p.version = quicV1
	}
	if p.pnLen == 0 {
		p.pnLen = 2
	}
	typ := byte(0)
	if p.version == quicV2 {
		typ = 1
	}
	payload := slices.Clone(p.payload)
	if n := len(payload) + p.pnLen; n < 4 { // room for the sample
		payload = append(payload, make([]byte, 4-n)...)
	}
	hdr := []byte{0xc0 | typ<<4 | p.reservedBits | byte(p.pnLen-1)}
	hdr = binary.BigEndian.AppendUint32(hdr, p.version)
	hdr = append(append(hdr, byte(len(p.dcid))), p.dcid...)
	hdr = append(append(hdr, byte(len(p.scid))), p.scid...)
	hdr = append(appendVarint(hdr, uint64(len(p.token))), p.token...)
	if pad := p.size - (len(hdr) + 2 + p.pnLen + len(payload) + quicTagLen); pad > 0 {
		payload = append(payload, make([]byte, pad)...)
	}
	hdr = binary.BigEndian.AppendUint16(hdr, 0x4000|uint16(p.pnLen+len(payload)+quicTagLen))
	pnOff := len(hdr)
	for i := p.pnLen - 1; i >= 0; i-- {
		hdr = append(hdr, byte(p.pn>>(8*i)))
	}
	k := testClientKeys(p.version, p.dcid)
	block, _ := aes.NewCipher(k.key)
	gcm, _ := cipher.NewGCM(block)
	nonce := slices.Clone(k.iv)
	for i := range 8 {
		nonce[11-i] ^= byte(p.pn >> (8 * i))
	}
	pkt := gcm.Seal(slices.Clone(hdr), nonce, payload, hdr)
	hp, _ := aes.NewCipher(k.hp)
	var mask [16]byte
	hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+4+16])
	pkt[0] ^= mask[0] & 0x0f
	for i := range p.pnLen {
		pkt[pnOff+i] ^= mask[1+i]
	}
	return pkt
}

// openedPacket is a client Initial packet taken apart.
type openedPacket struct {
	initialPacket
	frames []byte // the decrypted payload
}

// openDatagram takes apart the long-header packets of a datagram and
// decrypts its Initial packets; other packets come back with a nil frames.
func openDatagram(tb testing.TB, d []byte) []openedPacket {
	tb.Helper()
	var out []openedPacket
	for len(d) > 0 && d[0]&0x80 != 0 {
		var p openedPacket
		p.version = binary.BigEndian.Uint32(d[1:5])
		off := 5
		n := int(d[off])
		p.dcid = d[off+1 : off+1+n]
		off += 1 + n
		n = int(d[off])
		p.scid = d[off+1 : off+1+n]
		off += 1 + n
		typ := d[0] >> 4 & 3
		initial := typ == 0 && p.version == quicV1 || typ == 1 && p.version == quicV2
		if initial {
			tl, m := varint(d[off:])
			p.token = d[off+m : off+m+int(tl)]
			off += m + int(tl)
		}
		length, m := varint(d[off:])
		off += m
		end := off + int(length)
		if !initial {
			out = append(out, p)
			d = d[end:]
			continue
		}
		k := testClientKeys(p.version, p.dcid)
		hp, _ := aes.NewCipher(k.hp)
		var mask [16]byte
		hp.Encrypt(mask[:], d[off+4:off+20])
		hdr := slices.Clone(d[:off+4])
		hdr[0] ^= mask[0] & 0x0f
		p.pnLen = int(hdr[0]&3) + 1
		hdr = hdr[:off+p.pnLen]
		for i := range p.pnLen {
			hdr[off+i] ^= mask[1+i]
			p.pn = p.pn<<8 | uint64(hdr[off+i])
		}
		block, _ := aes.NewCipher(k.key)
		gcm, _ := cipher.NewGCM(block)
		nonce := slices.Clone(k.iv)
		for i := range 8 {
			nonce[11-i] ^= byte(p.pn >> (8 * i))
		}
		pt, err := gcm.Open(nil, nonce, d[len(hdr):end], hdr)
		if err != nil {
			tb.Fatalf("test opener: packet does not decrypt: %v", err)
		}
		p.frames = pt
		p.size = end
		out = append(out, p)
		d = d[end:]
	}
	return out
}

// cryptoStream returns the CRYPTO stream of a flight's Initial packets,
// read the test's own way, up to the first gap.
func cryptoStream(tb testing.TB, datagrams [][]byte) []byte {
	tb.Helper()
	var stream []byte
	have := map[int]bool{}
	for _, d := range datagrams {
		for _, p := range openDatagram(tb, d) {
			f := p.frames
			for len(f) > 0 {
				switch f[0] {
				case framePadding, framePing:
					f = f[1:]
				case frameCrypto:
					off, n := varint(f[1:])
					l, m := varint(f[1+n:])
					data := f[1+n+m : 1+n+m+int(l)]
					if need := int(off) + len(data); need > len(stream) {
						stream = append(stream, make([]byte, need-len(stream))...)
					}
					copy(stream[off:], data)
					for i := range data {
						have[int(off)+i] = true
					}
					f = f[1+n+m+int(l):]
				case frameAck, frameAckECN:
					v := make([]uint64, 4)
					f, _ = varints(f[1:], v)
					for range v[2] {
						f, _ = varints(f, v[:2])
					}
					if f[0] == frameAckECN {
						f, _ = varints(f, v[:3])
					}
				default:
					tb.Fatalf("test reader: frame type %#x", f[0])
				}
			}
		}
	}
	n := 0
	for have[n] {
		n++
	}
	return stream[:n]
}

// --- The UDP corpus: captured datagrams ---

// flow is one capture of testdata/udp-corpus.txt: the datagrams a client
// sent, in order, and what sniff must report.
type flow struct {
	file      string
	datagrams [][]byte
	want      Result
	alpn      []string
	qtype     uint16 // DNS only
}

// readDatagrams reads a file of datagrams, each prefixed with its two-byte
// big-endian length.
func readDatagrams(tb testing.TB, name string) [][]byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "datagrams", name))
	if err != nil {
		tb.Fatal(err)
	}
	return splitDatagrams(b)
}

// splitDatagrams splits length-prefixed datagrams; a short last one is
// taken as it is.
func splitDatagrams(b []byte) [][]byte {
	var out [][]byte
	for len(b) >= 2 {
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		n = min(n, len(b))
		out = append(out, b[:n])
		b = b[n:]
	}
	return out
}

func joinDatagrams(ds [][]byte) []byte {
	var b []byte
	for _, d := range ds {
		b = append(binary.BigEndian.AppendUint16(b, uint16(len(d))), d...)
	}
	return b
}

// loadFlows reads testdata/udp-corpus.txt and the captures it lists.
func loadFlows(tb testing.TB, proto Proto) []flow {
	tb.Helper()
	var out []flow
	for _, e := range manifest(tb, "udp-corpus.txt") {
		line, fields := e.line, e.fields
		fl := flow{file: fields[0], datagrams: readDatagrams(tb, fields[0])}
		switch fields[1] {
		case "quic":
			fl.want.Proto = QUIC
			if fields[3] != "-" {
				fl.alpn = strings.Split(fields[3], ",")
			}
			fl.want.ECH = fields[4] == "ech"
		case "dns":
			fl.want.Proto = DNS
			qt, ok := dnsTypes[fields[3]]
			if !ok {
				tb.Fatalf("udp-corpus.txt: unknown DNS type in %q", line)
			}
			fl.qtype = qt
		default:
			tb.Fatalf("udp-corpus.txt: bad proto in %q", line)
		}
		if fields[2] != "-" {
			fl.want.Host = fields[2]
		}
		if fl.want.Proto == proto {
			out = append(out, fl)
		}
	}
	if len(out) == 0 {
		tb.Fatalf("udp-corpus.txt lists no %v flows", proto)
	}
	return out
}

var dnsTypes = map[string]uint16{"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "DS": 43, "DNSKEY": 48, "HTTPS": 65, "ANY": 255}

// feed gives datagrams to a fresh assembler and returns its last answer.
func feed(ds [][]byte) (Result, QUICStatus, *QUICAssembler) {
	a := NewQUICAssembler(QUICLimits{})
	var r Result
	var st QUICStatus
	for _, d := range ds {
		if r, st = a.Add(d); st != QUICNeedMore {
			break
		}
	}
	return r, st, a
}

// checkQUIC compares a QUIC answer with what a flow wants.
func (fl flow) checkQUIC(t *testing.T, how string, r Result, st QUICStatus, a *QUICAssembler) {
	t.Helper()
	if st != QUICDone || r.Proto != QUIC || r.Host != fl.want.Host || r.ECH != fl.want.ECH || !slices.Equal(r.ALPN(), fl.alpn) {
		t.Errorf("%s %s: got %v (%s) %+v alpn %q; want done %+v alpn %q", fl.file, how, st, a.Reason(), r, r.ALPN(), fl.want, fl.alpn)
	}
}

// checkQUICResult checks what holds for every answer of the assembler.
func checkQUICResult(t *testing.T, r Result, st QUICStatus, a *QUICAssembler) {
	t.Helper()
	switch st {
	case QUICNeedMore, NotQUIC, QUICInvalid:
		if r != (Result{}) {
			t.Fatalf("%v with a non-zero Result %+v", st, r)
		}
		if (st == QUICNeedMore) != (a.Reason() == "") {
			t.Fatalf("%v with reason %q", st, a.Reason())
		}
	case QUICDone:
		if r.Proto != QUIC || r.ViaProxy {
			t.Fatalf("done with %+v", r)
		}
		if r.Host != "" && wantHost(r.Host) != r.Host {
			t.Fatalf("reported host %q is not a normalised host name", r.Host)
		}
		for _, p := range r.ALPN() {
			if p == "" {
				t.Fatalf("empty ALPN protocol in %+v", r)
			}
		}
	default:
		t.Fatalf("bad status %d", st)
	}
}

// --- Variants of a captured QUIC flight ---

// reseal re-encrypts a flight's Initial packets with new CRYPTO framing:
// the stream cut into frames of 1..maxFrame bytes, shuffled, spread over
// packets of at most perPacket frames with PING and PADDING among them,
// each packet padded to 1200 bytes in its own datagram, in shuffled order.
// The first packet's header (version, connection IDs, token) is kept unless
// version is non-zero.
func reseal(tb testing.TB, datagrams [][]byte, version uint32, maxFrame, perPacket int, rng *rand.Rand) [][]byte {
	tb.Helper()
	stream := cryptoStream(tb, datagrams)
	first := openDatagram(tb, datagrams[0])[0]
	if version != 0 {
		first.version = version
	}
	var frames [][]byte
	for off := 0; off < len(stream); {
		n := min(1+rng.IntN(maxFrame), len(stream)-off)
		frames = append(frames, cryptoFrame(off, stream[off:off+n]))
		off += n
	}
	rng.Shuffle(len(frames), func(i, j int) { frames[i], frames[j] = frames[j], frames[i] })
	var out [][]byte
	for pn := 0; len(frames) > 0; pn++ {
		k := min(perPacket, len(frames))
		var payload []byte
		for _, f := range frames[:k] {
			payload = append(payload, f...)
			switch rng.IntN(3) {
			case 0:
				payload = append(payload, framePing)
			case 1:
				payload = append(payload, make([]byte, rng.IntN(8))...)
			}
		}
		frames = frames[k:]
		p := first.initialPacket
		p.pn, p.pnLen, p.payload, p.size = uint64(pn), 1+rng.IntN(4), payload, 1200
		out = append(out, p.seal())
	}
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// coalesce puts the Initial packets of a flight's datagrams, without their
// PADDING, into as few datagrams of at most 1500 bytes as they fit. Packets
// are re-sealed without PADDING so that two fit in one datagram.
func coalesce(tb testing.TB, datagrams [][]byte) [][]byte {
	tb.Helper()
	var pkts [][]byte
	for _, d := range datagrams {
		for _, p := range openDatagram(tb, d) {
			if p.frames == nil {
				continue
			}
			q := p.initialPacket
			q.payload, q.size = stripPadding(p.frames), 0
			pkts = append(pkts, q.seal())
		}
	}
	var out [][]byte
	var cur []byte
	for _, p := range pkts {
		if len(cur) > 0 && len(cur)+len(p) > 1500 {
			out = append(out, cur)
			cur = nil
		}
		cur = append(cur, p...)
	}
	return append(out, cur)
}

// stripPadding drops the PADDING frames of a payload.
func stripPadding(f []byte) []byte {
	var out []byte
	for len(f) > 0 {
		switch f[0] {
		case framePadding:
			f = f[1:]
		case framePing:
			out, f = append(out, f[0]), f[1:]
		case frameCrypto:
			_, n := varint(f[1:])
			l, m := varint(f[1+n:])
			end := 1 + n + m + int(l)
			out, f = append(out, f[:end]...), f[end:]
		default: // ACK or anything else: keep the rest as it is
			return append(out, f...)
		}
	}
	return out
}
