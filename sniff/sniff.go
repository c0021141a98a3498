// Package sniff learns the hostname a TCP client is asking for from the first
// bytes it sends: the server_name of a TLS ClientHello, the Host (or the
// absolute-form target) of an HTTP/1.x request head, or the :authority of the
// first HEADERS frame of a prior-knowledge h2c connection. For UDP it reads
// the ClientHello inside a QUIC flow's Initial packets (QUICAssembler) and the
// question of a DNS query (DNSQuery).
//
// The parsers (parse, and ParseHTTP and parseTLS behind it) are pure functions over a byte
// slice: they do no I/O, never modify their input, never retain it, and answer
// as soon as the bytes allow — NeedMore while a prefix is still consistent with
// their protocol, Match once they have their answer, NoMatch as soon as the
// bytes cannot be their protocol. Peek is the only function that reads from a
// connection: it reads under a deadline and a byte cap until a parser answers,
// and hands back every byte it read so the caller can replay them upstream.
// SilentCache remembers destinations whose server was seen speaking first
// (SSH, SMTP, …) so later connections need not wait for the deadline; it
// learns only from that evidence, and one source is bounded in what it can
// make it remember.
//
// Sniffing is advisory: nothing here drops, consumes or alters a connection,
// or holds it past the deadline. Whatever the outcome, the caller sends the
// kept bytes on first, and without a host name it carries on by the original
// destination IP. Routing, dialing, metrics and the choice of ports worth
// sniffing (or not: server-first ports) are left to the caller.
//
// Host names are reported normalised: lower case, one trailing dot removed.
// A name is reported only if it is a plausible DNS host name: labels of
// letters, digits, '-' and '_' (underscore is accepted anywhere because real
// names such as "_dmarc.example.com" or "my_host.lan" occur), 1 to 63 bytes
// each, not starting or ending with '-', at most 253 bytes in all. IP
// literals are never reported: the caller already knows the destination
// address, and RFC 6066 forbids them in SNI anyway. A name whose last label is
// numeric (decimal, or 0x-prefixed hex, as inet_aton(3) accepts) counts as an
// IP literal. Where a message carries no acceptable name the parser still
// answers Match with an empty Result.Host, so the protocol remains known.
package sniff

import (
	"fmt"
	"strings"
)

// Proto is the protocol recognised in the first bytes of a connection.
type Proto uint8

// The protocols sniff recognises.
const (
	Unknown Proto = iota // nothing recognised
	TLS                  // a TLS ClientHello
	HTTP                 // an HTTP/1.x request
	H2C                  // HTTP/2 with prior knowledge, in the clear
	QUIC                 // a QUIC Initial carrying a TLS ClientHello (QUICAssembler)
	DNS                  // a DNS query (DNSQuery)
)

// protoNames are the names of the protocols, by value.
var protoNames = [...]string{Unknown: "unknown", TLS: "tls", HTTP: "http", H2C: "h2c", QUIC: "quic", DNS: "dns"}

// String returns "unknown", "tls", "http", "h2c", "quic" or "dns".
func (p Proto) String() string {
	if int(p) < len(protoNames) {
		return protoNames[p]
	}
	return "unknown"
}

// ParseProto is String's inverse: "unknown", "tls", "http", "h2c", "quic"
// or "dns" (the names routing rules use).
func ParseProto(s string) (Proto, error) {
	for p, n := range protoNames {
		if s == n {
			return Proto(p), nil
		}
	}
	return 0, fmt.Errorf("%q is not tls, http, h2c, quic, dns or unknown", s)
}

// Status is a parser's answer about the bytes it was given.
type Status uint8

// A parser's answers.
const (
	// NeedMore: the bytes so far are a consistent prefix of the protocol;
	// call again with more.
	NeedMore Status = iota
	// Match: the bytes are this protocol and the parser has its answer in
	// the Result (whose Host may still be empty: no name, an IP literal, an
	// invalid name, or a malformed message). More bytes would not change it.
	Match
	// NoMatch: the bytes are not this protocol. More bytes would not change
	// it. The Result is zero.
	NoMatch
)

// String returns "need-more", "match" or "no-match".
func (s Status) String() string {
	switch s {
	case NeedMore:
		return "need-more"
	case Match:
		return "match"
	}
	return "no-match"
}

// Result is what a parser learned. The zero Result means nothing was learned.
// Results are comparable with ==.
type Result struct {
	Proto Proto  // the protocol recognised; Unknown if none
	Host  string // the normalised host name, or "" if there is none to use
	// ECH is set when a ClientHello carries an encrypted_client_hello
	// extension (0xfe0d). Host is then the outer, public name. Clients send
	// the extension as GREASE too (Chrome does by default), so ECH means "the
	// real name may be hidden", not "it is".
	ECH bool
	// ViaProxy is set for an HTTP request addressed to a forward proxy
	// (CONNECT, or an absolute-form target): Host is then the proxy's next
	// hop, not the destination the client connected to.
	ViaProxy bool

	// alpn holds the ALPN protocol_name_list of a ClientHello as sent on the
	// wire (each name prefixed by its one-byte length), already validated.
	alpn string
}

// ALPN returns the protocols a TLS client offered in its
// application_layer_protocol_negotiation extension, in the client's order,
// or nil. The names are kept in wire form inside the Result and materialised
// here, so parsing itself does not allocate a slice; each call allocates a
// new one.
func (r Result) ALPN() []string {
	if r.alpn == "" {
		return nil
	}
	n := 0
	for s := r.alpn; len(s) > 0; s = s[1+int(s[0]):] {
		n++
	}
	out := make([]string, 0, n)
	for s := r.alpn; len(s) > 0; s = s[1+int(s[0]):] {
		out = append(out, s[1:1+int(s[0])])
	}
	return out
}

// OffersALPN reports whether the client offered the ALPN protocol p.
// It does not allocate.
func (r Result) OffersALPN(p string) bool {
	for s := r.alpn; len(s) > 0; s = s[1+int(s[0]):] {
		if s[1:1+int(s[0])] == p {
			return true
		}
	}
	return false
}

// parse recognises the protocol from the first byte and hands b to parseTLS
// (0x16, a TLS handshake record) or to ParseHTTP (anything else; it answers
// NoMatch at the first byte that cannot start an HTTP request). For
// NeedMore it also returns a lower bound on the length b must reach before
// another call can make progress (Peek grows its buffer by it).
func parse(b []byte) (Result, Status, int) {
	if len(b) == 0 {
		return Result{}, NeedMore, 1
	}
	if b[0] == recordTypeHandshake {
		return parseTLS(b)
	}
	r, st := ParseHTTP(b)
	return r, st, len(b) + 1
}

// newResult builds a Result whose Host is the normalised form of host (which
// must have passed hostLen, giving n) and whose ALPN list is alpn, in one
// allocation.
func newResult(p Proto, host []byte, n int, alpn []byte, ech bool) Result {
	r := Result{Proto: p, ECH: ech}
	if n+len(alpn) == 0 {
		return r
	}
	var sb strings.Builder
	sb.Grow(n + len(alpn))
	for _, c := range host[:n] {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		sb.WriteByte(c)
	}
	sb.Write(alpn)
	s := sb.String()
	r.Host, r.alpn = s[:n], s[n:]
	return r
}

// hostLen checks that name is an acceptable host name (see the package
// comment) and returns its length once a trailing dot is dropped, or -1.
func hostLen(name []byte) int {
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) == 0 || len(name) > 253 {
		return -1
	}
	label, last := 0, 0 // length of the current label, start of the last one
	for i, c := range name {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '_':
		case c == '-':
			if label == 0 {
				return -1
			}
		case c == '.':
			if label == 0 || name[i-1] == '-' {
				return -1
			}
			label, last = 0, i+1
			continue
		default:
			return -1
		}
		label++
		if label > 63 {
			return -1
		}
	}
	if label == 0 || name[len(name)-1] == '-' || numeric(name[last:]) {
		return -1
	}
	return len(name)
}

// numeric reports whether label reads as a number to inet_aton(3): decimal
// digits, or "0x" and hex digits. A name ending in such a label is an IP
// address literal (or would be taken for one by a resolver), not a host name.
func numeric(label []byte) bool {
	if len(label) >= 2 && label[0] == '0' && (label[1] == 'x' || label[1] == 'X') {
		for _, c := range label[2:] {
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
				return false
			}
		}
		return true
	}
	for _, c := range label {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
