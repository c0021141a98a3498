package proxyport

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"

	"github.com/detour-proxy/detour/internal/socksudp"
)

// SOCKS commands (RFC 1928 §4; SOCKS4 uses 1 and 2 alike).
const (
	CmdConnect      = 1
	CmdBind         = 2
	CmdUDPAssociate = 3
)

// SOCKS5 reply codes (RFC 1928 §6).
const (
	RepSucceeded          = 0x00
	RepGeneralFailure     = 0x01
	RepNotAllowed         = 0x02
	RepNetworkUnreachable = 0x03
	RepHostUnreachable    = 0x04
	RepConnectionRefused  = 0x05
	RepTTLExpired         = 0x06
	RepCommandUnsupported = 0x07
	RepAddressUnsupported = 0x08
)

// SOCKSRequest is what a SOCKS client asked for after a successful
// handshake.
type SOCKSRequest struct {
	Version byte // 5, or 4 for SOCKS4 and SOCKS4a
	Cmd     byte
	// Host is the name asked for (SOCKS5 ATYP domain, SOCKS4a), lower-cased,
	// or "" when Addr is set.
	Host string
	Addr netip.Addr
	Port uint16
	// User is the user name that authenticated (SOCKS5), or the SOCKS4
	// user id.
	User string
}

// SOCKSError is a failed handshake. The reply the protocol calls for, if
// any, was already written.
type SOCKSError struct {
	Msg string
	// AuthFailed: the credentials were wrong (User names who tried).
	AuthFailed bool
	User       string
	Err        error
}

func (e *SOCKSError) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *SOCKSError) Unwrap() error { return e.Err }

// ReadSOCKS runs the server side of a SOCKS handshake whose first byte is
// still in br: for SOCKS5 the method negotiation (no authentication, or
// RFC 1929 user/password when users is not empty: then it is required) and
// the request; for SOCKS4/4a the request (refused when users is not empty:
// SOCKS4 carries no password). Replies that end the handshake in failure
// are written to w; the reply to a request it returns is the caller's, with
// WriteSOCKSReply once the destination is connected or not. Commands other
// than CONNECT, and UDP ASSOCIATE when udp is set (SOCKS5 only; its address
// may be all zeros), get "command not supported".
func ReadSOCKS(br *bufio.Reader, w io.Writer, users Users, udp bool) (*SOCKSRequest, error) {
	v, err := br.ReadByte()
	if err != nil {
		return nil, &SOCKSError{Msg: "reading the version", Err: noEOF(err)}
	}
	switch v {
	case 5:
		return readSOCKS5(br, w, users, udp)
	case 4:
		return readSOCKS4(br, w, users)
	}
	return nil, &SOCKSError{Msg: fmt.Sprintf("version %d is not SOCKS4 or SOCKS5", v)}
}

func readSOCKS5(br *bufio.Reader, w io.Writer, users Users, udp bool) (*SOCKSRequest, error) {
	fail := func(msg string, err error) (*SOCKSRequest, error) {
		return nil, &SOCKSError{Msg: msg, Err: noEOF(err)}
	}
	n, err := br.ReadByte()
	if err != nil {
		return fail("reading the greeting", err)
	}
	if n == 0 {
		w.Write([]byte{5, 0xff})
		return nil, &SOCKSError{Msg: "greeting offers no methods"}
	}
	var methods [256]byte
	if _, err := io.ReadFull(br, methods[:n]); err != nil {
		return fail(fmt.Sprintf("reading the greeting's %d methods", n), err)
	}
	want := byte(0x00) // no authentication required
	if len(users) > 0 {
		want = 0x02 // username/password
	}
	if bytes.IndexByte(methods[:n], want) < 0 {
		w.Write([]byte{5, 0xff})
		if want == 0x02 {
			return nil, &SOCKSError{Msg: fmt.Sprintf("none of the greeting's %d methods is user/password, which this port requires", n), AuthFailed: true}
		}
		return nil, &SOCKSError{Msg: fmt.Sprintf("none of the greeting's %d methods is \"no authentication\"", n)}
	}
	if _, err := w.Write([]byte{5, want}); err != nil {
		return fail("writing the method", err)
	}
	var user string
	if want == 0x02 {
		// RFC 1929: VER=1 ULEN UNAME PLEN PASSWD.
		var hdr [2]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return fail("reading the user/password request", err)
		}
		if hdr[0] != 1 {
			w.Write([]byte{1, 1})
			return nil, &SOCKSError{Msg: fmt.Sprintf("user/password version %d (want 1)", hdr[0])}
		}
		var buf [255]byte
		u := buf[:hdr[1]]
		if _, err := io.ReadFull(br, u); err != nil {
			return fail("reading the user name", err)
		}
		user = string(u)
		plen, err := br.ReadByte()
		if err != nil {
			return fail("reading the password", err)
		}
		p := buf[:plen]
		if _, err := io.ReadFull(br, p); err != nil {
			return fail("reading the password", err)
		}
		if !users.Check(user, string(p)) {
			w.Write([]byte{1, 1})
			return nil, &SOCKSError{Msg: "wrong user name or password", AuthFailed: true, User: user}
		}
		if _, err := w.Write([]byte{1, 0}); err != nil {
			return fail("writing the authentication status", err)
		}
	}
	// The request: VER CMD RSV ATYP DST.ADDR DST.PORT.
	var hdr [4]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return fail("reading the request", err)
	}
	if hdr[0] != 5 {
		WriteSOCKSReply(w, 5, RepGeneralFailure, netip.AddrPort{})
		return nil, &SOCKSError{Msg: fmt.Sprintf("request version %d (want 5)", hdr[0])}
	}
	req := &SOCKSRequest{Version: 5, Cmd: hdr[1], User: user}
	switch hdr[3] {
	case 1:
		var a [4]byte
		if _, err := io.ReadFull(br, a[:]); err != nil {
			return fail("reading the IPv4 address", err)
		}
		req.Addr = netip.AddrFrom4(a)
	case 4:
		var a [16]byte
		if _, err := io.ReadFull(br, a[:]); err != nil {
			return fail("reading the IPv6 address", err)
		}
		req.Addr = netip.AddrFrom16(a)
	case 3:
		l, err := br.ReadByte()
		if err != nil {
			return fail("reading the domain name", err)
		}
		var buf [255]byte
		name := buf[:l]
		if _, err := io.ReadFull(br, name); err != nil {
			return fail("reading the domain name", err)
		}
		if err := req.setName(string(name)); err != nil {
			WriteSOCKSReply(w, 5, RepGeneralFailure, netip.AddrPort{})
			return nil, &SOCKSError{Msg: err.Error()}
		}
	default:
		WriteSOCKSReply(w, 5, RepAddressUnsupported, netip.AddrPort{})
		return nil, &SOCKSError{Msg: fmt.Sprintf("address type %d is not IPv4 (1), a domain (3) or IPv6 (4)", hdr[3])}
	}
	var port [2]byte
	if _, err := io.ReadFull(br, port[:]); err != nil {
		return fail("reading the port", err)
	}
	req.Port = uint16(port[0])<<8 | uint16(port[1])
	switch {
	case req.Cmd == CmdUDPAssociate && udp:
		// The client's UDP address, or zeros when it does not know it yet.
		return req, nil
	case req.Cmd != CmdConnect:
		WriteSOCKSReply(w, 5, RepCommandUnsupported, netip.AddrPort{})
		supported := "only CONNECT"
		if udp {
			supported = "only CONNECT and UDP ASSOCIATE"
		}
		return nil, &SOCKSError{Msg: fmt.Sprintf("command %s is not supported (%s)", cmdName(req.Cmd), supported)}
	}
	if req.Port == 0 {
		WriteSOCKSReply(w, 5, RepGeneralFailure, netip.AddrPort{})
		return nil, &SOCKSError{Msg: "destination port 0"}
	}
	return req, nil
}

// setName takes a name given as a SOCKS domain address; an IP literal in
// it is taken as the address.
func (req *SOCKSRequest) setName(name string) error {
	if ip, err := netip.ParseAddr(name); err == nil && ip.Zone() == "" {
		req.Addr = ip.Unmap()
		return nil
	}
	if !validHost(name) {
		return fmt.Errorf("invalid domain name %q", clip([]byte(name)))
	}
	req.Host = lower(name)
	return nil
}

func readSOCKS4(br *bufio.Reader, w io.Writer, users Users) (*SOCKSRequest, error) {
	reject := func(msg string) (*SOCKSRequest, error) {
		WriteSOCKSReply(w, 4, RepGeneralFailure, netip.AddrPort{})
		return nil, &SOCKSError{Msg: msg}
	}
	// CD DSTPORT DSTIP USERID NUL [DOMAIN NUL]
	var hdr [7]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return nil, &SOCKSError{Msg: "reading the SOCKS4 request", Err: noEOF(err)}
	}
	req := &SOCKSRequest{Version: 4, Cmd: hdr[0], Port: uint16(hdr[1])<<8 | uint16(hdr[2])}
	ip := netip.AddrFrom4([4]byte{hdr[3], hdr[4], hdr[5], hdr[6]})
	uid, err := readNulString(br)
	if err != nil {
		return nil, &SOCKSError{Msg: "reading the SOCKS4 user id", Err: err}
	}
	req.User = uid
	if hdr[3] == 0 && hdr[4] == 0 && hdr[5] == 0 && hdr[6] != 0 {
		// SOCKS4a: the name follows.
		name, err := readNulString(br)
		if err != nil {
			return nil, &SOCKSError{Msg: "reading the SOCKS4a domain name", Err: err}
		}
		if err := req.setName(name); err != nil {
			return reject(err.Error())
		}
	} else {
		req.Addr = ip
	}
	switch {
	case len(users) > 0:
		WriteSOCKSReply(w, 4, RepNotAllowed, netip.AddrPort{})
		return nil, &SOCKSError{Msg: "SOCKS4 carries no password and this port requires one", AuthFailed: true, User: uid}
	case req.Cmd != CmdConnect:
		return reject(fmt.Sprintf("SOCKS4 command %s is not supported (only CONNECT)", cmdName(req.Cmd)))
	case req.Port == 0:
		return reject("destination port 0")
	}
	return req, nil
}

// readNulString reads up to 255 bytes ending in NUL.
func readNulString(br *bufio.Reader) (string, error) {
	var buf []byte
	for {
		c, err := br.ReadByte()
		if err != nil {
			return "", noEOF(err)
		}
		if c == 0 {
			return string(buf), nil
		}
		if len(buf) == 255 {
			return "", errors.New("longer than 255 bytes")
		}
		buf = append(buf, c)
	}
}

// WriteSOCKSReply writes the reply to a request: for SOCKS5 code and the
// bound address (0.0.0.0:0 when not valid); for SOCKS4, 0x5a when code is
// RepSucceeded, else 0x5b.
func WriteSOCKSReply(w io.Writer, version byte, code byte, bound netip.AddrPort) error {
	if version == 4 {
		b := [8]byte{0, 0x5a}
		if code != RepSucceeded {
			b[1] = 0x5b
		}
		_, err := w.Write(b[:])
		return err
	}
	b := make([]byte, 0, 22)
	b = append(b, 5, code, 0)
	a := bound.Addr().Unmap()
	switch {
	case a.Is4():
		b = append(b, 1)
		b = append(b, a.AsSlice()...)
	case a.Is6():
		b = append(b, 4)
		b = append(b, a.AsSlice()...)
	default:
		b = append(b, 1, 0, 0, 0, 0)
	}
	b = append(b, byte(bound.Port()>>8), byte(bound.Port()))
	_, err := w.Write(b)
	return err
}

func cmdName(c byte) string {
	switch c {
	case CmdConnect:
		return "CONNECT"
	case CmdBind:
		return "BIND"
	case CmdUDPAssociate:
		return "UDP ASSOCIATE"
	}
	return fmt.Sprintf("%d", c)
}

func lower(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// ParseUDPHeader reads the header of a datagram a SOCKS5 client sends to its
// UDP relay (socksudp.Parse) and judges the destination: a name must be a
// valid one (an address written as a name is taken as the address), the
// port not 0. It returns the destination (an address, or a name) and where
// the payload starts.
func ParseUDPHeader(b []byte) (addr netip.Addr, host string, port uint16, payload int, err error) {
	addr, name, port, payload, err := socksudp.Parse(b)
	if err != nil {
		return netip.Addr{}, "", 0, 0, err
	}
	if name != nil {
		var req SOCKSRequest
		if err := req.setName(string(name)); err != nil {
			return netip.Addr{}, "", 0, 0, fmt.Errorf("SOCKS5 UDP header: %v", err)
		}
		addr, host = req.Addr, req.Host
	}
	if port == 0 {
		return netip.Addr{}, "", 0, 0, errors.New("SOCKS5 UDP header: destination port 0")
	}
	return addr, host, port, payload, nil
}
