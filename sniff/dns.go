package sniff

import "encoding/binary"

// DNS message constants (RFC 1035 §4.1).
const (
	dnsHeaderLen  = 12
	dnsMaxName    = 255 // wire length of a name, root label included
	dnsMaxLabel   = 63
	dnsRRFixedLen = 10 // TYPE, CLASS, TTL, RDLENGTH
)

// DNSQuery reads a DNS query message (RFC 1035 §4.1), as a client sends it
// in one UDP datagram, and returns its question's QNAME and QTYPE.
//
// ok is false unless b is a well-formed standard query: QR clear (not a
// response), OPCODE 0 (QUERY), exactly one question, no answer or authority
// records, and additional records (an EDNS OPT record, a TSIG) that fill
// the message exactly. The QNAME must be plain labels: a compression
// pointer, which cannot point anywhere useful in the first name of a
// message, is refused, so there is nothing to loop on. The name is reported
// like the other parsers' host names (lower case, no trailing dot); it is ""
// for the root and for a name that is not a plausible host name (see the
// package comment), with ok still true. DNSQuery allocates only the name's
// string.
func DNSQuery(b []byte) (name string, qtype uint16, ok bool) {
	if len(b) < dnsHeaderLen {
		return "", 0, false
	}
	flags := binary.BigEndian.Uint16(b[2:4])
	qd := binary.BigEndian.Uint16(b[4:6])
	an := binary.BigEndian.Uint16(b[6:8])
	ns := binary.BigEndian.Uint16(b[8:10])
	ar := int(binary.BigEndian.Uint16(b[10:12]))
	if flags&0x8000 != 0 || flags>>11&0xf != 0 || qd != 1 || an != 0 || ns != 0 {
		return "", 0, false
	}

	var buf [dnsMaxName]byte // the name in dotted form
	n := 0
	valid := true
	off := dnsHeaderLen
	for {
		if off >= len(b) {
			return "", 0, false
		}
		l := int(b[off])
		off++
		if l == 0 {
			break
		}
		if l > dnsMaxLabel || off+l > len(b) || off-dnsHeaderLen+l >= dnsMaxName {
			return "", 0, false // a pointer or reserved label type, or too long
		}
		if n > 0 {
			buf[n] = '.'
			n++
		}
		for _, c := range b[off : off+l] {
			if c == '.' {
				valid = false // a dot inside a label is not a host name
			}
			buf[n] = c
			n++
		}
		off += l
	}
	if len(b)-off < 4 { // QTYPE, QCLASS
		return "", 0, false
	}
	qtype = binary.BigEndian.Uint16(b[off:])
	off += 4

	// The additional records must fill the message exactly. Each takes at
	// least 11 bytes, so the loop is bounded by the message.
	for range ar {
		if off = skipDNSName(b, off); off < 0 || len(b)-off < dnsRRFixedLen {
			return "", 0, false
		}
		rdlen := int(binary.BigEndian.Uint16(b[off+8:]))
		off += dnsRRFixedLen
		if len(b)-off < rdlen {
			return "", 0, false
		}
		off += rdlen
	}
	if off != len(b) {
		return "", 0, false
	}

	if n == 0 || !valid {
		return "", qtype, true
	}
	if hl := hostLen(buf[:n]); hl > 0 {
		for i, c := range buf[:hl] {
			if 'A' <= c && c <= 'Z' {
				buf[i] = c + 'a' - 'A'
			}
		}
		return string(buf[:hl]), qtype, true
	}
	return "", qtype, true
}

// skipDNSName returns the offset just past the (possibly compressed) name
// at off in a record after the question, or -1. A compression pointer ends
// a name and is not followed, so there is no loop; it must point backwards,
// to a name already read.
func skipDNSName(b []byte, off int) int {
	start := off
	for off < len(b) {
		l := int(b[off])
		switch {
		case l == 0:
			return off + 1
		case l&0xc0 == 0xc0:
			if off+2 > len(b) || int(binary.BigEndian.Uint16(b[off:])&0x3fff) >= start {
				return -1
			}
			return off + 2
		case l > dnsMaxLabel:
			return -1
		}
		off += 1 + l
		if off-start >= dnsMaxName {
			return -1
		}
	}
	return -1
}
