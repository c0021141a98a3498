package sniff

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
)

// QUIC versions whose Initial packets sniff reads.
const (
	quicV1 = 0x00000001 // RFC 9000
	quicV2 = 0x6b3343cf // RFC 9369
)

// Initial salts (RFC 9001 §5.2, RFC 9369 §3.3.1).
var (
	quicSaltV1 = []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	quicSaltV2 = []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9}
)

// Limits of the QUIC assembler.
const (
	// DefaultQUICMaxCrypto is the default and largest amount of CRYPTO data
	// (offset + length) a flow may carry before its ClientHello is
	// complete. A post-quantum Chromium hello is about 2 KB.
	DefaultQUICMaxCrypto = 16 << 10
	// DefaultQUICMaxDatagrams is how many datagrams a flow may send without
	// completing its ClientHello.
	DefaultQUICMaxDatagrams = 16

	quicMaxPacket   = 16 << 10 // longer Initial packets are skipped unread
	quicMaxPerDgram = 8        // packets read per datagram (real ones coalesce 2 or 3)
	quicMaxCIDLen   = 20       // RFC 9000 §17.2
	quicTagLen      = 16       // AEAD_AES_128_GCM
	quicSampleLen   = 16       // header protection sample (RFC 9001 §5.4.2)
	quicMinLongHdr  = 7        // first byte, version, two CID lengths
)

// QUICStatus is a QUICAssembler's answer about a flow.
type QUICStatus uint8

// A QUICAssembler's answers. All but QUICNeedMore are final: later calls to
// Add return the same answer until Reset.
const (
	// QUICNeedMore: the datagrams so far are QUIC Initial packets, but the
	// ClientHello is not complete yet; add the flow's next datagram.
	QUICNeedMore QUICStatus = iota
	// QUICDone: the ClientHello is complete and the Result holds what it
	// says: Proto QUIC, and Host, ALPN and ECH as for TLS (Host empty if the
	// hello has no acceptable server_name or is malformed).
	QUICDone
	// NotQUIC: the flow's first datagram is not a QUIC v1 or v2 long-header
	// packet. The Result is zero.
	NotQUIC
	// QUICInvalid: the flow looked like QUIC but gives no ClientHello: its
	// first Initial packet does not decrypt or is truncated, a frame is
	// malformed or not allowed in an Initial packet, the CRYPTO data goes
	// past the limit or does not start with a ClientHello, or the limit of
	// datagrams passed. Reason says which. The Result is zero.
	QUICInvalid
)

// String returns "need-more", "done", "not-quic" or "invalid".
func (s QUICStatus) String() string {
	switch s {
	case QUICNeedMore:
		return "need-more"
	case QUICDone:
		return "done"
	case NotQUIC:
		return "not-quic"
	}
	return "invalid"
}

// QUICLimits bound what one flow may make a QUICAssembler hold or do. A zero
// field takes its default.
type QUICLimits struct {
	// MaxCrypto is the most CRYPTO data, in bytes from offset 0, accepted
	// before the ClientHello is complete; data beyond it makes the flow
	// QUICInvalid. Default and maximum: DefaultQUICMaxCrypto (16 KiB).
	MaxCrypto int
	// MaxDatagrams is how many datagrams Add takes before it gives up with
	// QUICInvalid. Default: DefaultQUICMaxDatagrams.
	MaxDatagrams int
}

// QUICAssembler reads the ClientHello from the client's first datagrams of a
// QUIC flow (one client address to one destination): QUIC v1 (RFC 9000,
// 9001) and v2 (RFC 9369) Initial packets, coalesced or not. For each Initial
// packet it derives the client's Initial keys from the packet's Destination
// Connection ID (cached while the ID stays the same), removes header
// protection, decrypts it (AES-128-GCM), and reads its frames: PADDING,
// PING, ACK and CONNECTION_CLOSE are skipped, CRYPTO data is gathered by
// offset, in whatever order and however split across packets and
// datagrams. Once the CRYPTO stream from offset 0 holds a whole ClientHello,
// it is read as by parseTLS.
//
// Other long-header packets (0-RTT, Handshake) and packets after the first
// of a datagram with another Destination Connection ID are skipped; so is
// anything after a short-header packet or unparseable bytes in a datagram,
// and after the 8th packet of a datagram.
// After one Initial packet decrypted, later ones that do not are ignored (a
// forged or corrupted datagram cannot spoil the flow); if the flow's first
// Initial packet does not, the flow is QUICInvalid at once.
//
// Waiting is the caller's business: Add never blocks, and the caller gives
// up after its own deadline (detour waits at most 150 ms from the first
// datagram) and then routes by IP. Memory is bounded by the limits: at most
// MaxCrypto bytes of CRYPTO data and a bit per byte to know which
// arrived, and one packet's plaintext (at most 16 KiB); buffers are allocated as the flow
// needs them and kept across Reset, so a pooled assembler does not allocate
// again. The first Initial packet of a flow costs a key derivation (a few
// allocations); further datagrams with the same Connection ID allocate
// nothing, and the answer allocates once for its strings as parseTLS does.
//
// Add never modifies or retains the datagram. A QUICAssembler is not safe
// for concurrent use.
type QUICAssembler struct {
	lim       QUICLimits
	status    QUICStatus
	res       Result
	reason    string
	datagrams int
	seen      bool // a v1 or v2 long-header packet was seen
	opened    bool // an Initial packet decrypted

	// Keys for the last Destination Connection ID and version.
	keyVer uint32
	dcid   [quicMaxCIDLen]byte
	dcidN  int
	aead   cipher.AEAD
	hp     cipher.Block
	iv     [12]byte
	nonce  [12]byte // per packet; a field so that it does not escape per call
	mask   [16]byte

	crypto  []byte   // the CRYPTO stream by offset; len is the highest end seen
	have    []uint64 // a bit per byte of crypto's capacity: arrived
	contig  int      // crypto[:contig] has all arrived
	scratch []byte   // one packet: the unprotected header, then the plaintext
}

// NewQUICAssembler returns an assembler for one flow.
func NewQUICAssembler(l QUICLimits) *QUICAssembler {
	a := &QUICAssembler{}
	a.SetLimits(l)
	return a
}

// SetLimits changes the limits; zero fields take their defaults.
func (a *QUICAssembler) SetLimits(l QUICLimits) {
	if l.MaxCrypto <= 0 || l.MaxCrypto > DefaultQUICMaxCrypto {
		l.MaxCrypto = DefaultQUICMaxCrypto
	}
	if l.MaxDatagrams <= 0 {
		l.MaxDatagrams = DefaultQUICMaxDatagrams
	}
	a.lim = l
}

// Reset readies the assembler for another flow, keeping its limits and its
// buffers.
func (a *QUICAssembler) Reset() {
	*a = QUICAssembler{
		lim:     a.lim,
		keyVer:  a.keyVer,
		dcid:    a.dcid,
		dcidN:   a.dcidN,
		aead:    a.aead,
		hp:      a.hp,
		iv:      a.iv,
		crypto:  a.crypto[:0],
		have:    a.have,
		scratch: a.scratch,
	}
	clear(a.have)
}

// Reason says why the flow is QUICInvalid or NotQUIC, or "" (a constant
// string: it does not allocate).
func (a *QUICAssembler) Reason() string { return a.reason }

// Datagrams returns how many datagrams Add has taken since the last Reset.
func (a *QUICAssembler) Datagrams() int { return a.datagrams }

// Add reads one datagram of the flow, in the order they arrived, and
// answers for the flow so far. After a final answer it returns that answer
// again without reading the datagram.
func (a *QUICAssembler) Add(datagram []byte) (Result, QUICStatus) {
	if a.status != QUICNeedMore {
		return a.res, a.status
	}
	if a.lim.MaxCrypto == 0 {
		a.SetLimits(QUICLimits{}) // a zero QUICAssembler
	}
	a.datagrams++
	a.datagram(datagram)
	if a.status == QUICNeedMore && a.datagrams >= a.lim.MaxDatagrams {
		a.fail(QUICInvalid, "no complete ClientHello within the datagram limit")
	}
	return a.res, a.status
}

func (a *QUICAssembler) fail(s QUICStatus, reason string) {
	a.status, a.reason, a.res = s, reason, Result{}
}

// longHeader is what the header of a long-header packet says.
type longHeader struct {
	initial bool
	version uint32
	dcid    []byte
	pnOff   int // offset of the packet number
	end     int // offset just past the packet
}

// Answers of parseLongHeader besides ok.
const (
	hdrOK        = iota
	hdrNotQUIC   // not a v1 or v2 long header
	hdrTruncated // a v1 or v2 long header, but malformed or cut short
)

// parseLongHeader reads the long header of the packet at the start of d
// (RFC 9000 §17.2, RFC 9369 §3.2).
func parseLongHeader(d []byte) (longHeader, int) {
	var h longHeader
	if len(d) < quicMinLongHdr || d[0]&0x80 == 0 {
		return h, hdrNotQUIC
	}
	// The fixed bit (0x40) is not checked: a client may grease it (RFC 9287).
	h.version = binary.BigEndian.Uint32(d[1:5])
	if h.version != quicV1 && h.version != quicV2 {
		return h, hdrNotQUIC
	}
	n := int(d[5])
	if n > quicMaxCIDLen {
		return h, hdrNotQUIC
	}
	off := 6 + n
	if len(d) < off+1 {
		return h, hdrTruncated
	}
	h.dcid = d[6:off]
	n = int(d[off])
	if n > quicMaxCIDLen {
		return h, hdrNotQUIC
	}
	off += 1 + n
	typ := d[0] >> 4 & 3
	if h.version == quicV2 {
		typ = (typ + 3) & 3 // v2: Initial 1, 0-RTT 2, Handshake 3, Retry 0
	}
	switch typ {
	case 0: // Initial
		h.initial = true
		tok, m := varint(d[min(off, len(d)):])
		if m == 0 || uint64(len(d)-off-m) < tok {
			return h, hdrTruncated
		}
		off += m + int(tok)
	case 3: // Retry: never from a client, and it has no length
		return h, hdrTruncated
	}
	length, m := varint(d[min(off, len(d)):])
	if m == 0 || uint64(len(d)-off-m) < length {
		return h, hdrTruncated
	}
	h.pnOff = off + m
	h.end = h.pnOff + int(length)
	return h, hdrOK
}

// varint reads a QUIC variable-length integer (RFC 9000 §16) and returns it
// and its length, or a length of 0 if b is too short.
func varint(b []byte) (uint64, int) {
	if len(b) == 0 {
		return 0, 0
	}
	n := 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0
	}
	v := uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, n
}

// datagram reads the packets of one datagram.
func (a *QUICAssembler) datagram(d []byte) {
	if len(d) == 0 && !a.seen {
		a.fail(NotQUIC, "not a QUIC v1 or v2 long-header packet")
		return
	}
	var dcid0 []byte
	for i := 0; len(d) > 0 && a.status == QUICNeedMore && i < quicMaxPerDgram; i++ {
		h, hs := parseLongHeader(d)
		if hs != hdrOK {
			if i == 0 && !a.seen {
				if hs == hdrNotQUIC {
					a.fail(NotQUIC, "not a QUIC v1 or v2 long-header packet")
				} else {
					a.fail(QUICInvalid, "truncated or malformed QUIC long header")
				}
			}
			return // the rest of the datagram is padding, a short-header packet or junk
		}
		if i == 0 {
			dcid0 = h.dcid
		} else if string(h.dcid) != string(dcid0) {
			return // RFC 9000 §12.2: another connection's packet
		}
		a.seen = true
		pkt := d[:h.end]
		d = d[h.end:]
		if !h.initial {
			continue // 0-RTT or Handshake: not for us
		}
		pt, ok := a.open(pkt, h)
		if !ok {
			if !a.opened {
				a.fail(QUICInvalid, "the first Initial packet does not decrypt")
			}
			continue
		}
		a.opened = true
		a.frames(pt)
	}
}

// keys derives the client's Initial keys for a version and Destination
// Connection ID (RFC 9001 §5.2, RFC 9369 §3.3), unless they are cached.
func (a *QUICAssembler) keys(version uint32, dcid []byte) {
	if a.aead != nil && a.keyVer == version && string(a.dcid[:a.dcidN]) == string(dcid) {
		return
	}
	salt, lkey, liv, lhp := quicSaltV1, "quic key", "quic iv", "quic hp"
	if version == quicV2 {
		salt, lkey, liv, lhp = quicSaltV2, "quicv2 key", "quicv2 iv", "quicv2 hp"
	}
	initial, err := hkdf.Extract(sha256.New, dcid, salt)
	if err != nil {
		panic(err) // only on a FIPS 140-only policy violation, not reachable for SHA-256
	}
	client := expandLabel(initial, "client in", sha256.Size)
	block, err := aes.NewCipher(expandLabel(client, lkey, 16))
	if err != nil {
		panic(err) // 16-byte keys cannot fail
	}
	a.aead, err = cipher.NewGCM(block)
	if err != nil {
		panic(err)
	}
	copy(a.iv[:], expandLabel(client, liv, 12))
	if a.hp, err = aes.NewCipher(expandLabel(client, lhp, 16)); err != nil {
		panic(err)
	}
	a.keyVer = version
	a.dcidN = copy(a.dcid[:], dcid)
}

// expandLabel is TLS 1.3's HKDF-Expand-Label with an empty context (RFC 8446
// §7.1) over SHA-256.
func expandLabel(secret []byte, label string, n int) []byte {
	var info [2 + 1 + 6 + 16 + 1]byte // the longest label is "quicv2 key", 10 bytes
	b := binary.BigEndian.AppendUint16(info[:0], uint16(n))
	b = append(b, byte(6+len(label)))
	b = append(b, "tls13 "...)
	b = append(b, label...)
	b = append(b, 0)
	out, err := hkdf.Expand(sha256.New, secret, string(b), n)
	if err != nil {
		panic(err) // n is far below 255*32
	}
	return out
}

// open removes the header protection of an Initial packet (RFC 9001 §5.4)
// and decrypts it (§5.3). It returns the plaintext payload, in a.scratch.
func (a *QUICAssembler) open(pkt []byte, h longHeader) ([]byte, bool) {
	if len(pkt) > quicMaxPacket || len(pkt)-h.pnOff < 4+quicSampleLen {
		return nil, false
	}
	a.keys(h.version, h.dcid)
	a.hp.Encrypt(a.mask[:], pkt[h.pnOff+4:h.pnOff+4+quicSampleLen])
	first := pkt[0] ^ a.mask[0]&0x0f
	pnLen := int(first&3) + 1
	hdrLen := h.pnOff + pnLen
	if len(pkt)-hdrLen < quicTagLen {
		return nil, false
	}
	if cap(a.scratch) < len(pkt) {
		a.scratch = make([]byte, max(len(pkt), 1500))
	}
	hdr := a.scratch[:hdrLen]
	copy(hdr, pkt)
	hdr[0] = first
	var pn uint64
	for i := range pnLen {
		hdr[h.pnOff+i] ^= a.mask[1+i]
		pn = pn<<8 | uint64(hdr[h.pnOff+i])
	}
	// The packet number is used as sent: a client's first Initial packets
	// have small numbers (RFC 9000 §12.3), so the truncated number is the
	// full one.
	a.nonce = a.iv
	for i := range 8 {
		a.nonce[11-i] ^= byte(pn >> (8 * i))
	}
	pt, err := a.aead.Open(a.scratch[hdrLen:hdrLen], a.nonce[:], pkt[hdrLen:], hdr)
	if err != nil || first&0x0c != 0 { // reserved bits must be zero (RFC 9000 §17.2)
		return nil, false
	}
	return pt, true
}

// Frame types allowed in Initial packets (RFC 9000 §12.4, §19).
const (
	framePadding   = 0x00
	framePing      = 0x01
	frameAck       = 0x02
	frameAckECN    = 0x03
	frameCrypto    = 0x06
	frameConnClose = 0x1c
)

// frames reads the frames of a decrypted Initial packet.
func (a *QUICAssembler) frames(p []byte) {
	for len(p) > 0 && a.status == QUICNeedMore {
		typ := p[0]
		p = p[1:]
		switch typ {
		case framePadding:
			for len(p) > 0 && p[0] == framePadding {
				p = p[1:]
			}
		case framePing:
		case frameAck, frameAckECN:
			// Largest Acknowledged, ACK Delay, ACK Range Count, First ACK Range.
			var v [4]uint64
			var ok bool
			if p, ok = varints(p, v[:]); !ok {
				a.fail(QUICInvalid, "malformed ACK frame")
				return
			}
			// Each further range is two varints of at least one byte: a
			// count beyond the bytes left is malformed, which also bounds
			// the loop.
			if v[2] > uint64(len(p)/2) {
				a.fail(QUICInvalid, "malformed ACK frame")
				return
			}
			for range v[2] {
				if p, ok = varints(p, v[:2]); !ok {
					a.fail(QUICInvalid, "malformed ACK frame")
					return
				}
			}
			if typ == frameAckECN {
				if p, ok = varints(p, v[:3]); !ok {
					a.fail(QUICInvalid, "malformed ACK frame")
					return
				}
			}
		case frameCrypto:
			var v [2]uint64 // Offset, Length
			var ok bool
			if p, ok = varints(p, v[:]); !ok || uint64(len(p)) < v[1] {
				a.fail(QUICInvalid, "malformed CRYPTO frame")
				return
			}
			a.cryptoData(v[0], p[:v[1]])
			p = p[v[1]:]
		case frameConnClose:
			var v [3]uint64 // Error Code, Frame Type, Reason Phrase Length
			var ok bool
			if p, ok = varints(p, v[:]); !ok || uint64(len(p)) < v[2] {
				a.fail(QUICInvalid, "malformed CONNECTION_CLOSE frame")
				return
			}
			p = p[v[2]:]
		default:
			a.fail(QUICInvalid, "a frame type not allowed in Initial packets")
			return
		}
	}
}

// varints reads len(v) variable-length integers from the front of p.
func varints(p []byte, v []uint64) ([]byte, bool) {
	for i := range v {
		x, n := varint(p)
		if n == 0 {
			return nil, false
		}
		v[i], p = x, p[n:]
	}
	return p, true
}

// cryptoData stores a CRYPTO frame's data and, once the ClientHello is
// complete, reads it.
func (a *QUICAssembler) cryptoData(off uint64, data []byte) {
	limit := a.lim.MaxCrypto
	if off > uint64(limit) || uint64(len(data)) > uint64(limit)-off {
		a.fail(QUICInvalid, "CRYPTO data beyond the limit")
		return
	}
	if len(data) == 0 {
		return
	}
	lo, hi := int(off), int(off)+len(data)
	if hi > len(a.crypto) {
		if hi > cap(a.crypto) {
			c := make([]byte, len(a.crypto), min(max(hi, 2*cap(a.crypto), 4096), limit))
			copy(c, a.crypto)
			a.crypto = c
			h := make([]uint64, (cap(c)+63)/64)
			copy(h, a.have)
			a.have = h
		}
		a.crypto = a.crypto[:hi]
	}
	copy(a.crypto[lo:hi], data)
	a.mark(lo, hi)
	if lo > a.contig {
		return
	}
	// Extend the contiguous prefix over what arrived.
	for a.contig < len(a.crypto) {
		b := a.contig % 64
		n := bits.TrailingZeros64(^(a.have[a.contig/64] >> b)) // arrived bytes from contig on, in this word
		a.contig += n
		if n < 64-b {
			break
		}
	}
	a.contig = min(a.contig, len(a.crypto))

	if a.contig < handshakeHeaderLen {
		return
	}
	if a.crypto[0] != typeClientHello {
		a.fail(QUICInvalid, "CRYPTO data does not start with a ClientHello")
		return
	}
	end := handshakeHeaderLen + (int(a.crypto[1])<<16 | int(a.crypto[2])<<8 | int(a.crypto[3]))
	if end > limit {
		a.fail(QUICInvalid, "ClientHello longer than the limit")
		return
	}
	if a.contig < end {
		return
	}
	a.res = parseClientHello(a.crypto[handshakeHeaderLen:end])
	a.res.Proto = QUIC
	a.status = QUICDone
}

// mark records that bytes [lo, hi) of the CRYPTO stream arrived.
func (a *QUICAssembler) mark(lo, hi int) {
	for lo < hi {
		i, b := lo/64, lo%64
		n := min(64-b, hi-lo)
		a.have[i] |= (1<<n - 1) << b // n == 64 only with b == 0: 1<<64-1 is all ones
		lo += n
	}
}

// IsQUICLongHeader reports whether a datagram starts with a QUIC v1 or v2
// long-header packet (any type), the way every client's first datagrams
// do. It reads only the first five bytes; a caller can use it to decide
// whether a flow is worth a QUICAssembler.
func IsQUICLongHeader(datagram []byte) bool {
	if len(datagram) < quicMinLongHdr || datagram[0]&0x80 == 0 {
		return false
	}
	v := binary.BigEndian.Uint32(datagram[1:5])
	return v == quicV1 || v == quicV2
}
