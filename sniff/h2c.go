package sniff

// HTTP/2 framing (RFC 9113 §4.1, §6).
const (
	frameHeaderLen    = 9
	maxFrameLen       = 1 << 14 // SETTINGS_MAX_FRAME_SIZE before the server says otherwise
	maxHeaderBlock    = 1 << 16
	frameHeaders      = 0x1
	frameContinuation = 0x9
	flagEndHeaders    = 0x4
	flagPadded        = 0x8
	flagPriority      = 0x20
)

// HPACK static table indices of the fields sniff looks for (RFC 7541
// Appendix A).
const (
	staticAuthority = 1
	staticHost      = 38
	staticTableLen  = 61
)

// maxAuthorityLen bounds a decoded :authority or host value: a 253-byte name,
// a colon and a port.
const maxAuthorityLen = 253 + 1 + 5

// parseH2C reads the frames that follow the HTTP/2 connection preface up to
// and including the first complete header block, and reports its authority.
func parseH2C(b []byte) (Result, Status) {
	none := Result{Proto: H2C}
	off := 0
	for {
		if len(b)-off < frameHeaderLen {
			return Result{}, NeedMore
		}
		n, typ, flags, stream := frameHeader(b[off:])
		if n > maxFrameLen {
			return none, Match
		}
		if len(b)-off-frameHeaderLen < n {
			return Result{}, NeedMore
		}
		payload := b[off+frameHeaderLen : off+frameHeaderLen+n]
		off += frameHeaderLen + n
		switch typ {
		case frameContinuation:
			return none, Match // not after HEADERS
		case frameHeaders:
		default:
			continue // SETTINGS, WINDOW_UPDATE, PRIORITY, unknown types …
		}
		frag, ok := headersFragment(payload, flags)
		if stream == 0 || !ok {
			return none, Match
		}
		if flags&flagEndHeaders != 0 {
			return h2Authority(frag), Match
		}

		// The block goes on in CONTINUATION frames of the same stream.
		total, end := len(frag), off
		for {
			if len(b)-end < frameHeaderLen {
				return Result{}, NeedMore
			}
			n, typ, flags, s := frameHeader(b[end:])
			if typ != frameContinuation || s != stream || n > maxFrameLen {
				return none, Match
			}
			if len(b)-end-frameHeaderLen < n {
				return Result{}, NeedMore
			}
			total += n
			end += frameHeaderLen + n
			if total > maxHeaderBlock {
				return none, Match
			}
			if flags&flagEndHeaders != 0 {
				break
			}
		}
		var stack [4096]byte
		block := stack[:0]
		if total > len(stack) {
			block = make([]byte, 0, total)
		}
		block = append(block, frag...)
		for ; off < end; off += frameHeaderLen + n {
			n = int(b[off])<<16 | int(b[off+1])<<8 | int(b[off+2])
			block = append(block, b[off+frameHeaderLen:off+frameHeaderLen+n]...)
		}
		return h2Authority(block), Match
	}
}

// frameHeader decodes the 9-byte frame header at the start of b.
func frameHeader(b []byte) (n int, typ, flags byte, stream uint32) {
	n = int(b[0])<<16 | int(b[1])<<8 | int(b[2])
	stream = (uint32(b[5])<<24 | uint32(b[6])<<16 | uint32(b[7])<<8 | uint32(b[8])) & 0x7fffffff
	return n, b[3], b[4], stream
}

// headersFragment strips padding and priority fields from a HEADERS payload
// (RFC 9113 §6.2).
func headersFragment(p []byte, flags byte) ([]byte, bool) {
	pad := 0
	if flags&flagPadded != 0 {
		if len(p) < 1 {
			return nil, false
		}
		pad, p = int(p[0]), p[1:]
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return nil, false
		}
		p = p[5:]
	}
	if pad > len(p) {
		return nil, false
	}
	return p[:len(p)-pad], true
}

// h2Authority HPACK-decodes a header block (RFC 7541 §6) far enough to find
// its :authority, or else its host field, and returns the Result for it.
//
// Only the first header block of a connection is decoded, so the dynamic
// table holds only what this block added. An entry this block added can be
// named :authority or host only if that field was seen before (when it was
// added), so references to the dynamic table can be skipped without keeping
// it: the first :authority or host is always spelled with a static index or a
// literal name.
func h2Authority(block []byte) Result {
	none := Result{Proto: H2C}
	var (
		nameBuf  [len("content-length")]byte // longer names are neither
		valBuf   [maxAuthorityLen]byte
		hostBuf  [maxAuthorityLen]byte
		host     []byte // the first host field's value
		haveHost bool
		hostFits bool
	)
	for len(block) > 0 {
		c := block[0]
		var prefix uint
		switch {
		case c&0x80 != 0: // indexed field line (§6.1)
			idx, rest, ok := hpackInt(block, 7)
			if !ok || idx == 0 {
				return none
			}
			block = rest
			switch idx {
			case staticAuthority:
				return none // an empty :authority
			case staticHost:
				if !haveHost {
					haveHost, hostFits, host = true, true, nil
				}
			}
			continue
		case c&0xe0 == 0x20: // dynamic table size update (§6.3)
			_, rest, ok := hpackInt(block, 5)
			if !ok {
				return none
			}
			block = rest
			continue
		case c&0xc0 == 0x40: // literal with incremental indexing (§6.2.1)
			prefix = 6
		default: // literal without indexing, never indexed (§6.2.2, §6.2.3)
			prefix = 4
		}
		idx, rest, ok := hpackInt(block, prefix)
		if !ok {
			return none
		}
		block = rest
		kind := 0 // 1 :authority, 2 host
		switch {
		case idx == 0:
			var name []byte
			var fits bool
			name, block, fits, ok = hpackString(block, nameBuf[:])
			if !ok {
				return none
			}
			if fits && string(name) == ":authority" {
				kind = 1
			} else if fits && string(name) == "host" {
				kind = 2
			}
		case idx == staticAuthority:
			kind = 1
		case idx == staticHost:
			kind = 2
		}
		var dst []byte
		if kind == 1 || kind == 2 && !haveHost {
			dst = valBuf[:]
		}
		value, rest, fits, ok := hpackString(block, dst)
		if !ok {
			return none
		}
		block = rest
		switch {
		case kind == 1:
			if !fits {
				return none
			}
			return authorityResult(value)
		case kind == 2 && !haveHost:
			haveHost, hostFits = true, fits
			host = append(hostBuf[:0], value...)
		}
	}
	if haveHost && hostFits {
		return authorityResult(host)
	}
	return none
}

// authorityResult returns the H2C Result for an :authority or host value.
func authorityResult(a []byte) Result {
	name, ok := authorityHost(a)
	if !ok {
		return Result{Proto: H2C}
	}
	n := hostLen(name)
	if n < 0 {
		return Result{Proto: H2C}
	}
	return newResult(H2C, name, n, nil, false)
}

// hpackInt decodes an integer with an n-bit prefix (RFC 7541 §5.1).
func hpackInt(b []byte, n uint) (v int, rest []byte, ok bool) {
	if len(b) == 0 {
		return 0, nil, false
	}
	limit := 1<<n - 1
	v = int(b[0]) & limit
	if v < limit {
		return v, b[1:], true
	}
	var shift uint
	for i, c := range b[1:] {
		v += int(c&0x7f) << shift
		if c&0x80 == 0 {
			return v, b[2+i:], true
		}
		shift += 7
		if shift > 21 { // far beyond any length a header block can hold
			return 0, nil, false
		}
	}
	return 0, nil, false
}

// hpackString reads a string literal (RFC 7541 §5.2) from the front of b.
// If dst is nil the string is only skipped. Otherwise s is the string, taken
// from b or Huffman-decoded into dst; fits is false if it is longer than dst
// (s is then incomplete). ok is false if b is malformed.
func hpackString(b, dst []byte) (s, rest []byte, fits, ok bool) {
	if len(b) == 0 {
		return nil, nil, false, false
	}
	huff := b[0]&0x80 != 0
	n, b, ok := hpackInt(b, 7)
	if !ok || n > len(b) {
		return nil, nil, false, false
	}
	raw, rest := b[:n], b[n:]
	switch {
	case dst == nil:
		return nil, rest, false, true
	case !huff:
		return raw, rest, len(raw) <= len(dst), true
	}
	m, fits, ok := huffmanDecode(dst, raw)
	return dst[:m], rest, fits, ok
}
