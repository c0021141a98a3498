package sniff

import "bytes"

// h2Preface is the client connection preface of HTTP/2 (RFC 9113 §3.4).
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// maxMethodLen bounds the request method, so that a stream of token bytes
// that never reaches a space is not taken for a request line for long. The
// longest registered method, UPDATEREDIRECTREF, has 17 bytes.
const maxMethodLen = 24

// ParseHTTP reads an HTTP/1.x request head (RFC 9112) from the start of b, or
// the HTTP/2 prior-knowledge preface (RFC 9113 §3.4) and the first HEADERS
// frame after it.
//
// The request line must be method SP request-target SP "HTTP/1." DIGIT. The
// method may be any token of upper-case letters, digits, '-' and '_' (every
// method in the IANA registry is upper case): a client whose first bytes are
// a lower-case word is some other protocol, and is told apart at once instead
// of after the sniff timeout. Lines may end in CRLF or a bare LF (RFC 9112 §2.2).
// ParseHTTP answers NoMatch at the first byte that cannot belong to such a
// request line, and Match once the empty line ending the head has arrived
// (so that a second Host line is not missed). The host is taken from the
// authority-form target of CONNECT, from an absolute-form target (RFC 9112
// §3.2.2: it wins over Host), and otherwise from the single Host field.
// There is no host when Host is missing (as HTTP/1.0 allows), repeated,
// empty, folded onto a continuation line, or not host [":" port]; when the
// target's authority has userinfo (an error per RFC 9110 §4.2.4); when the
// name is an IP literal ("[2001:db8::1]:8080", "192.0.2.1"); or when a
// header line is malformed (then ParseHTTP answers as soon as it sees the
// bad line). Ports are stripped.
//
// Note that absolute-form and CONNECT requests are meant for a forward proxy:
// the host they name is the final target, which is not the host of the
// destination the client connected to.
//
// For h2c the Result has Proto H2C and the host from the :authority
// pseudo-header (or else the host header) of the first HEADERS frame,
// HPACK-decoded (RFC 7541, Huffman coding included); SETTINGS and other
// frames before it are skipped. ParseHTTP answers Match with an empty Host if
// the frames or the header block are malformed.
//
// ParseHTTP allocates once, for the host name it reports, and once more for
// an h2c header block over 4 KiB split into CONTINUATION frames. Otherwise it
// does not allocate.
func ParseHTTP(b []byte) (Result, Status) {
	if len(b) > 0 && b[0] == 'P' {
		if len(b) < len(h2Preface) {
			if string(b) == h2Preface[:len(b)] {
				return Result{}, NeedMore
			}
		} else if string(b[:len(h2Preface)]) == h2Preface {
			return parseH2C(b[len(h2Preface):])
		}
	}

	// Request line.
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		if !requestLinePrefixOK(b) {
			return Result{}, NoMatch
		}
		return Result{}, NeedMore
	}
	method, target, ok := requestLine(trimCR(b[:i]))
	if !ok {
		return Result{}, NoMatch
	}
	rest := b[i+1:]

	// Header fields, up to the empty line.
	var (
		host     []byte
		hosts    int
		prevHost bool // the previous field line was Host
		bad      bool // a line we cannot trust: no host
	)
	for {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			return Result{}, NeedMore
		}
		line := trimCR(rest[:i])
		rest = rest[i+1:]
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			// obs-fold (RFC 9112 §5.2): a continuation of the previous
			// line. Harmless unless it continues Host.
			if prevHost {
				bad = true
			}
			continue
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 || !isToken(line[:colon]) {
			return Result{Proto: HTTP}, Match
		}
		prevHost = colon == 4 && asciiEqualFold(line[:4], "host")
		if prevHost {
			hosts++
			host = trimOWS(line[colon+1:])
		}
	}

	var name []byte
	viaProxy := false
	switch {
	case string(method) == "CONNECT":
		viaProxy = true
		name, ok = authorityHost(target)
	case isAbsoluteForm(target):
		viaProxy = true
		name, ok = absoluteAuthority(target)
		if ok {
			name, ok = authorityHost(name)
		}
	default:
		ok = hosts == 1 && !bad
		if ok {
			name, ok = authorityHost(host)
		}
	}
	if !ok {
		return Result{Proto: HTTP, ViaProxy: viaProxy}, Match
	}
	n := hostLen(name)
	if n < 0 {
		return Result{Proto: HTTP, ViaProxy: viaProxy}, Match
	}
	r := newResult(HTTP, name, n, nil, false)
	r.ViaProxy = viaProxy
	return r, Match
}

// requestLine splits an HTTP/1.x request line (RFC 9112 §3).
func requestLine(line []byte) (method, target []byte, ok bool) {
	sp := bytes.IndexByte(line, ' ')
	if sp <= 0 || sp > maxMethodLen || !isMethod(line[:sp]) {
		return nil, nil, false
	}
	method, line = line[:sp], line[sp+1:]
	sp = bytes.IndexByte(line, ' ')
	if sp <= 0 {
		return nil, nil, false
	}
	target, line = line[:sp], line[sp+1:]
	for _, c := range target {
		if c <= ' ' || c == 0x7f {
			return nil, nil, false
		}
	}
	if len(line) != len("HTTP/1.1") || string(line[:7]) != "HTTP/1." || line[7] < '0' || line[7] > '9' {
		return nil, nil, false
	}
	return method, target, true
}

// requestLinePrefixOK reports whether b, which holds no line feed, could be
// the start of an HTTP/1.x request line.
func requestLinePrefixOK(b []byte) bool {
	sp := bytes.IndexByte(b, ' ')
	if sp < 0 {
		return len(b) == 0 || len(b) <= maxMethodLen && isMethod(b)
	}
	if sp == 0 || sp > maxMethodLen || !isMethod(b[:sp]) {
		return false
	}
	b = b[sp+1:]
	sp = bytes.IndexByte(b, ' ')
	target := b
	if sp >= 0 {
		target = b[:sp]
	}
	for _, c := range target {
		if c < ' ' || c == 0x7f {
			return false
		}
	}
	if sp < 0 {
		return true
	}
	if sp == 0 {
		return false
	}
	v := trimCR(b[sp+1:])
	if len(v) < len(b[sp+1:]) && len(v) != len("HTTP/1.1") {
		return false // a CR that does not follow a complete version
	}
	const proto = "HTTP/1.1"
	for i, c := range v {
		switch {
		case i >= len(proto):
			return false
		case i == len(proto)-1:
			if c < '0' || c > '9' {
				return false
			}
		case c != proto[i]:
			return false
		}
	}
	return true
}

// isAbsoluteForm reports whether target starts with a URI scheme and a colon
// (RFC 3986 §3.1), as an absolute-form request target does.
func isAbsoluteForm(target []byte) bool {
	for i, c := range target {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case i > 0 && ('0' <= c && c <= '9' || c == '+' || c == '-' || c == '.'):
		case i > 0 && c == ':':
			return true
		default:
			return false
		}
	}
	return false
}

// absoluteAuthority returns the authority of an absolute URI (RFC 3986
// §3.2, which ends it at "/", "?" or "#"; an absolute-URI has no fragment,
// so a "#" stays in and makes the host invalid). ok is false if the URI has
// no authority.
func absoluteAuthority(uri []byte) ([]byte, bool) {
	i := bytes.IndexByte(uri, ':')
	rest := uri[i+1:]
	if len(rest) < 2 || rest[0] != '/' || rest[1] != '/' {
		return nil, false
	}
	rest = rest[2:]
	if end := bytes.IndexAny(rest, "/?"); end >= 0 {
		rest = rest[:end]
	}
	return rest, true
}

// authorityHost returns the host of host [":" port], as Host carries it (RFC
// 9110 §7.2). ok is false if a is not of that form or names an IP literal.
func authorityHost(a []byte) (host []byte, ok bool) {
	if len(a) > 0 && a[0] == '[' {
		return nil, false // IP-literal (RFC 3986 §3.2.2)
	}
	host = a
	if i := bytes.IndexByte(a, ':'); i >= 0 {
		host = a[:i]
		port := a[i+1:]
		if len(port) > 5 {
			return nil, false
		}
		for _, c := range port {
			if c < '0' || c > '9' {
				return nil, false
			}
		}
	}
	return host, len(host) > 0
}

// isMethod reports whether b is a plausible request method: a non-empty run
// of upper-case letters, digits, '-' and '_'.
func isMethod(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if !('A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// isToken reports whether b is a non-empty token (RFC 9110 §5.6.2).
func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if !tchar(c) {
			return false
		}
	}
	return true
}

// tchar reports whether c may appear in a token.
func tchar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
		return true
	}
	return false
}

// asciiEqualFold reports whether b equals the lower-case ASCII string s,
// ignoring case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}

// trimCR drops one trailing carriage return.
func trimCR(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\r' {
		return b[:n-1]
	}
	return b
}

// trimOWS drops optional whitespace (SP, HTAB) around a field value.
func trimOWS(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}
