// Package proxyport speaks the protocols of detour's explicit proxy port,
// all on one port: it recognises the protocol from the client's first byte
// (Detect), reads HTTP/1.1 forward-proxy request heads and rewrites them for
// the next hop (ReadRequest, Request.WriteHead), frames and streams bodies
// (CopyBody), reads response heads (ReadResponse), and runs the server side
// of the SOCKS5 (RFC 1928, RFC 1929) and SOCKS4a handshakes (ReadSOCKS).
//
// It only parses and writes bytes on the readers and writers it is given:
// it never dials, routes, resolves names or sets deadlines. Package tunnel
// does that, and bounds every read with a deadline. Every read is bounded
// in size: a head larger than Limits allows is an error with the HTTP status
// to answer, never a growing buffer.
package proxyport

import "fmt"

// Kind is the protocol a client speaks, as recognised from its first byte.
type Kind uint8

const (
	Unknown Kind = iota
	HTTP         // an HTTP/1.x request line: the first byte is a method's letter
	SOCKS5       // 0x05
	SOCKS4       // 0x04 (SOCKS4 and SOCKS4a)
)

func (k Kind) String() string {
	switch k {
	case HTTP:
		return "http"
	case SOCKS5:
		return "socks5"
	case SOCKS4:
		return "socks4"
	}
	return "unknown"
}

// Detect names the protocol whose message starts with b. HTTP methods are
// tokens (RFC 9110 §9.1); every registered one starts with an upper-case
// letter, and so does anything a proxy client sends, so only those count.
func Detect(b byte) Kind {
	switch {
	case b == 0x05:
		return SOCKS5
	case b == 0x04:
		return SOCKS4
	case 'A' <= b && b <= 'Z':
		return HTTP
	}
	return Unknown
}

// BadFirstByte is the error for a first byte Detect does not know.
type BadFirstByte byte

func (b BadFirstByte) Error() string {
	return fmt.Sprintf("first byte 0x%02x is not HTTP (a method's letter), SOCKS5 (0x05) or SOCKS4 (0x04)", byte(b))
}
