package upstream

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"
)

// maxReplyHead bounds a CONNECT reply head; a proxy that sends more without
// ending it is not speaking HTTP.
const maxReplyHead = 16 << 10

// HTTPConnect dials through an HTTP proxy with CONNECT (RFC 9110 §9.3.6).
// It does not speak TLS to the proxy.
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
	req, err := h.connectRequest(target)
	if err != nil {
		return nil, err
	}
	return dialProxy(ctx, "http connect", h.Forward, h.Proxy, target, func(c *net.TCPConn) error {
		return connectExchange(c, req)
	})
}

// connectRequest is the CONNECT request head for target.
func (h *HTTPConnect) connectRequest(target string) (string, error) {
	fail := func(err error) error { return proxyError("http connect", h.Proxy, target, err) }
	t, err := parseTarget(target)
	if err != nil {
		return "", fail(err)
	}
	if strings.IndexByte(h.User, ':') >= 0 {
		return "", fail(errors.New("user name contains ':', which Basic credentials cannot carry"))
	}
	authority := t.authority()
	var b strings.Builder
	b.WriteString("CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n")
	if h.User != "" {
		b.WriteString("Proxy-Authorization: Basic ")
		b.WriteString(base64.StdEncoding.EncodeToString([]byte(h.User + ":" + h.Password)))
		b.WriteString("\r\n")
	}
	b.WriteString("\r\n")
	return b.String(), nil
}

// connectExchange writes the request head and reads the reply head.
func connectExchange(c *net.TCPConn, req string) error {
	if _, err := io.WriteString(c, req); err != nil {
		return err
	}
	head, err := readHead(c, maxReplyHead)
	if err != nil {
		return readError("reply", err)
	}
	return checkStatus(head)
}

// prepare opens the TCP connection to the proxy: a CONNECT request is all
// there is to its handshake, and it names the target.
func (h *HTTPConnect) prepare(ctx context.Context) (*net.TCPConn, error) {
	if h.Proxy == "" {
		return nil, proxyError("http connect", h.Proxy, "", errors.New("no proxy address"))
	}
	c, err := connectProxy(ctx, forwardOf(h.Forward), h.Proxy, time.Now())
	if err != nil {
		return nil, proxyError("http connect", h.Proxy, "", err)
	}
	return c, nil
}

// request asks the proxy, on a connection prepare made, for a tunnel to
// target.
func (h *HTTPConnect) request(ctx context.Context, c *net.TCPConn, target string) error {
	req, err := h.connectRequest(target)
	if err != nil {
		return err
	}
	err = exchange(ctx, forwardOf(h.Forward), time.Now(), c, func(c *net.TCPConn) error {
		return connectExchange(c, req)
	})
	if err != nil {
		return proxyError("http connect", h.Proxy, target, err)
	}
	return nil
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

// checkStatus parses the status line of head ("HTTP/1.x NNN reason") and
// returns nil for 2xx. The header fields are not needed: a 2xx reply to
// CONNECT has no content.
func checkStatus(head []byte) error {
	line, _, _ := bytes.Cut(head, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	ok := len(line) >= 12 && bytes.HasPrefix(line, []byte("HTTP/1.")) &&
		isDigit(line[7]) && line[8] == ' ' &&
		isDigit(line[9]) && isDigit(line[10]) && isDigit(line[11]) &&
		(len(line) == 12 || line[12] == ' ')
	if !ok {
		if len(line) > 64 {
			line = line[:64]
		}
		return fmt.Errorf("malformed reply status line %q", line)
	}
	code := int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if code/100 == 2 {
		return nil
	}
	return &statusError{code: code, status: string(bytes.TrimSpace(line[9:]))}
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// headEnd returns the length of the head in b (through the first empty
// line, ended by CRLF or a bare LF), or -1 if b does not hold all of it.
// Bytes before from were searched already and hold no end.
func headEnd(b []byte, from int) int {
	for i := max(0, from-2); i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		if i+1 < len(b) && b[i+1] == '\n' {
			return i + 2
		}
		if i+2 < len(b) && b[i+1] == '\r' && b[i+2] == '\n' {
			return i + 3
		}
	}
	return -1
}
