package upstream

import (
	"bytes"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// feedEach feeds p to h one byte at a time, as a proxy whose every byte
// arrives in a read of its own would, and returns how many were consumed
// before h stopped taking them (Done) and the error.
func feedEach(h *Handshake, p []byte) (int, error) {
	for i := range p {
		n, err := h.Feed(p[i : i+1])
		if err != nil {
			return i + n, err
		}
		if n == 0 {
			return i, nil
		}
	}
	return len(p), nil
}

// feedWay feeds p whole, or a byte at a time.
type feedWay struct {
	name string
	feed func(h *Handshake, p []byte) (int, error)
}

var feedWays = []feedWay{
	{"whole", (*Handshake).Feed},
	{"byte by byte", feedEach},
}

// startHandshake is the handshake of a new connection through d.
func startHandshake(t *testing.T, d Dialer) *Handshake {
	t.Helper()
	h, ok := (&Upstream{Name: "u", Dialer: d}).Handshake()
	if !ok {
		t.Fatalf("%T has no handshake", d)
	}
	return &h
}

func socksHandshake(t *testing.T, user, pass string) *Handshake {
	t.Helper()
	return startHandshake(t, &SOCKS5{Proxy: "198.18.0.2:1080", User: user, Password: pass})
}

// prepare runs h through the method negotiation (and authentication) with
// the proxy's answers, checking what h sends.
func prepare(t *testing.T, h *Handshake, way feedWay, greeting []byte, answers ...[]byte) {
	t.Helper()
	if h.Need() != 0 || h.Prepared() {
		t.Fatalf("before the greeting: need %d, prepared %v", h.Need(), h.Prepared())
	}
	if got := h.Out(nil); !bytes.Equal(got, greeting) {
		t.Fatalf("greeting %x, want %x", got, greeting)
	}
	for i, a := range answers {
		if h.Need() != len(a) {
			t.Fatalf("answer %d: need %d, want %d", i, h.Need(), len(a))
		}
		if n, err := way.feed(h, a); n != len(a) || err != nil {
			t.Fatalf("answer %d (%x): consumed %d, %v", i, a, n, err)
		}
		if i < len(answers)-1 {
			h.Out(nil)
		}
	}
	if !h.Prepared() || h.Need() != 0 || len(h.Out(nil)) != 0 {
		t.Fatalf("after the negotiation: prepared %v, need %d", h.Prepared(), h.Need())
	}
}

func TestHandshakeSOCKS5(t *testing.T) {
	v6 := []byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}
	for _, way := range feedWays {
		for _, tc := range []struct {
			bound []byte // ATYP BND.ADDR BND.PORT
			want  netip.AddrPort
		}{
			{[]byte{1, 198, 18, 0, 2, 0x9c, 0x40}, netip.MustParseAddrPort("198.18.0.2:40000")},
			{append(append([]byte{4}, v6...), 0x04, 0x38), netip.MustParseAddrPort("[2001:db8::1]:1080")},
			{[]byte{4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 3, 0, 80}, netip.MustParseAddrPort("198.18.0.3:80")},
			{append(append([]byte{3, 11}, "proxy.local"...), 0x04, 0x38), netip.AddrPortFrom(netip.Addr{}, 1080)},
			{[]byte{3, 0, 0, 0}, netip.AddrPort{}},
			{append(append([]byte{3, 255}, strings.Repeat("n", 255)...), 1, 2), netip.AddrPortFrom(netip.Addr{}, 258)},
		} {
			h := socksHandshake(t, "", "")
			prepare(t, h, way, []byte{5, 1, 0}, []byte{5, 0})
			req, err := h.Request(nil, "site.test:443")
			if want := append(append([]byte{5, 1, 0, 3, 9}, "site.test"...), 1, 0xbb); err != nil || !bytes.Equal(req, want) {
				t.Fatalf("request %x, %v; want %x", req, err, want)
			}
			if h.Need() != 4 || h.Prepared() {
				t.Fatalf("after the request: need %d, prepared %v", h.Need(), h.Prepared())
			}
			reply := append([]byte{5, 0, 0}, tc.bound...)
			const data = "SSH-2.0-OpenSSH_9.6\r\n" // the server speaks first
			n, err := way.feed(h, append(reply, data...))
			if err != nil || n != len(reply) || !h.Done() || h.Need() != 0 {
				t.Fatalf("%s: reply %x: consumed %d of %d, done %v, %v", way.name, reply, n, len(reply), h.Done(), err)
			}
			if got := h.Bound(); got != tc.want {
				t.Errorf("%s: reply %x: bound %v, want %v", way.name, reply, got, tc.want)
			}
			if n, err := h.Feed([]byte(data)); n != 0 || err != nil {
				t.Errorf("Feed after the reply consumed %d, %v", n, err)
			}
		}
	}
}

func TestHandshakeSOCKS5UserPass(t *testing.T) {
	for _, way := range feedWays {
		h := socksHandshake(t, "alice", "s3cret")
		if got, want := h.Out(nil), []byte{5, 2, 0, 2}; !bytes.Equal(got, want) {
			t.Fatalf("greeting %x, want %x", got, want)
		}
		if n, err := way.feed(h, []byte{5, 2}); n != 2 || err != nil {
			t.Fatalf("method selection: %d, %v", n, err)
		}
		if h.Need() != 0 || h.Prepared() {
			t.Fatalf("before the credentials: need %d, prepared %v", h.Need(), h.Prepared())
		}
		auth := h.Out(make([]byte, 0, 64))
		if want := append(append([]byte{1, 5}, "alice"...), append([]byte{6}, "s3cret"...)...); !bytes.Equal(auth, want) {
			t.Fatalf("credentials %x, want %x", auth, want)
		}
		if h.Need() != 2 {
			t.Fatalf("need %d for the authentication reply", h.Need())
		}
		if n, err := way.feed(h, []byte{1, 0}); n != 2 || err != nil || !h.Prepared() {
			t.Fatalf("authentication reply: %d, %v, prepared %v", n, err, h.Prepared())
		}

		// The proxy may also skip authentication.
		h = socksHandshake(t, "alice", "s3cret")
		prepare(t, h, way, []byte{5, 2, 0, 2}, []byte{5, 0})
	}
}

func TestHandshakeSOCKS5Targets(t *testing.T) {
	for _, tc := range []struct {
		address string
		addr    []byte // ATYP DST.ADDR; nil: refused
	}{
		{"example.com:443", append([]byte{3, 11}, "example.com"...)},
		{"198.18.0.1:443", []byte{1, 198, 18, 0, 1}},
		{"[::ffff:198.18.0.1]:443", []byte{1, 198, 18, 0, 1}},
		{"[2001:db8::1]:443", []byte{4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}},
		{"[fe80::1%eth0]:443", []byte{4, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}},
		{strings.Repeat("a", 255) + ":443", append([]byte{3, 255}, strings.Repeat("a", 255)...)},
		{strings.Repeat("a", 256) + ":443", nil},
		{"example.com", nil},
		{"example.com:0", nil},
		{"exa mple.com:443", nil},
		{":443", nil},
	} {
		h := socksHandshake(t, "", "")
		prepare(t, h, feedWays[0], []byte{5, 1, 0}, []byte{5, 0})
		req, err := h.Request([]byte("kept"), tc.address)
		if tc.addr == nil {
			if err == nil || string(req) != "kept" || !h.Prepared() {
				t.Errorf("%s: request %x, %v, prepared %v; want an error and the handshake still prepared", tc.address, req, err, h.Prepared())
			}
			continue
		}
		want := append(append([]byte("kept\x05\x01\x00"), tc.addr...), 0x01, 0xbb)
		if err != nil || !bytes.Equal(req, want) {
			t.Errorf("%s: request %x, %v; want %x", tc.address, req, err, want)
		}
	}
}

// handshakeFailure is how an error must be classified.
type handshakeFailure int

const (
	failBenches handshakeFailure = iota // the upstream's own failure
	failRefused                         // the request refused: try the next, bench nobody
	failTarget                          // the destination failed: stop, bench nobody
)

func classify(err error) handshakeFailure {
	switch {
	case isTargetFailure(err):
		return failTarget
	case isRequestRefused(err):
		return failRefused
	}
	return failBenches
}

func TestHandshakeSOCKS5Errors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		user    string
		answers [][]byte // the last one fails
		want    string
		class   handshakeFailure
	}{
		{"SOCKS4 version", "", [][]byte{{4, 0}}, "method selection has version 0x04", failBenches},
		{"HTTP answer", "", [][]byte{[]byte("HTTP/1.1 400 Bad Request\r\n\r\n")}, "method selection has version 0x48", failBenches},
		{"no acceptable method", "", [][]byte{{5, 0xff}}, "no acceptable authentication method", failBenches},
		{"user/pass not offered", "", [][]byte{{5, 2}}, "authentication method 0x02, which was not offered", failBenches},
		{"GSSAPI", "u", [][]byte{{5, 1}}, "authentication method 0x01, which was not offered", failBenches},
		{"auth reply version 5", "u", [][]byte{{5, 2}, {5, 0}}, "authentication reply has version 0x05", failBenches},
		{"auth rejected", "u", [][]byte{{5, 2}, {1, 0xff}}, "username/password rejected", failBenches},
		{"bytes out of turn", "", [][]byte{{5, 0, 5}}, "proxy sent 1 bytes out of turn", failBenches},
		{"bytes before the credentials were sent", "u", [][]byte{{5, 2, 1, 0}}, "out of turn", failBenches},
		{"reply version 4", "", [][]byte{{5, 0}, {4, 0, 0, 1, 0, 0, 0, 0, 0, 0}}, "reply has version 0x04", failBenches},
		{"reply address type 2", "", [][]byte{{5, 0}, {5, 0, 0, 2, 0, 0, 0, 0, 0, 0}}, "unknown address type 0x02", failBenches},
		{"general failure", "", [][]byte{{5, 0}, {5, 1, 0, 1, 0, 0, 0, 0, 0, 0}}, "general SOCKS server failure (0x01)", failRefused},
		{"not allowed", "", [][]byte{{5, 0}, {5, 2, 0, 1, 0, 0, 0, 0, 0, 0}}, "not allowed by ruleset (0x02)", failRefused},
		{"network unreachable", "", [][]byte{{5, 0}, {5, 3, 0, 1, 0, 0, 0, 0, 0, 0}}, "network unreachable (0x03)", failTarget},
		{"host unreachable", "", [][]byte{{5, 0}, {5, 4, 0, 1}}, "host unreachable (0x04)", failTarget},
		{"connection refused", "", [][]byte{{5, 0}, {5, 5, 0, 1, 0, 0, 0, 0, 0, 0}}, "connection refused (0x05)", failTarget},
		{"TTL expired", "", [][]byte{{5, 0}, {5, 6, 0, 3}}, "TTL expired (0x06)", failTarget},
		{"command not supported", "", [][]byte{{5, 0}, {5, 7, 0, 1, 0, 0, 0, 0, 0, 0}}, "command not supported (0x07)", failBenches},
		{"address type not supported", "", [][]byte{{5, 0}, {5, 8, 0, 1, 0, 0, 0, 0, 0, 0}}, "address type not supported (0x08)", failRefused},
		{"unknown code", "", [][]byte{{5, 0}, {5, 9, 0, 1, 0, 0, 0, 0, 0, 0}}, "unknown reply code (0x09)", failBenches},
	} {
		for _, way := range feedWays {
			h := socksHandshake(t, tc.user, "p")
			h.Out(nil)
			var err error
			for i, a := range tc.answers {
				if i == 1 && tc.user == "" {
					h.Request(nil, "site.test:443")
				}
				h.Out(nil)
				if _, err = way.feed(h, a); err != nil {
					break
				}
			}
			if err == nil {
				t.Errorf("%s, %s: no error", tc.name, way.name)
				continue
			}
			wantOpError(t, err, "socks connect", "198.18.0.2:1080", h.target)
			if !strings.Contains(err.Error(), tc.want) || classify(err) != tc.class {
				t.Errorf("%s, %s: %v (class %d); want it to say %q, class %d", tc.name, way.name, err, classify(err), tc.want, tc.class)
			}
			if _, err := h.Feed([]byte{5}); err == nil || h.Done() || h.Prepared() {
				t.Errorf("%s, %s: the handshake goes on after failing", tc.name, way.name)
			}
		}
	}
}

// ReadError names what was being read; an EOF there is unexpected.
func TestHandshakeReadError(t *testing.T) {
	h := socksHandshake(t, "u", "p")
	h.Out(nil)
	if err := h.ReadError(io.EOF); !strings.Contains(err.Error(), "reading method selection: unexpected EOF") || classify(err) != failBenches {
		t.Errorf("EOF at the method selection: %v", err)
	}
	h.Feed([]byte{5, 2})
	h.Out(nil)
	if err := h.ReadError(io.EOF); !strings.Contains(err.Error(), "reading authentication reply: unexpected EOF") {
		t.Errorf("EOF at the authentication: %v", err)
	}
	h.Feed([]byte{1, 0})
	h.Request(nil, "198.18.0.9:22")
	err := h.ReadError(&net.OpError{Op: "read", Err: errors.New("connection reset by peer")})
	wantOpError(t, err, "socks connect", "198.18.0.2:1080", "198.18.0.9:22")
	if !strings.Contains(err.Error(), "reading reply: read: connection reset by peer") {
		t.Errorf("reset at the reply: %v", err)
	}
}

func TestHandshakeNotForDirect(t *testing.T) {
	for _, u := range []*Upstream{
		{Name: "direct", Dialer: &Direct{}},
		{Name: "no proxy", Dialer: &SOCKS5{}},
		{Name: "long user", Dialer: &SOCKS5{Proxy: "198.18.0.2:1080", User: strings.Repeat("u", 256)}},
		{Name: "colon", Dialer: &HTTPConnect{Proxy: "198.18.0.2:3128", User: "a:b"}},
	} {
		if _, ok := u.Handshake(); ok {
			t.Errorf("%s: has a handshake", u.Name)
		}
	}
}

func httpHandshake(t *testing.T, user, pass string) *Handshake {
	t.Helper()
	h := startHandshake(t, &HTTPConnect{Proxy: "198.18.0.2:3128", User: user, Password: pass})
	if !h.Prepared() || h.Need() != 0 || len(h.Out(nil)) != 0 {
		t.Fatalf("a new HTTP CONNECT handshake: prepared %v, need %d", h.Prepared(), h.Need())
	}
	return h
}

func TestHandshakeHTTPConnect(t *testing.T) {
	for _, tc := range []struct {
		user, pass, target, authority string
	}{
		{"", "", "site.test:443", "site.test:443"},
		{"", "", "[2001:db8::1]:8443", "[2001:db8::1]:8443"},
		{"", "", "[::ffff:198.18.0.1]:80", "198.18.0.1:80"},
		{"alice", "s3cret:with colon", "198.18.0.1:443", "198.18.0.1:443"},
		{"bob", strings.Repeat("p", 300), "site.test:443", "site.test:443"},
	} {
		h := httpHandshake(t, tc.user, tc.pass)
		req, err := h.Request(nil, tc.target)
		want := "CONNECT " + tc.authority + " HTTP/1.1\r\nHost: " + tc.authority + "\r\n"
		if tc.user != "" {
			want += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(tc.user+":"+tc.pass)) + "\r\n"
		}
		want += "\r\n"
		if err != nil || string(req) != want {
			t.Fatalf("request %q, %v; want %q", req, err, want)
		}
		if h.Need() != 1 {
			t.Fatalf("need %d after the request", h.Need())
		}
		for _, way := range feedWays {
			for _, reply := range []string{
				"HTTP/1.1 200 Connection established\r\n\r\n",
				"HTTP/1.0 200 OK\r\nVia: 1.1 squid\r\nX: y\r\n\r\n",
				"HTTP/1.1 200 OK\n\n",
				"HTTP/1.1 204\r\n\r\n",
			} {
				h := httpHandshake(t, tc.user, tc.pass)
				h.Request(nil, tc.target)
				n, err := way.feed(h, []byte(reply+"SSH-2.0-x\r\n"))
				if err != nil || n != len(reply) || !h.Done() || h.Bound().IsValid() {
					t.Fatalf("%s: %q: consumed %d, done %v, %v", way.name, reply, n, h.Done(), err)
				}
			}
		}
	}
}

func TestHandshakeHTTPConnectErrors(t *testing.T) {
	for _, tc := range []struct {
		reply string
		want  string
		class handshakeFailure
	}{
		{"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n", `"407 Proxy Authentication Required"`, failBenches},
		{"HTTP/1.1 403 Forbidden\r\n", `"403 Forbidden"`, failRefused},
		{"HTTP/1.1 400 Bad Request\r\n\r\n", `"400 Bad Request"`, failRefused},
		{"HTTP/1.1 404\r\n\r\n", `"404"`, failRefused},
		{"HTTP/1.1 502 Bad Gateway\r\n\r\n", `"502 Bad Gateway"`, failTarget},
		{"HTTP/1.1 503 Service Unavailable\r\n\r\n", `"503 Service Unavailable"`, failTarget},
		{"HTTP/1.1 504 Gateway Timeout\r\n\r\n", `"504 Gateway Timeout"`, failTarget},
		{"HTTP/1.1 500 Internal Server Error\r\n\r\n", `"500 Internal Server Error"`, failBenches},
		{"HTTP/1.1 101 Switching Protocols\r\n\r\n", `"101 Switching Protocols"`, failBenches},
		{"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed reply status line", failBenches},
		{"HTTP/2 200\r\n\r\n", "malformed reply status line", failBenches},
		{"HTTP/1.1 2000 OK\r\n\r\n", "malformed reply status line", failBenches},
		{"\r\n\r\n", "malformed reply status line", failBenches},
		{"HTTP/1.1 200 " + strings.Repeat("x", 100) + "\n", "", -1}, // a long reason is fine
		{"HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: aaaaaaaaaaaaaaaaaaaa\r\n", 1000), "reply head longer than 16384 bytes", failBenches},
	} {
		for _, way := range feedWays {
			h := httpHandshake(t, "", "")
			h.Request(nil, "site.test:443")
			n, err := way.feed(h, []byte(tc.reply))
			if tc.class < 0 {
				if err != nil || n != len(tc.reply) || h.Done() {
					t.Errorf("%q: consumed %d, %v", tc.reply, n, err)
				}
				continue
			}
			if err == nil {
				t.Errorf("%.40q, %s: no error", tc.reply, way.name)
				continue
			}
			wantOpError(t, err, "http connect", "198.18.0.2:3128", "site.test:443")
			if !strings.Contains(err.Error(), tc.want) || classify(err) != tc.class {
				t.Errorf("%.40q, %s: %v (class %d); want it to say %q, class %d", tc.reply, way.name, err, classify(err), tc.want, tc.class)
			}
		}
	}
	// A proxy talking before the request.
	h := httpHandshake(t, "", "")
	if _, err := h.Feed([]byte("HTTP/1.1 200 OK\r\n\r\n")); err == nil || !strings.Contains(err.Error(), "out of turn") {
		t.Errorf("reply before the request: %v", err)
	}
}

// A full SOCKS5 handshake with credentials, the request and a reply with
// the server's first bytes behind it allocates nothing.
func TestHandshakeAllocs(t *testing.T) {
	if testing.CoverMode() != "" {
		t.Skip("coverage counts")
	}
	u := &Upstream{Name: "s", Dialer: &SOCKS5{Proxy: "198.18.0.2:1080", User: "alice", Password: "s3cret"}}
	reply := []byte{5, 0, 0, 1, 198, 18, 0, 2, 0x9c, 0x40, 'S', 'S', 'H'}
	buf := make([]byte, 0, 512)
	allocs := testing.AllocsPerRun(100, func() {
		fullHandshake(u, buf, reply)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per handshake, want 0", allocs)
	}
}

// fullHandshake runs a SOCKS5 handshake with credentials through the codec.
func fullHandshake(u *Upstream, buf, reply []byte) {
	h, ok := u.Handshake()
	if !ok {
		panic("no handshake")
	}
	buf = h.Out(buf[:0])
	h.Feed([]byte{5, 2})
	buf = h.Out(buf[:0])
	h.Feed([]byte{1, 0})
	buf, _ = h.Request(buf[:0], "198.18.0.9:443")
	if n, err := h.Feed(reply); err != nil || n != 10 || !h.Done() {
		panic("handshake failed")
	}
	_ = buf
}

func BenchmarkHandshakeSOCKS5(b *testing.B) {
	u := &Upstream{Name: "s", Dialer: &SOCKS5{Proxy: "198.18.0.2:1080", User: "alice", Password: "s3cret"}}
	reply := []byte{5, 0, 0, 1, 198, 18, 0, 2, 0x9c, 0x40, 'S', 'S', 'H'}
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		fullHandshake(u, buf, reply)
	}
}

func BenchmarkHandshakeSOCKS5Name(b *testing.B) {
	u := &Upstream{Name: "s", Dialer: &SOCKS5{Proxy: "198.18.0.2:1080"}}
	reply := []byte{5, 0, 0, 1, 198, 18, 0, 2, 0x9c, 0x40}
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		h, _ := u.Handshake()
		buf = h.Out(buf[:0])
		h.Feed([]byte{5, 0})
		buf, _ = h.Request(buf[:0], "www.example.com:443")
		if n, err := h.Feed(reply); err != nil || n != 10 {
			b.Fatal(n, err)
		}
	}
}

func BenchmarkHandshakeHTTPConnect(b *testing.B) {
	u := &Upstream{Name: "h", Dialer: &HTTPConnect{Proxy: "198.18.0.2:3128", User: "alice", Password: "s3cret"}}
	reply := []byte("HTTP/1.1 200 Connection established\r\n\r\n")
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	for b.Loop() {
		h, _ := u.Handshake()
		buf, _ = h.Request(buf[:0], "www.example.com:443")
		if n, err := h.Feed(reply); err != nil || n != len(reply) {
			b.Fatal(n, err)
		}
	}
}
