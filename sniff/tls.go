package sniff

// TLS record and handshake constants (RFC 8446 §5.1, §4).
const (
	recordTypeHandshake = 0x16
	recordHeaderLen     = 5
	maxRecordLen        = 1 << 14 // TLSPlaintext.length limit
	handshakeHeaderLen  = 4
	maxHelloLen         = 1 << 16 // what crypto/tls accepts; real hellos are < 4 KiB
	typeClientHello     = 1

	extServerName = 0x0000 // RFC 6066 §3
	extALPN       = 0x0010 // RFC 7301 §3.1
	extECH        = 0xfe0d // draft-ietf-tls-esni
	nameTypeHost  = 0
)

// parseTLS reads a TLS ClientHello from the start of b and reports its SNI
// host_name, its ALPN list and whether it carries encrypted_client_hello;
// for NeedMore it also returns the length b must reach before another call
// can make progress.
//
// The handshake message may be spread over any number of handshake records
// of any size (RFC 8446 §5.1); bytes after the ClientHello are ignored.
// parseTLS answers NoMatch when b does not start with TLS handshake records
// carrying a ClientHello: another record type (an SSLv2-compatible hello
// included), a record version whose major byte is not 3, an empty or
// oversized record, or a handshake message of another type or over 64 KiB.
// Once the whole ClientHello is in b it answers Match with Proto TLS; Host is
// empty if the hello has no server_name, if the name is an IP literal or not
// a valid host name, or if the hello is malformed (the ALPN list is then
// empty too).
//
// It allocates once, for the Result's strings, when it finds a host name or
// an ALPN list, and once more for a hello over 4 KiB that is split into
// several records (it reassembles it). Otherwise it does not allocate.
func parseTLS(b []byte) (Result, Status, int) {
	var (
		off    int // start of the current record
		hdr    [handshakeHeaderLen]byte
		nhdr   int    // bytes of hdr seen
		msgLen = -1   // body length, once hdr is complete
		got    int    // handshake bytes seen, header included
		first  = true // in the first record
	)
	for {
		if len(b)-off < recordHeaderLen {
			if !recordPrefixOK(b[off:]) {
				return Result{}, NoMatch, 0
			}
			need := off + recordHeaderLen
			if msgLen >= 0 {
				need += handshakeHeaderLen + msgLen - got
			}
			return Result{}, NeedMore, need
		}
		n := int(b[off+3])<<8 | int(b[off+4])
		if b[off] != recordTypeHandshake || b[off+1] != 3 || n == 0 || n > maxRecordLen {
			return Result{}, NoMatch, 0
		}
		p := b[off+recordHeaderLen:]
		if len(p) > n {
			p = p[:n]
		}
		for i := 0; nhdr < handshakeHeaderLen && i < len(p); i++ {
			hdr[nhdr] = p[i]
			nhdr++
		}
		if hdr[0] != typeClientHello && nhdr > 0 {
			return Result{}, NoMatch, 0
		}
		if nhdr == handshakeHeaderLen && msgLen < 0 {
			msgLen = int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
			if msgLen > maxHelloLen {
				return Result{}, NoMatch, 0
			}
		}
		before := got
		got += len(p)
		if msgLen >= 0 && got >= handshakeHeaderLen+msgLen {
			break // the whole message is in b
		}
		if len(p) < n {
			need := off + recordHeaderLen + n
			if msgLen >= 0 {
				need = min(need, off+recordHeaderLen+handshakeHeaderLen+msgLen-before)
			}
			return Result{}, NeedMore, need
		}
		off += recordHeaderLen + n
		first = false
	}

	end := handshakeHeaderLen + msgLen
	if first {
		// The common case: the message sits in one record.
		r := parseClientHello(b[recordHeaderLen+handshakeHeaderLen : recordHeaderLen+end])
		return r, Match, 0
	}
	// Reassemble the fragments. A real hello fits the stack buffer.
	var stack [4096]byte
	buf := stack[:0]
	if end > len(stack) {
		buf = make([]byte, 0, end)
	}
	for off := 0; len(buf) < end; {
		n := int(b[off+3])<<8 | int(b[off+4])
		p := b[off+recordHeaderLen:]
		p = p[:min(n, len(p), end-len(buf))]
		buf = append(buf, p...)
		off += recordHeaderLen + n
	}
	return parseClientHello(buf[handshakeHeaderLen:end]), Match, 0
}

// recordPrefixOK reports whether b, shorter than a record header, could start
// a handshake record.
func recordPrefixOK(b []byte) bool {
	switch {
	case len(b) > 0 && b[0] != recordTypeHandshake:
		return false
	case len(b) > 1 && b[1] != 3:
		return false
	case len(b) > 3 && int(b[3])<<8 > maxRecordLen:
		return false
	}
	return true
}

// parseClientHello reads a ClientHello body (RFC 8446 §4.1.2, RFC 5246
// §7.4.1.2; the handshake header stripped). It checks what it reads as
// strictly as crypto/tls does, and only the extensions it uses: a malformed
// hello gives a Result with Proto TLS and nothing else.
func parseClientHello(m []byte) Result {
	malformed := Result{Proto: TLS}
	s := m
	// legacy_version, random
	if len(s) < 2+32 {
		return malformed
	}
	s = s[2+32:]
	// legacy_session_id
	s, ok := skip8(s)
	if !ok {
		return malformed
	}
	// cipher_suites
	if len(s) < 2 {
		return malformed
	}
	if n := int(s[0])<<8 | int(s[1]); n%2 != 0 {
		return malformed
	}
	if s, ok = skip16(s); !ok {
		return malformed
	}
	// legacy_compression_methods
	if s, ok = skip8(s); !ok {
		return malformed
	}
	if len(s) == 0 {
		return Result{Proto: TLS} // no extensions at all
	}
	if len(s) < 2 || int(s[0])<<8|int(s[1]) != len(s)-2 {
		return malformed
	}
	s = s[2:]

	var (
		sni, alpn         []byte
		seenSNI, seenALPN bool
		ech, seenECH      bool
	)
	for len(s) > 0 {
		if len(s) < 4 {
			return malformed
		}
		typ := int(s[0])<<8 | int(s[1])
		n := int(s[2])<<8 | int(s[3])
		if len(s)-4 < n {
			return malformed
		}
		data := s[4 : 4+n]
		s = s[4+n:]
		switch typ {
		case extServerName:
			if seenSNI {
				return malformed
			}
			seenSNI = true
			if sni, ok = serverName(data); !ok {
				return malformed
			}
		case extALPN:
			if seenALPN {
				return malformed
			}
			seenALPN = true
			if alpn, ok = alpnList(data); !ok {
				return malformed
			}
		case extECH:
			if seenECH {
				return malformed
			}
			seenECH, ech = true, true
		}
	}
	n := hostLen(sni)
	if n < 0 {
		n = 0
	}
	return newResult(TLS, sni, n, alpn, ech)
}

// serverName reads a server_name extension (RFC 6066 §3) and returns its
// host_name, if any. Like crypto/tls it requires a non-empty list of
// non-empty names with at most one host_name, filling the extension exactly.
func serverName(data []byte) (name []byte, ok bool) {
	if len(data) < 2 || int(data[0])<<8|int(data[1]) != len(data)-2 || len(data) == 2 {
		return nil, false
	}
	for s := data[2:]; len(s) > 0; {
		if len(s) < 3 {
			return nil, false
		}
		typ, n := s[0], int(s[1])<<8|int(s[2])
		if n == 0 || len(s)-3 < n {
			return nil, false
		}
		if typ == nameTypeHost {
			if name != nil {
				return nil, false
			}
			name = s[3 : 3+n]
		}
		s = s[3+n:]
	}
	return name, true
}

// alpnList reads an application_layer_protocol_negotiation extension (RFC
// 7301 §3.1) and returns its protocol_name_list: at least one name, each
// non-empty, filling the extension exactly.
func alpnList(data []byte) ([]byte, bool) {
	if len(data) < 2 || int(data[0])<<8|int(data[1]) != len(data)-2 || len(data) == 2 {
		return nil, false
	}
	list := data[2:]
	for s := list; len(s) > 0; {
		n := int(s[0])
		if n == 0 || len(s)-1 < n {
			return nil, false
		}
		s = s[1+n:]
	}
	return list, true
}

// skip8 drops a vector with a one-byte length prefix from the front of s.
func skip8(s []byte) ([]byte, bool) {
	if len(s) < 1 || len(s)-1 < int(s[0]) {
		return nil, false
	}
	return s[1+int(s[0]):], true
}

// skip16 drops a vector with a two-byte length prefix from the front of s.
func skip16(s []byte) ([]byte, bool) {
	if len(s) < 2 {
		return nil, false
	}
	n := int(s[0])<<8 | int(s[1])
	if len(s)-2 < n {
		return nil, false
	}
	return s[2+n:], true
}
