package upstream

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// socksSeen is what a fake SOCKS5 server read from the client.
type socksSeen struct {
	greeting, auth, request []byte
	target                  string // the request's DST.ADDR:DST.PORT
}

// socksServer is a fake SOCKS5 server that reads each message exactly by
// its structure and answers as told.
type socksServer struct {
	user, pass string // required credentials; "" accepts no auth
	rep        byte   // reply code; 0 connects to the (loopback) target and relays
	bound      []byte // ATYP, BND.ADDR, BND.PORT of the reply; nil = IPv4 0.0.0.0:0
	after      string // sent right after a successful reply, before relaying
	seen       chan socksSeen
}

func (s *socksServer) start(t *testing.T) *fakeProxy {
	return startFakeProxy(t, func(p *fakeProxy, c *net.TCPConn) {
		var seen socksSeen
		type cutShort struct{}
		defer func() {
			if r := recover(); r != nil && r != (cutShort{}) {
				panic(r)
			}
			if s.seen != nil {
				s.seen <- seen
			}
		}()
		read := func(n int) []byte {
			b := make([]byte, n)
			if _, err := io.ReadFull(c, b); err != nil {
				panic(cutShort{}) // the client went away: report what was seen
			}
			return b
		}
		h := read(2)
		methods := read(int(h[1]))
		seen.greeting = append(h, methods...)
		want := byte(socksNoAuth)
		if s.user != "" {
			want = socksUserPass
		}
		if h[0] != 5 || bytes.IndexByte(methods, want) < 0 {
			c.Write([]byte{5, 0xff})
			return
		}
		c.Write([]byte{5, want})
		if want == socksUserPass {
			a := read(2)
			user := read(int(a[1]))
			plen := read(1)
			pass := read(int(plen[0]))
			seen.auth = bytes.Join([][]byte{a, user, plen, pass}, nil)
			if a[0] != 1 || string(user) != s.user || string(pass) != s.pass {
				c.Write([]byte{1, 1})
				return
			}
			c.Write([]byte{1, 0})
		}
		r := read(4)
		var addr []byte
		var host string
		switch r[3] {
		case 1:
			addr = read(4)
			host = netip.AddrFrom4([4]byte(addr)).String()
		case 4:
			addr = read(16)
			host = netip.AddrFrom16([16]byte(addr)).String()
		case 3:
			l := read(1)
			addr = append(l, read(int(l[0]))...)
			host = string(addr[1:])
		}
		port := read(2)
		seen.request = bytes.Join([][]byte{r, addr, port}, nil)
		seen.target = net.JoinHostPort(host, strconv.Itoa(int(port[0])<<8|int(port[1])))
		bound := s.bound
		if bound == nil {
			bound = []byte{1, 0, 0, 0, 0, 0, 0}
		}
		if s.rep != 0 {
			c.Write(append([]byte{5, s.rep, 0}, bound...))
			return
		}
		var target net.Conn
		if ap, err := netip.ParseAddrPort(seen.target); err == nil && ap.Addr().IsLoopback() {
			var err error
			if target, err = p.dialTarget(seen.target); err != nil {
				c.Write(append([]byte{5, 5, 0}, bound...))
				return
			}
		}
		c.Write(append(append([]byte{5, 0, 0}, bound...), s.after...))
		if target != nil {
			p.relay(c, target)
		} else {
			io.Copy(io.Discard, c)
		}
	})
}

func TestSOCKS5TunnelsToTarget(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	srv := &socksServer{seen: make(chan socksSeen, 1)}
	p := srv.start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	d := &SOCKS5{Proxy: p.addr, Forward: &net.Dialer{Timeout: time.Second}}
	c, err := d.Dial(ctx, echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	roundTrip(t, c, "hello")
	checkNoDeadline(t, c, 1100*time.Millisecond, "still open")
	c.Close()
	seen := <-srv.seen
	ap := netip.MustParseAddrPort(echo)
	a := ap.Addr().As4()
	wantReq := []byte{5, 1, 0, 1, a[0], a[1], a[2], a[3], byte(ap.Port() >> 8), byte(ap.Port())}
	if !bytes.Equal(seen.greeting, []byte{5, 1, 0}) || seen.auth != nil || !bytes.Equal(seen.request, wantReq) {
		t.Fatalf("client sent greeting %x, auth %x, request %x; want 050100, none, %x", seen.greeting, seen.auth, seen.request, wantReq)
	}
}

func TestSOCKS5UserPass(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	srv := &socksServer{user: "alice", pass: "s3cret", seen: make(chan socksSeen, 1)}
	p := srv.start(t)

	c, err := (&SOCKS5{Proxy: p.addr, User: "alice", Password: "s3cret"}).Dial(context.Background(), echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	roundTrip(t, c, "authorized")
	c.Close()
	seen := <-srv.seen
	if want := []byte{5, 2, 0, 2}; !bytes.Equal(seen.greeting, want) {
		t.Fatalf("greeting %x, want %x (no-auth and user/pass offered)", seen.greeting, want)
	}
	if want := append(append([]byte{1, 5}, "alice"...), append([]byte{6}, "s3cret"...)...); !bytes.Equal(seen.auth, want) {
		t.Fatalf("RFC 1929 request %x, want %x", seen.auth, want)
	}

	_, err = (&SOCKS5{Proxy: p.addr, User: "alice", Password: "wrong"}).Dial(context.Background(), echo, netip.AddrPort{})
	<-srv.seen
	wantOpError(t, err, "socks connect", p.addr, echo)
	if !strings.Contains(err.Error(), "username/password rejected") || isTargetFailure(err) {
		t.Fatalf("wrong password: %v", err)
	}

	// Without credentials the server finds no method it accepts.
	_, err = (&SOCKS5{Proxy: p.addr}).Dial(context.Background(), echo, netip.AddrPort{})
	<-srv.seen
	if !strings.Contains(err.Error(), "no acceptable authentication method") {
		t.Fatalf("no credentials for a server that wants them: %v", err)
	}
}

func TestSOCKS5ReplyCodes(t *testing.T) {
	testkit.CheckGoroutines(t)
	for _, tc := range []struct {
		rep    byte
		want   string
		target bool
	}{
		{0x01, "general SOCKS server failure", false},
		{0x02, "connection not allowed by ruleset", false},
		{0x03, "network unreachable", true},
		{0x04, "host unreachable", true},
		{0x05, "connection refused", true},
		{0x06, "TTL expired", true},
		{0x07, "command not supported", false},
		{0x08, "address type not supported", false},
		{0x09, "unknown reply code (0x09)", false},
		{0xff, "unknown reply code (0xff)", false},
	} {
		p := (&socksServer{rep: tc.rep}).start(t)
		_, err := (&SOCKS5{Proxy: p.addr}).Dial(context.Background(), "example.com:443", netip.AddrPort{})
		wantOpError(t, err, "socks connect", p.addr, "example.com:443")
		var re socksReplyError
		if !errors.As(err, &re) || byte(re) != tc.rep || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("reply %#02x: error %v; want it to say %q", tc.rep, err, tc.want)
		}
		if isTargetFailure(err) != tc.target {
			t.Errorf("reply %#02x: target failure = %v, want %v", tc.rep, !tc.target, tc.target)
		}
	}
}

func TestSOCKS5EncodesTargets(t *testing.T) {
	testkit.CheckGoroutines(t)
	srv := &socksServer{seen: make(chan socksSeen, 1)}
	p := srv.start(t)
	for _, tc := range []struct {
		address string
		addr    []byte // ATYP and DST.ADDR
	}{
		{"example.com:443", append([]byte{3, 11}, "example.com"...)},
		{"[2001:db8::1]:443", []byte{4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}},
		{"[::ffff:198.18.0.1]:443", []byte{1, 198, 18, 0, 1}},
		{"198.18.0.1:443", []byte{1, 198, 18, 0, 1}},
		{strings.Repeat("a", 255) + ":443", append([]byte{3, 255}, strings.Repeat("a", 255)...)},
	} {
		c, err := (&SOCKS5{Proxy: p.addr}).Dial(context.Background(), tc.address, netip.AddrPort{})
		if err != nil {
			t.Fatalf("%s: %v", tc.address, err)
		}
		c.Close()
		want := append(append([]byte{5, 1, 0}, tc.addr...), 0x01, 0xbb)
		if got := (<-srv.seen).request; !bytes.Equal(got, want) {
			t.Errorf("%s: request %x, want %x", tc.address, got, want)
		}
	}
}

// TestSOCKS5KeepsBytesAfterReply: the reply is read by its structure, so
// bytes right behind it (here with a domain and an IPv6 bound address)
// stay in the returned *net.TCPConn.
func TestSOCKS5KeepsBytesAfterReply(t *testing.T) {
	testkit.CheckGoroutines(t)
	for _, bound := range [][]byte{
		{1, 10, 0, 0, 1, 0x04, 0x38},
		{4, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x04, 0x38},
		append(append([]byte{3, 12}, "proxy.local."...), 0x04, 0x38),
		{3, 0, 0, 0},
	} {
		p := (&socksServer{bound: bound, after: "SSH-2.0-OpenSSH_9.6\r\n"}).start(t)
		c, err := (&SOCKS5{Proxy: p.addr}).Dial(context.Background(), "example.com:22", netip.AddrPort{})
		if err != nil {
			t.Fatalf("bound %x: %v", bound, err)
		}
		tc := mustTCP(t, c)
		tc.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, len("SSH-2.0-OpenSSH_9.6\r\n"))
		if _, err := io.ReadFull(tc, got); err != nil || string(got) != "SSH-2.0-OpenSSH_9.6\r\n" {
			t.Fatalf("bound %x: bytes after the reply = %q, %v", bound, got, err)
		}
	}
}

// TestSOCKS5RogueServer: malformed or cut-short answers at each step.
func TestSOCKS5RogueServer(t *testing.T) {
	const reqLen = 3 + 2 + len("example.com") + 2
	// script reads n bytes, writes w, for each step, then closes.
	type step struct {
		read  int
		write []byte
	}
	for _, tc := range []struct {
		name  string
		user  string
		steps []step
		want  string
	}{
		{"closes at once", "", nil, "reading method selection: "}, // EOF or reset: the greeting was unread
		{"closes after greeting", "", []step{{3, nil}}, "reading method selection: unexpected EOF"},
		{"half a method selection", "", []step{{3, []byte{5}}}, "reading method selection: unexpected EOF"},
		{"SOCKS4 version", "", []step{{3, []byte{4, 0}}}, "method selection has version 0x04"},
		{"HTTP answer", "", []step{{3, []byte("HTTP/1.1 400 Bad Request\r\n\r\n")}}, "method selection has version 0x48"},
		{"no acceptable method", "", []step{{3, []byte{5, 0xff}}}, "no acceptable authentication method"},
		{"user/pass not offered", "", []step{{3, []byte{5, 2}}}, "authentication method 0x02, which was not offered"},
		{"GSSAPI", "u", []step{{4, []byte{5, 1}}}, "authentication method 0x01, which was not offered"},
		{"auth reply version 5", "u", []step{{4, []byte{5, 2}}, {4, []byte{5, 0}}}, "authentication reply has version 0x05"},
		{"auth rejected", "u", []step{{4, []byte{5, 2}}, {4, []byte{1, 0xff}}}, "username/password rejected"},
		{"closes during auth", "u", []step{{4, []byte{5, 2}}, {4, nil}}, "reading authentication reply: unexpected EOF"},
		{"closes after request", "", []step{{3, []byte{5, 0}}, {reqLen, nil}}, "reading reply: unexpected EOF"},
		{"reply version 4", "", []step{{3, []byte{5, 0}}, {reqLen, []byte{4, 0, 0, 1, 0, 0, 0, 0, 0, 0}}}, "reply has version 0x04"},
		{"reply address type 2", "", []step{{3, []byte{5, 0}}, {reqLen, []byte{5, 0, 0, 2, 0, 0, 0, 0, 0, 0}}}, "unknown address type 0x02"},
		{"reply cut in the address", "", []step{{3, []byte{5, 0}}, {reqLen, []byte{5, 0, 0, 4, 0, 0, 0}}}, "reading reply: unexpected EOF"},
		{"reply cut in the name", "", []step{{3, []byte{5, 0}}, {reqLen, []byte{5, 0, 0, 3, 20, 'a'}}}, "reading reply: unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
				for _, s := range tc.steps {
					if _, err := io.ReadFull(c, make([]byte, s.read)); err != nil {
						return
					}
					c.Write(s.write)
				}
				// Let the client read what was sent before the FIN.
				time.Sleep(10 * time.Millisecond)
			})
			c, err := (&SOCKS5{Proxy: p.addr, User: tc.user, Forward: &net.Dialer{Timeout: 5 * time.Second}}).Dial(context.Background(), "example.com:443", netip.AddrPort{})
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			wantOpError(t, err, "socks connect", p.addr, "example.com:443")
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// BenchmarkSOCKS5Dial: a blocking dial through a loopback SOCKS5 server
// that answers each message at once (user/pass, IPv4 target).
func BenchmarkSOCKS5Dial(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				io.ReadFull(c, buf[:4])
				c.Write([]byte{5, 2})
				io.ReadFull(c, buf[:2+5+1+6])
				c.Write([]byte{1, 0})
				io.ReadFull(c, buf[:10])
				c.Write([]byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 80})
				io.ReadFull(c, buf[:1])
			}()
		}
	}()
	d := &SOCKS5{Proxy: ln.Addr().String(), User: "alice", Password: "s3cret"}
	b.ReportAllocs()
	for b.Loop() {
		c, err := d.Dial(context.Background(), "198.18.0.9:443", netip.AddrPort{})
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
