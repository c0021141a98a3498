package upstream

import (
	"context"
	"fmt"
	"net"
	"net/netip"
)

// maxReplyHead bounds a CONNECT reply head; a proxy that sends more without
// ending it is not speaking HTTP.
const maxReplyHead = 16 << 10

// HTTPConnect dials through an HTTP proxy with CONNECT (RFC 9110 §9.3.6).
// It does not speak TLS to the proxy. The protocol itself is Handshake's.
type HTTPConnect struct {
	// Proxy is the proxy's host:port.
	Proxy string
	// User and Password are sent as Basic credentials when User is not
	// empty.
	User, Password string
	// Forward is the template used to reach the proxy: it carries the
	// timeout, which bounds the connect and the handshake together, and the
	// socket-mark Control function. Nil means a zero net.Dialer.
	Forward *net.Dialer
}

// Dial asks the proxy for a tunnel to target and returns the
// connection to the proxy, positioned right after the reply head: bytes the
// proxy sent after it are the tunnel's and are still there to read.
func (h *HTTPConnect) Dial(ctx context.Context, target string, _ netip.AddrPort) (*net.TCPConn, error) {
	hs, err := h.newHandshake()
	if err != nil {
		return nil, proxyError("http connect", h.Proxy, target, err)
	}
	return hs.dialTarget(ctx, 0, target)
}

// errHeadTooLarge is returned for a reply head longer than maxReplyHead.
var errHeadTooLarge = fmt.Errorf("reply head longer than %d bytes", maxReplyHead)

// statusError is a CONNECT reply other than 2xx.
type statusError struct {
	code   int
	status string // "407 Proxy Authentication Required"
}

func (e *statusError) Error() string { return fmt.Sprintf("proxy replied %q", e.status) }

// targetFailure: 502, 503 and 504 are how proxies (squid among them) say the
// destination refused, timed out or could not be resolved.
func (e *statusError) targetFailure() bool {
	return e.code == 502 || e.code == 503 || e.code == 504
}

// requestRefused: any other 4xx but 407 is the proxy refusing this request
// (squid answers 403 for a port or domain its rules deny, 400 for a name
// it finds malformed). The client chose the target, so this must not bench
// the upstream for every other client. 407 (our credentials) and other 5xx
// are the upstream's own failures.
func (e *statusError) requestRefused() bool {
	return e.code/100 == 4 && e.code != 407
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
