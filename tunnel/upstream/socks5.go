package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// SOCKS5 dials through a SOCKS5 proxy (RFC 1928) with the CONNECT command,
// without authentication or with a user name and password (RFC 1929). It
// does not do GSSAPI, BIND or UDP ASSOCIATE.
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
	fail := func(err error) error { return proxyError("socks connect", s.Proxy, target, err) }
	t, err := parseTarget(target)
	if err != nil {
		return nil, fail(err)
	}
	req, err := socksRequest(t)
	if err != nil {
		return nil, fail(err)
	}
	if len(s.User) > 255 {
		return nil, fail(errors.New("user name longer than 255 bytes"))
	}
	if len(s.Password) > 255 {
		return nil, fail(errors.New("password longer than 255 bytes"))
	}
	return dialProxy(ctx, "socks connect", s.Forward, s.Proxy, target, func(c *net.TCPConn) error {
		return s.handshake(c, req)
	})
}

// prepare connects to the proxy and negotiates the method (and
// authenticates): everything before the request, which names the target.
func (s *SOCKS5) prepare(ctx context.Context) (*net.TCPConn, error) {
	if len(s.User) > 255 || len(s.Password) > 255 {
		return nil, proxyError("socks connect", s.Proxy, "", errors.New("user name or password longer than 255 bytes"))
	}
	return dialProxy(ctx, "socks connect", s.Forward, s.Proxy, "", s.negotiate)
}

// request asks the proxy, on a connection prepare made, to connect to
// target, and reads the reply.
func (s *SOCKS5) request(ctx context.Context, c *net.TCPConn, target string) error {
	fail := func(err error) error { return proxyError("socks connect", s.Proxy, target, err) }
	t, err := parseTarget(target)
	if err != nil {
		return fail(err)
	}
	req, err := socksRequest(t)
	if err != nil {
		return fail(err)
	}
	err = exchange(ctx, forwardOf(s.Forward), time.Now(), c, func(c *net.TCPConn) error {
		if _, err := c.Write(req); err != nil {
			return err
		}
		return readReply(c, nil)
	})
	if err != nil {
		return fail(err)
	}
	return nil
}

// socksRequest is the CONNECT request for t.
func socksRequest(t target) ([]byte, error) {
	req := make([]byte, 0, 6+256)
	req = append(req, socksVersion, socksCmdConnect, 0)
	switch {
	case t.ip.Is4():
		a := t.ip.As4()
		req = append(req, socksATYPIPv4)
		req = append(req, a[:]...)
	case t.ip.Is6():
		a := t.ip.As16()
		req = append(req, socksATYPIPv6)
		req = append(req, a[:]...)
	default:
		if len(t.host) > 255 {
			return nil, fmt.Errorf("host name longer than 255 bytes (%d)", len(t.host))
		}
		req = append(req, socksATYPDomain, byte(len(t.host)))
		req = append(req, t.host...)
	}
	return append(req, byte(t.port>>8), byte(t.port)), nil
}

// handshake negotiates the method, authenticates if asked, sends req and
// reads the reply exactly, by its structure.
func (s *SOCKS5) handshake(c *net.TCPConn, req []byte) error {
	return s.handshakeBound(c, req, nil)
}

// handshakeBound is handshake that also returns the reply's BND.ADDR and
// BND.PORT in bound, when not nil (a domain BND.ADDR leaves the address
// zero).
func (s *SOCKS5) handshakeBound(c *net.TCPConn, req []byte, bound *netip.AddrPort) error {
	if err := s.negotiate(c); err != nil {
		return err
	}
	if _, err := c.Write(req); err != nil {
		return err
	}
	return readReply(c, bound)
}

// negotiate offers no authentication, and user/password when s has a user,
// and authenticates if the proxy picks it.
func (s *SOCKS5) negotiate(c *net.TCPConn) error {
	var buf [2]byte
	greeting := []byte{socksVersion, 1, socksNoAuth}
	if s.User != "" {
		greeting = []byte{socksVersion, 2, socksNoAuth, socksUserPass}
	}
	if _, err := c.Write(greeting); err != nil {
		return err
	}
	if err := readFull(c, buf[:], "method selection"); err != nil {
		return err
	}
	if buf[0] != socksVersion {
		return fmt.Errorf("method selection has version %#02x, want 0x05", buf[0])
	}
	switch m := buf[1]; {
	case m == socksNoAuth:
		return nil
	case m == socksUserPass && s.User != "":
		return s.authenticate(c)
	case m == socksNoAcceptable:
		return errors.New("no acceptable authentication method")
	default:
		return fmt.Errorf("proxy chose authentication method %#02x, which was not offered", m)
	}
}

// authenticate sends the user name and password (RFC 1929).
func (s *SOCKS5) authenticate(c *net.TCPConn) error {
	var buf [2]byte
	auth := make([]byte, 0, 3+len(s.User)+len(s.Password))
	auth = append(auth, socksAuthVersion, byte(len(s.User)))
	auth = append(auth, s.User...)
	auth = append(auth, byte(len(s.Password)))
	auth = append(auth, s.Password...)
	if _, err := c.Write(auth); err != nil {
		return err
	}
	if err := readFull(c, buf[:], "authentication reply"); err != nil {
		return err
	}
	if buf[0] != socksAuthVersion {
		return fmt.Errorf("authentication reply has version %#02x, want 0x01", buf[0])
	}
	if buf[1] != 0 {
		return errors.New("username/password rejected")
	}
	return nil
}

// readReply reads the reply to a request: VER REP RSV ATYP, then BND.ADDR
// and BND.PORT, whose length ATYP gives; those go to bound if not nil.
func readReply(c *net.TCPConn, bound *netip.AddrPort) error {
	var buf [2 + 255]byte
	if err := readFull(c, buf[:4], "reply"); err != nil {
		return err
	}
	if buf[0] != socksVersion {
		return fmt.Errorf("reply has version %#02x, want 0x05", buf[0])
	}
	if buf[1] != socksReplySucceeded {
		return socksReplyError(buf[1])
	}
	var rest int
	switch buf[3] {
	case socksATYPIPv4:
		rest = 4 + 2
	case socksATYPIPv6:
		rest = 16 + 2
	case socksATYPDomain:
		if err := readFull(c, buf[:1], "reply"); err != nil {
			return err
		}
		rest = int(buf[0]) + 2
	default:
		return fmt.Errorf("reply has unknown address type %#02x", buf[3])
	}
	atyp := buf[3]
	if err := readFull(c, buf[:rest], "reply"); err != nil {
		return err
	}
	if bound != nil {
		port := uint16(buf[rest-2])<<8 | uint16(buf[rest-1])
		switch atyp {
		case socksATYPIPv4:
			*bound = netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[:4])), port)
		case socksATYPIPv6:
			*bound = netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[:16])).Unmap(), port)
		default:
			*bound = netip.AddrPortFrom(netip.Addr{}, port)
		}
	}
	return nil
}

// readFull reads exactly len(p) bytes of what; an EOF anywhere in it is
// unexpected.
func readFull(c *net.TCPConn, p []byte, what string) error {
	if _, err := io.ReadFull(c, p); err != nil {
		return readError(what, err)
	}
	return nil
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
