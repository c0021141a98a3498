package upstream

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Handshake is the client side of one connection's proxy handshake, SOCKS5
// (RFC 1928/1929, CONNECT) or HTTP CONNECT, as a state machine that does no
// I/O: the caller moves the bytes between it and the socket. The blocking
// dialers run it on a *net.TCPConn; an event loop runs it on a
// non-blocking socket. It allocates nothing but its errors.
//
// After the TCP connection to the proxy is up:
//
//  1. send Out(buf) (SOCKS5: the method greeting; HTTP CONNECT: nothing);
//  2. while Need() > 0: read, Feed what came, send Out(buf) if it is not
//     empty (SOCKS5: the credentials, when the proxy chose user/password);
//  3. once Prepared(), whenever the target is known: send Request(buf, target);
//  4. while Need() > 0: read and Feed, until Done(). The bytes after the
//     ones Feed consumed are the tunnel's: the server's first bytes.
//
// Steps 1–2 do not name the target, so they may run before it is known.
// Errors are *net.OpError{Op: "socks connect" or "http connect", Source:
// the proxy, Addr: the target (once requested)}, classified as the
// blocking dialers' are: Group.Report knows which bench the upstream.
//
// The zero value is not usable: take one from Upstream.Handshake. Use it
// by pointer once taken; it is 120 bytes.
type Handshake struct {
	socks  *SOCKS5
	http   *HTTPConnect
	target string // what Request asked for, for errors

	state hsState
	atyp  byte   // SOCKS5: the reply's address type
	want  uint16 // SOCKS5: length of the message part being read
	have  uint16 // SOCKS5: how much of it has come
	skip  uint16 // SOCKS5: leading bytes of the part not kept (a bound name)

	headLen int32 // HTTP: bytes of the reply head so far
	lineLen int32 // HTTP: bytes of its status line so far (kept: the first len(buf))
	nl      uint8 // HTTP: 1 after "\n", 2 after "\n\r": where an empty line may end
	lineEnd bool  // HTTP: the status line is complete (and was 2xx)

	buf [64]byte // the part being read; HTTP: the status line's start
}

type hsState uint8

const (
	hsGreet     hsState = iota // SOCKS5: the greeting is to be sent
	hsMethod                   // SOCKS5: awaiting the method selection
	hsAuth                     // SOCKS5: the credentials are to be sent
	hsAuthReply                // SOCKS5: awaiting the authentication reply
	hsPrepared                 // awaiting Request
	hsReply                    // SOCKS5: awaiting VER REP RSV ATYP
	hsReplyLen                 // SOCKS5: awaiting the bound name's length
	hsReplyAddr                // SOCKS5: awaiting BND.ADDR BND.PORT
	hsHead                     // HTTP: awaiting the reply head
	hsDone                     // the tunnel is up
	hsFailed                   // an error was returned
)

// Handshake starts the handshake of a new connection through u; false for
// a direct member, or a dialer that cannot run it without blocking (one
// not of this package, or one whose proxy address or credentials are
// unusable): then dial through the Group as usual.
func (u *Upstream) Handshake() (Handshake, bool) {
	var h Handshake
	var err error
	switch d := u.Dialer.(type) {
	case *SOCKS5:
		h, err = d.newHandshake()
	case *HTTPConnect:
		h, err = d.newHandshake()
	default:
		return Handshake{}, false
	}
	return h, err == nil && h.proxy() != ""
}

// ProxyAddr is the TCP address of u's proxy, for a caller that connects
// the socket itself: false for a direct member, a dialer not of this
// package, or a proxy named by a host name (resolving it would block: dial
// through the Group instead). The socket mark and the timeouts are the
// proxy dialer's Forward template's.
func (u *Upstream) ProxyAddr() (netip.AddrPort, bool) {
	var proxy string
	switch d := u.Dialer.(type) {
	case *SOCKS5:
		proxy = d.Proxy
	case *HTTPConnect:
		proxy = d.Proxy
	default:
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(proxy)
	if err != nil || ap.Port() == 0 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

func (s *SOCKS5) newHandshake() (Handshake, error) {
	if len(s.User) > 255 {
		return Handshake{}, errors.New("user name longer than 255 bytes")
	}
	if len(s.Password) > 255 {
		return Handshake{}, errors.New("password longer than 255 bytes")
	}
	return Handshake{socks: s, state: hsGreet}, nil
}

func (h *HTTPConnect) newHandshake() (Handshake, error) {
	if strings.IndexByte(h.User, ':') >= 0 {
		return Handshake{}, errors.New("user name contains ':', which Basic credentials cannot carry")
	}
	return Handshake{http: h, state: hsPrepared}, nil
}

// Out appends to dst what is to be sent to the proxy now and returns it:
// the SOCKS5 greeting right after the connect, the RFC 1929 credentials
// after the proxy chose them; otherwise nothing. Once returned, the bytes
// count as sent: send all of them before feeding the answer.
func (h *Handshake) Out(dst []byte) []byte {
	switch h.state {
	case hsGreet:
		h.expect(hsMethod, 2, 0)
		if h.socks.User != "" {
			return append(dst, socksVersion, 2, socksNoAuth, socksUserPass)
		}
		return append(dst, socksVersion, 1, socksNoAuth)
	case hsAuth:
		h.expect(hsAuthReply, 2, 0)
		s := h.socks
		dst = append(dst, socksAuthVersion, byte(len(s.User)))
		dst = append(dst, s.User...)
		dst = append(dst, byte(len(s.Password)))
		return append(dst, s.Password...)
	}
	return dst
}

// Need is how many bytes the handshake waits for from the proxy: at least
// one while it does, zero while it waits for the caller (to send Out or
// Request) or is over. For SOCKS5 it is exactly the rest of the message
// part being read, so reading no more than Need never reads the tunnel's
// bytes; an HTTP reply head has no length to know.
func (h *Handshake) Need() int {
	switch h.state {
	case hsMethod, hsAuthReply, hsReply, hsReplyLen, hsReplyAddr:
		return int(h.want - h.have)
	case hsHead:
		return 1
	}
	return 0
}

// Prepared reports whether the part of the handshake that does not name
// the target is over: Request may be called.
func (h *Handshake) Prepared() bool { return h.state == hsPrepared }

// Done reports whether the proxy's reply was read and the tunnel is up.
func (h *Handshake) Done() bool { return h.state == hsDone }

// Bound is the address the SOCKS5 proxy replied with (BND.ADDR and
// BND.PORT; a name leaves the address zero), once Done; zero for HTTP.
func (h *Handshake) Bound() netip.AddrPort {
	if h.state != hsDone || h.socks == nil {
		return netip.AddrPort{}
	}
	switch h.atyp {
	case socksATYPIPv4:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(h.buf[:4])), uint16(h.buf[4])<<8|uint16(h.buf[5]))
	case socksATYPIPv6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(h.buf[:16])).Unmap(), uint16(h.buf[16])<<8|uint16(h.buf[17]))
	}
	return netip.AddrPortFrom(netip.Addr{}, uint16(h.buf[0])<<8|uint16(h.buf[1]))
}

// Request appends to dst the request for target ("host:port", host a name
// or an IP literal, as Dialer takes it) and returns it; call it once,
// when Prepared. An error (a target that cannot be asked for) leaves the
// handshake where it was.
func (h *Handshake) Request(dst []byte, target string) ([]byte, error) {
	out, err := h.request(dst, socksCmdConnect, target)
	if err != nil {
		return dst, h.wrap(target, err)
	}
	return out, nil
}

// request is Request with the SOCKS5 command to send, and its error bare.
func (h *Handshake) request(dst []byte, cmd byte, address string) ([]byte, error) {
	if h.state != hsPrepared {
		return dst, errors.New("request before the handshake was prepared")
	}
	t, err := parseTarget(address)
	if err != nil {
		return dst, err
	}
	if dst, err = h.appendRequest(dst, cmd, t); err != nil {
		return dst, err
	}
	h.requested(address)
	return dst, nil
}

// appendRequest appends the request for t (with cmd, for SOCKS5).
func (h *Handshake) appendRequest(dst []byte, cmd byte, t target) ([]byte, error) {
	if h.socks != nil {
		return appendSocksRequest(dst, cmd, t)
	}
	return h.http.appendConnect(dst, t), nil
}

// requested moves on to the reply, once the request for address is made.
func (h *Handshake) requested(address string) {
	h.target = address
	if h.socks != nil {
		h.expect(hsReply, 4, 0)
	} else {
		h.state = hsHead
	}
}

// Feed takes bytes received from the proxy and returns how many it
// consumed: all of p, unless the reply ended inside it (then Done, and
// p[n:] is the tunnel's) or it failed. Bytes the proxy sends out of turn
// (before the request, or before the caller sent Out) are an error.
func (h *Handshake) Feed(p []byte) (int, error) {
	n, err := h.feed(p)
	if err != nil {
		return n, h.wrap(h.target, err)
	}
	return n, nil
}

// ReadError is the error to report when reading from the proxy failed
// during the handshake: err, or io.EOF when the proxy closed the
// connection (which the handshake did not expect).
func (h *Handshake) ReadError(err error) error {
	return h.wrap(h.target, readError(h.reading(), err))
}

// reading names what the handshake was reading, for errors.
func (h *Handshake) reading() string {
	switch h.state {
	case hsMethod, hsGreet:
		return "method selection"
	case hsAuthReply, hsAuth:
		return "authentication reply"
	}
	return "reply"
}

// wrap is err as the blocking dialers return it.
func (h *Handshake) wrap(target string, err error) error {
	if h.socks != nil {
		return proxyError("socks connect", h.socks.Proxy, target, err)
	}
	return proxyError("http connect", h.http.Proxy, target, err)
}

// feed is Feed with its errors bare.
func (h *Handshake) feed(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		switch h.state {
		case hsDone:
			return n, nil
		case hsHead:
			k, err := h.feedHead(p[n:])
			n += k
			if err != nil {
				h.state = hsFailed
				return n, err
			}
		case hsMethod, hsAuthReply, hsReply, hsReplyLen, hsReplyAddr:
			n += h.fill(p[n:])
			if h.have < h.want {
				return n, nil
			}
			if err := h.socksPart(); err != nil {
				h.state = hsFailed
				return n, err
			}
		case hsFailed:
			return n, errors.New("the handshake failed already")
		default:
			h.state = hsFailed
			return n, fmt.Errorf("proxy sent %d bytes out of turn", len(p)-n)
		}
	}
	return n, nil
}

// expect moves to state, which reads a message part of want bytes whose
// first skip are not kept.
func (h *Handshake) expect(state hsState, want, skip uint16) {
	h.state, h.want, h.have, h.skip = state, want, 0, skip
}

// fill copies what it can of p into the part being read, and returns how
// much.
func (h *Handshake) fill(p []byte) int {
	k := min(int(h.want-h.have), len(p))
	from, to := int(h.have), int(h.have)+k
	if keep := max(from, int(h.skip)); keep < to {
		copy(h.buf[keep-int(h.skip):], p[keep-from:k])
	}
	h.have += uint16(k)
	return k
}

// socksPart acts on a complete SOCKS5 message part.
func (h *Handshake) socksPart() error {
	b := h.buf[:]
	switch h.state {
	case hsMethod:
		return h.methodSelected(b[0], b[1])
	case hsAuthReply:
		if b[0] != socksAuthVersion {
			return fmt.Errorf("authentication reply has version %#02x, want 0x01", b[0])
		}
		if b[1] != 0 {
			return errors.New("username/password rejected")
		}
		h.state = hsPrepared
	case hsReply:
		if b[0] != socksVersion {
			return fmt.Errorf("reply has version %#02x, want 0x05", b[0])
		}
		if b[1] != socksReplySucceeded {
			return socksReplyError(b[1])
		}
		h.atyp = b[3]
		switch h.atyp {
		case socksATYPIPv4:
			h.expect(hsReplyAddr, 4+2, 0)
		case socksATYPIPv6:
			h.expect(hsReplyAddr, 16+2, 0)
		case socksATYPDomain:
			h.expect(hsReplyLen, 1, 0)
		default:
			return fmt.Errorf("reply has unknown address type %#02x", h.atyp)
		}
	case hsReplyLen:
		h.expect(hsReplyAddr, uint16(b[0])+2, uint16(b[0]))
	case hsReplyAddr:
		h.state = hsDone
	}
	return nil
}

// methodSelected acts on the proxy's METHOD SELECTION message.
func (h *Handshake) methodSelected(version, method byte) error {
	if version != socksVersion {
		return fmt.Errorf("method selection has version %#02x, want 0x05", version)
	}
	switch {
	case method == socksNoAuth:
		h.state = hsPrepared
	case method == socksUserPass && h.socks.User != "":
		h.state = hsAuth
	case method == socksNoAcceptable:
		return errors.New("no acceptable authentication method")
	default:
		return fmt.Errorf("proxy chose authentication method %#02x, which was not offered", method)
	}
	return nil
}

// appendSocksRequest appends the request VER CMD RSV ATYP DST.ADDR
// DST.PORT for t.
func appendSocksRequest(dst []byte, cmd byte, t target) ([]byte, error) {
	dst = append(dst, socksVersion, cmd, 0)
	return appendSocksAddr(dst, t)
}

// appendSocksAddr appends ATYP DST.ADDR DST.PORT for t: an IP as such, a
// name as a name (ATYP 0x03) for the proxy to resolve.
func appendSocksAddr(dst []byte, t target) ([]byte, error) {
	switch {
	case t.ip.Is4():
		a := t.ip.As4()
		dst = append(dst, socksATYPIPv4)
		dst = append(dst, a[:]...)
	case t.ip.Is6():
		a := t.ip.As16()
		dst = append(dst, socksATYPIPv6)
		dst = append(dst, a[:]...)
	default:
		if len(t.host) > 255 {
			return dst, fmt.Errorf("host name longer than 255 bytes (%d)", len(t.host))
		}
		dst = append(dst, socksATYPDomain, byte(len(t.host)))
		dst = append(dst, t.host...)
	}
	return append(dst, byte(t.port>>8), byte(t.port)), nil
}

// appendConnect appends the CONNECT request head for t, with Basic
// credentials when h has a user.
func (h *HTTPConnect) appendConnect(dst []byte, t target) []byte {
	dst = append(dst, "CONNECT "...)
	dst = t.appendAuthority(dst)
	dst = append(dst, " HTTP/1.1\r\nHost: "...)
	dst = t.appendAuthority(dst)
	dst = append(dst, "\r\n"...)
	if h.User != "" {
		var small [128]byte
		cred := append(small[:0], h.User...)
		cred = append(cred, ':')
		cred = append(cred, h.Password...)
		dst = append(dst, "Proxy-Authorization: Basic "...)
		dst = base64.StdEncoding.AppendEncode(dst, cred)
		dst = append(dst, "\r\n"...)
	}
	return append(dst, "\r\n"...)
}

// feedHead takes bytes of an HTTP reply head, checking its status line as
// soon as that is complete, and returns how many it consumed: through the
// empty line that ends the head.
func (h *Handshake) feedHead(p []byte) (int, error) {
	for i, c := range p {
		h.headLen++
		if !h.lineEnd {
			if c == '\n' {
				if err := h.statusLine(); err != nil {
					return i + 1, err
				}
				h.lineEnd = true
			} else {
				if int(h.lineLen) < len(h.buf) {
					h.buf[h.lineLen] = c
				}
				h.lineLen++
			}
		}
		switch {
		case c == '\n' && h.nl > 0:
			h.state = hsDone
			return i + 1, nil
		case c == '\n':
			h.nl = 1
		case c == '\r' && h.nl == 1:
			h.nl = 2
		default:
			h.nl = 0
		}
		if h.headLen >= maxReplyHead {
			return i + 1, readError("reply", errHeadTooLarge)
		}
	}
	return len(p), nil
}

// statusLine checks the reply's status line ("HTTP/1.x NNN reason"): nil
// for 2xx (the header fields that follow are not needed: a 2xx reply to
// CONNECT has no content), a *statusError for another code. A reason
// phrase is kept to its first 55 bytes.
func (h *Handshake) statusLine() error {
	n := min(int(h.lineLen), len(h.buf))
	line := h.buf[:n]
	if int(h.lineLen) <= len(h.buf) {
		line = bytes.TrimSuffix(line, []byte("\r"))
	}
	ok := len(line) >= 12 && bytes.HasPrefix(line, []byte("HTTP/1.")) &&
		isDigit(line[7]) && line[8] == ' ' &&
		isDigit(line[9]) && isDigit(line[10]) && isDigit(line[11]) &&
		(len(line) == 12 || line[12] == ' ')
	if !ok {
		return fmt.Errorf("malformed reply status line %q", string(line))
	}
	code := int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0')
	if code/100 == 2 {
		return nil
	}
	return &statusError{code: code, status: string(bytes.TrimSpace(line[9:]))}
}

// appendAuthority appends host:port, an IPv6 host in brackets.
func (t target) appendAuthority(dst []byte) []byte {
	switch {
	case t.ip.Is6():
		dst = append(dst, '[')
		dst = t.ip.AppendTo(dst)
		dst = append(dst, ']')
	case t.ip.IsValid():
		dst = t.ip.AppendTo(dst)
	default:
		dst = append(dst, t.host...)
	}
	dst = append(dst, ':')
	return strconv.AppendUint(dst, uint64(t.port), 10)
}
