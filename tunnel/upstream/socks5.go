package upstream

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// SOCKS5 dials through a SOCKS5 proxy (RFC 1928) with the CONNECT command,
// without authentication or with a user name and password (RFC 1929). It
// does not do GSSAPI, BIND or UDP ASSOCIATE. The protocol itself is
// Handshake's.
type SOCKS5 struct {
	// Proxy is the proxy's host:port.
	Proxy string
	// User and Password are offered (method 0x02, besides 0x00) when User
	// is not empty. Each is at most 255 bytes.
	User, Password string
	// Forward is the template used to reach the proxy: it carries the
	// timeout, which bounds the connect and the handshake together, and the
	// socket-mark Control function. Nil means a zero net.Dialer.
	Forward *net.Dialer
}

// SOCKS5 protocol constants.
const (
	socksVersion        = 0x05
	socksAuthVersion    = 0x01 // RFC 1929 sub-negotiation
	socksNoAuth         = 0x00
	socksUserPass       = 0x02
	socksNoAcceptable   = 0xff
	socksCmdConnect     = 0x01
	socksATYPIPv4       = 0x01
	socksATYPDomain     = 0x03
	socksATYPIPv6       = 0x04
	socksReplySucceeded = 0x00
)

// Dial asks the proxy to connect to target and returns the
// connection to the proxy, positioned right after the reply: bytes the
// proxy sent after it are the tunnel's and are still there to read. A
// hostname is sent as a name (ATYP 0x03) for the proxy to resolve.
func (s *SOCKS5) Dial(ctx context.Context, target string, _ netip.AddrPort) (*net.TCPConn, error) {
	h, err := s.newHandshake()
	if err != nil {
		return nil, proxyError("socks connect", s.Proxy, target, err)
	}
	return h.dialTarget(ctx, socksCmdConnect, target)
}

// socksReplyError is a SOCKS5 reply code other than success.
type socksReplyError byte

func (e socksReplyError) Error() string {
	var msg string
	switch e {
	case 0x01:
		msg = "general SOCKS server failure"
	case 0x02:
		msg = "connection not allowed by ruleset"
	case 0x03:
		msg = "network unreachable"
	case 0x04:
		msg = "host unreachable"
	case 0x05:
		msg = "connection refused"
	case 0x06:
		msg = "TTL expired"
	case 0x07:
		msg = "command not supported"
	case 0x08:
		msg = "address type not supported"
	default:
		msg = "unknown reply code"
	}
	return fmt.Sprintf("proxy replied %s (%#02x)", msg, byte(e))
}

// targetFailure: 0x03–0x06 say the proxy could not reach the destination.
func (e socksReplyError) targetFailure() bool { return 0x03 <= e && e <= 0x06 }

// requestRefused: the proxy works but would not do this request: 0x01
// (microsocks answers it for a name it cannot resolve), 0x02 (its rules
// refuse this destination), 0x08 (it cannot take this kind of address, a
// name for one). Which target a request names is up to the client, so none
// of these may bench the upstream for every other client.
func (e socksReplyError) requestRefused() bool { return e == 0x01 || e == 0x02 || e == 0x08 }
