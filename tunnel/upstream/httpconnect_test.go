package upstream

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// readRequestHead reads a request head a byte at a time, as a proxy that
// must not eat the tunnel's first bytes would. It returns "" on error.
func readRequestHead(c net.Conn) string {
	var head []byte
	b := make([]byte, 1)
	for !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		if _, err := c.Read(b); err != nil {
			return ""
		}
		head = append(head, b[0])
	}
	return string(head)
}

// headerValue returns the value of field name in head, or "".
func headerValue(head, name string) string {
	for _, line := range strings.Split(head, "\r\n")[1:] {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.EqualFold(k, name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// httpProxy is a fake CONNECT proxy that checks Basic credentials when
// user is set, reports each request head on heads, and relays to the
// requested authority.
func httpProxy(t *testing.T, user, pass string, heads chan<- string) *fakeProxy {
	return startFakeProxy(t, func(p *fakeProxy, c *net.TCPConn) {
		head := readRequestHead(c)
		if heads != nil {
			heads <- head
		}
		line, _, _ := strings.Cut(head, "\r\n")
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "CONNECT" || f[2] != "HTTP/1.1" {
			io.WriteString(c, "HTTP/1.1 400 Bad Request\r\n\r\n")
			return
		}
		if user != "" && headerValue(head, "Proxy-Authorization") != "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":"+pass)) {
			io.WriteString(c, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n\r\n")
			return
		}
		s, err := p.dialTarget(f[1])
		if err != nil {
			io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
			return
		}
		io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
		p.relay(c, s)
	})
}

func TestHTTPConnectTunnelsToTarget(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	heads := make(chan string, 1)
	p := httpProxy(t, "", "", heads)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	d := &HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: time.Second}}
	c, err := d.Dial(ctx, echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	want := "CONNECT " + echo + " HTTP/1.1\r\nHost: " + echo + "\r\n\r\n"
	if got := <-heads; got != want {
		t.Fatalf("request head = %q, want %q", got, want)
	}
	roundTrip(t, c, "hello")
	checkNoDeadline(t, c, 1100*time.Millisecond, "still open")
}

func TestHTTPConnectBasicAuth(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	heads := make(chan string, 1)
	p := httpProxy(t, "alice", "s3cret:with colon", heads)

	d := &HTTPConnect{Proxy: p.addr, User: "alice", Password: "s3cret:with colon"}
	c, err := d.Dial(context.Background(), echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	if got, want := headerValue(<-heads, "Proxy-Authorization"), "Basic YWxpY2U6czNjcmV0OndpdGggY29sb24="; got != want {
		t.Fatalf("Proxy-Authorization = %q, want %q", got, want)
	}
	roundTrip(t, c, "authorized")

	for _, d := range []*HTTPConnect{
		{Proxy: p.addr, User: "alice", Password: "wrong"},
		{Proxy: p.addr},
	} {
		_, err := d.Dial(context.Background(), echo, netip.AddrPort{})
		head := <-heads
		if d.User == "" && headerValue(head, "Proxy-Authorization") != "" {
			t.Errorf("credentials sent without a user: %q", head)
		}
		wantOpError(t, err, "http connect", p.addr, echo)
		var se *statusError
		if !errors.As(err, &se) || se.code != 407 || !strings.Contains(err.Error(), `"407 Proxy Authentication Required"`) {
			t.Fatalf("error = %v; want it to name the 407 status line", err)
		}
		if isTargetFailure(err) {
			t.Fatal("407 counted as a target failure; it is the proxy refusing us")
		}
	}
}

func TestHTTPConnectEncodesTargets(t *testing.T) {
	testkit.CheckGoroutines(t)
	heads := make(chan string, 1)
	p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
		heads <- readRequestHead(c)
		io.WriteString(c, "HTTP/1.0 200 OK\r\n\r\n")
		io.Copy(io.Discard, c)
	})
	for _, tc := range []struct{ address, authority string }{
		{"example.com:443", "example.com:443"},
		{"[2001:db8::1]:8443", "[2001:db8::1]:8443"},
		{"[::ffff:198.18.0.1]:80", "198.18.0.1:80"},
		{"[fe80::1%eth0]:22", "[fe80::1]:22"},
		{"198.18.0.1:80", "198.18.0.1:80"},
	} {
		c, err := (&HTTPConnect{Proxy: p.addr}).Dial(context.Background(), tc.address, netip.AddrPort{})
		if err != nil {
			t.Fatalf("%s: %v", tc.address, err)
		}
		c.Close()
		want := "CONNECT " + tc.authority + " HTTP/1.1\r\nHost: " + tc.authority + "\r\n\r\n"
		if got := <-heads; got != want {
			t.Errorf("%s: request = %q, want %q", tc.address, got, want)
		}
	}
}

// TestHTTPConnectKeepsBytesAfterHead: a proxy (or the server behind it,
// talking first) may send tunnel bytes in the same segment as the reply
// head; they must come out of the returned *net.TCPConn.
func TestHTTPConnectKeepsBytesAfterHead(t *testing.T) {
	testkit.CheckGoroutines(t)
	for _, reply := range []string{
		"HTTP/1.1 200 Connection established\r\nVia: 1.1 fake\r\n\r\nSSH-2.0-OpenSSH_9.6\r\n",
		"HTTP/1.1 200 OK\n\nSSH-2.0-OpenSSH_9.6\r\n", // bare LFs
	} {
		p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
			readRequestHead(c)
			io.WriteString(c, reply)
			io.Copy(io.Discard, c)
		})
		c, err := (&HTTPConnect{Proxy: p.addr}).Dial(context.Background(), "example.com:22", netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		tc := mustTCP(t, c)
		tc.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, len("SSH-2.0-OpenSSH_9.6\r\n"))
		if _, err := io.ReadFull(tc, got); err != nil || string(got) != "SSH-2.0-OpenSSH_9.6\r\n" {
			t.Fatalf("bytes after the head = %q, %v; lost or mangled", got, err)
		}
	}
}

// TestHTTPConnectHeadAcrossSegments: the head arrives in pieces, the
// terminator itself split, with pauses between.
func TestHTTPConnectHeadAcrossSegments(t *testing.T) {
	testkit.CheckGoroutines(t)
	parts := []string{"HTTP/1.1 20", "0 Connection established\r", "\n", "Via: 1.1 fake\r\n\r", "\nEAR", "LY"}
	p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
		readRequestHead(c)
		for _, part := range parts {
			io.WriteString(c, part)
			time.Sleep(30 * time.Millisecond)
		}
		io.Copy(io.Discard, c)
	})
	c, err := (&HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}).Dial(context.Background(), "example.com:443", netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	tc := mustTCP(t, c)
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, 5)
	if _, err := io.ReadFull(tc, got); err != nil || string(got) != "EARLY" {
		t.Fatalf("bytes after the head = %q, %v", got, err)
	}
}

// headHandshake is an HTTP CONNECT handshake waiting for the reply head.
func headHandshake() *Handshake {
	return &Handshake{http: &HTTPConnect{Proxy: "198.18.0.1:3128"}, state: hsHead}
}

// TestReadHeadEverySplit cuts a reply at every position, the pieces
// arriving apart, and checks readHead takes the head exactly.
func TestReadHeadEverySplit(t *testing.T) {
	testkit.CheckGoroutines(t)
	const head = "HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
	const reply = head + "TAIL"
	for k := 1; k < len(reply); k++ {
		a, b := testkit.TCPPair(t)
		go func() {
			io.WriteString(b, reply[:k])
			time.Sleep(2 * time.Millisecond)
			io.WriteString(b, reply[k:])
		}()
		a.SetDeadline(time.Now().Add(5 * time.Second))
		h := headHandshake()
		if err := h.readHead(a, make([]byte, 512)); err != nil || !h.Done() || h.headLen != int32(len(head)) {
			t.Fatalf("split at %d: head of %d bytes, done %v, %v; want %d", k, h.headLen, h.Done(), err, len(head))
		}
		tail := make([]byte, 4)
		if _, err := io.ReadFull(a, tail); err != nil || string(tail) != "TAIL" {
			t.Fatalf("split at %d: tail = %q, %v", k, tail, err)
		}
	}
}

func TestReadHeadLimit(t *testing.T) {
	testkit.CheckGoroutines(t)
	// A head of exactly the limit is fine; one byte more is not.
	exact := "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", maxReplyHead-len("HTTP/1.1 200 OK\r\nX: \r\n\r\n")) + "\r\n\r\n"
	for _, tc := range []struct {
		reply string
		ok    bool
	}{
		{exact, true},
		{exact[:len(exact)-4] + "a\r\n\r\n", false},
		{"HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: aaaaaaaaaaaaaaaaaaaa\r\n", 2000), false},
	} {
		a, b := testkit.TCPPair(t)
		go io.WriteString(b, tc.reply)
		a.SetDeadline(time.Now().Add(5 * time.Second))
		h := headHandshake()
		err := h.readHead(a, make([]byte, 512))
		if tc.ok && (err != nil || int(h.headLen) != len(tc.reply) || !h.Done()) {
			t.Fatalf("head of %d bytes: %d bytes, %v", len(tc.reply), h.headLen, err)
		}
		if !tc.ok && !errors.Is(err, errHeadTooLarge) {
			t.Fatalf("head of %d+ bytes: err = %v, want errHeadTooLarge", h.headLen, err)
		}
	}
}

// TestHTTPConnectRogueProxy: replies a client must refuse.
func TestHTTPConnectRogueProxy(t *testing.T) {
	for _, tc := range []struct {
		name   string
		serve  func(c *net.TCPConn)
		target bool   // a target failure (502-504)
		want   string // in the error
	}{
		{"403", replyWith("HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n"), false, `"403 Forbidden"`},
		{"502", replyWith("HTTP/1.1 502 Bad Gateway\r\n\r\n"), true, `"502 Bad Gateway"`},
		{"503", replyWith("HTTP/1.1 503 Service Unavailable\r\n\r\n"), true, `"503 Service Unavailable"`},
		{"504", replyWith("HTTP/1.1 504 Gateway Timeout\r\n\r\n"), true, `"504 Gateway Timeout"`},
		{"101", replyWith("HTTP/1.1 101 Switching Protocols\r\n\r\n"), false, `"101 Switching Protocols"`},
		{"no reason", replyWith("HTTP/1.1 404\r\n\r\n"), false, `"404"`},
		{"not HTTP", replyWith("SSH-2.0-OpenSSH_9.6\r\n\r\n"), false, "malformed reply status line"},
		{"HTTP/2", replyWith("HTTP/2 200\r\n\r\n"), false, "malformed reply status line"},
		{"bad code", replyWith("HTTP/1.1 2x0 OK\r\n\r\n"), false, "malformed reply status line"},
		{"code run-on", replyWith("HTTP/1.1 2000 OK\r\n\r\n"), false, "malformed reply status line"},
		{"empty head", replyWith("\r\n\r\n"), false, "malformed reply status line"},
		{"closes before replying", func(c *net.TCPConn) { readRequestHead(c) }, false, "unexpected EOF"},
		{"closes mid-head", replyWith("HTTP/1.1 200 OK\r\nVia: x\r\n"), false, "unexpected EOF"},
		{"resets", func(c *net.TCPConn) { readRequestHead(c); c.SetLinger(0) }, false, "connection reset"},
		{"endless head", replyWith("HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: aaaaaaaaaaaaaaaaaaaa\r\n", 1000)), false, "reply head longer than 16384 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testkit.CheckGoroutines(t)
			p := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) { tc.serve(c) })
			c, err := (&HTTPConnect{Proxy: p.addr, Forward: &net.Dialer{Timeout: 5 * time.Second}}).Dial(context.Background(), "example.com:443", netip.AddrPort{})
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			wantOpError(t, err, "http connect", p.addr, "example.com:443")
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
			if isTargetFailure(err) != tc.target {
				t.Fatalf("isTargetFailure(%v) = %v, want %v", err, !tc.target, tc.target)
			}
		})
	}
}

// replyWith serves one request with reply, then closes.
func replyWith(reply string) func(c *net.TCPConn) {
	return func(c *net.TCPConn) {
		readRequestHead(c)
		io.WriteString(c, reply)
	}
}

func TestHeadEnd(t *testing.T) {
	for _, tc := range []struct {
		b    string
		from int
		want int
	}{
		{"HTTP/1.1 200 OK\r\n\r\nX", 0, 19},
		{"HTTP/1.1 200 OK\n\nX", 0, 17},
		{"HTTP/1.1 200 OK\n\r\nX", 0, 18},
		{"HTTP/1.1 200 OK\r\nA: b\r\n", 0, -1},
		{"HTTP/1.1 200 OK\r\n\r", 0, -1},
		{"HTTP/1.1 200 OK\r\n\r\n", 17, 19},
		{"HTTP/1.1 200 OK\r\n\r\n", 18, 19},
		{"HTTP/1.1 200 OK\r\n\r\n", 16, 19},
	} {
		// The head's end, fed in two pieces split at from: -1 if not found.
		h := headHandshake()
		n1, err1 := h.Feed([]byte(tc.b[:tc.from]))
		n2, err2 := h.Feed([]byte(tc.b[tc.from:]))
		got := n1 + n2
		if !h.Done() {
			got = -1
		}
		if got != tc.want || err1 != nil || err2 != nil {
			t.Errorf("head end of %q split at %d = %d (%v, %v), want %d", tc.b, tc.from, got, err1, err2, tc.want)
		}
	}
}
