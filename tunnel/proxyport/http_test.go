package proxyport

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func reader(s string) *bufio.Reader { return bufio.NewReaderSize(strings.NewReader(s), 16<<10) }

func TestReadRequestAbsoluteForm(t *testing.T) {
	in := "GET http://Site.Test:8080/a/b?c=d HTTP/1.1\r\n" +
		"Host: wrong.test\r\n" +
		"User-Agent: curl/8\r\n" +
		"Connection: foo, Keep-Alive\r\n" +
		"Foo: secret\r\n" +
		"Keep-Alive: timeout=5\r\n" +
		"Proxy-Connection: keep-alive\r\n" +
		"Proxy-Authorization: Basic dTpw\r\n" +
		"TE: trailers\r\n" +
		"Upgrade: websocket\r\n" +
		"Accept: */*\r\n\r\nNEXT"
	br := reader(in)
	r, err := ReadRequest(br, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Host != "site.test" || r.Port != 8080 || r.Path != "/a/b?c=d" || r.Close || r.ProxyAuth != "Basic dTpw" {
		t.Fatalf("got %+v", r)
	}
	got := string(r.AppendHead(nil))
	want := "GET /a/b?c=d HTTP/1.1\r\nHost: site.test:8080\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
	if got != want {
		t.Fatalf("head sent on:\n%q\nwant\n%q", got, want)
	}
	if rest, _ := io.ReadAll(br); string(rest) != "NEXT" {
		t.Fatalf("left in the reader: %q, want the next request's bytes", rest)
	}
}

func TestReadRequestForms(t *testing.T) {
	for _, tc := range []struct {
		line, host, path string
		port             uint16
	}{
		{"GET http://a.test HTTP/1.1", "a.test", "/", 80},
		{"GET http://a.test?x HTTP/1.1", "a.test", "/?x", 80},
		{"GET HTTP://A.TEST./p#frag HTTP/1.1", "a.test", "/p", 80},
		{"GET http://[fd00::1]:81/ HTTP/1.1", "fd00::1", "/", 81},
		{"GET http://198.18.0.1/x HTTP/1.0", "198.18.0.1", "/x", 80},
		{"CONNECT site.test:443 HTTP/1.1", "site.test", "", 443},
		{"CONNECT [fd00::2]:443 HTTP/1.1", "fd00::2", "", 443},
	} {
		r, err := ReadRequest(reader(tc.line+"\r\n\r\n"), Limits{})
		if err != nil {
			t.Errorf("%q: %v", tc.line, err)
			continue
		}
		if r.Host != tc.host || r.Port != tc.port || r.Path != tc.path {
			t.Errorf("%q: host %q port %d path %q, want %q %d %q", tc.line, r.Host, r.Port, r.Path, tc.host, tc.port, tc.path)
		}
	}
}

func TestReadRequestRefused(t *testing.T) {
	long := "GET http://a.test/" + strings.Repeat("a", 1<<20) + " HTTP/1.1\r\n\r\n"
	for _, tc := range []struct {
		name, in string
		status   int
	}{
		{"1 MiB request line", long, 414},
		{"huge header line", "GET http://a.test/ HTTP/1.1\r\nX: " + strings.Repeat("b", 20<<10) + "\r\n\r\n", 431},
		{"too many fields", "GET http://a.test/ HTTP/1.1\r\n" + strings.Repeat("X: y\r\n", 200) + "\r\n", 431},
		{"origin-form", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
		{"https absolute", "GET https://a.test/ HTTP/1.1\r\n\r\n", 400},
		{"userinfo", "GET http://u:p@a.test/ HTTP/1.1\r\n\r\n", 400},
		{"connect without port", "CONNECT a.test HTTP/1.1\r\n\r\n", 400},
		{"HTTP/2", "GET http://a.test/ HTTP/2.0\r\n\r\n", 505},
		{"CL and TE", "POST http://a.test/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
		{"TE not chunked", "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400},
		{"two lengths", "POST http://a.test/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400},
		{"bad length", "POST http://a.test/ HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400},
		{"two hosts", "GET http://a.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"folding", "GET http://a.test/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400},
		{"space before colon", "GET http://a.test/ HTTP/1.1\r\nX : a\r\n\r\n", 400},
		{"bare CR", "GET http://a.test/ HTTP/1.1\r\nX: a\rb\r\n\r\n", 400},
		{"bad host", "GET http://a_b..c/ HTTP/1.1\r\n\r\n", 400},
		{"truncated", "GET http://a.test/ HTTP/1.1\r\nX: a", 0},
	} {
		_, err := ReadRequest(reader(tc.in), Limits{})
		var pe *Error
		if !errors.As(err, &pe) || pe.Status != tc.status {
			t.Errorf("%s: got %v, want status %d", tc.name, err, tc.status)
		}
	}
	if _, err := ReadRequest(reader(""), Limits{}); err != io.EOF {
		t.Errorf("empty: got %v, want io.EOF", err)
	}
}

// A Connection option naming a framing field must not make the proxy drop
// it: the next hop would read the body as the next request.
func TestConnectionCannotDropFraming(t *testing.T) {
	in := "POST http://a.test/ HTTP/1.1\r\nConnection: Content-Length, host, transfer-encoding\r\nContent-Length: 5\r\n\r\nhello"
	r, err := ReadRequest(reader(in), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	got := string(r.AppendHead(nil))
	if !strings.Contains(got, "Content-Length: 5\r\n") || !strings.Contains(got, "Host: a.test\r\n") || strings.Contains(got, "Connection") {
		t.Fatalf("head %q", got)
	}
}

func TestHTTP10(t *testing.T) {
	r, err := ReadRequest(reader("GET http://a.test/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Close {
		t.Fatal("an HTTP/1.0 request must close the connection")
	}
	if got := string(r.AppendHead(nil)); got != "GET / HTTP/1.0\r\nHost: a.test\r\nConnection: close\r\n\r\n" {
		t.Fatalf("head %q", got)
	}
}

func TestCopyBody(t *testing.T) {
	chunked := "5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"
	var out bytes.Buffer
	br := reader(chunked + "NEXT")
	n, err := CopyBody(&out, br, true, 0)
	if err != nil || out.String() != chunked || n != int64(len(chunked)) {
		t.Fatalf("chunked: %d %v %q", n, err, out.String())
	}
	if rest, _ := io.ReadAll(br); string(rest) != "NEXT" {
		t.Fatalf("left %q", rest)
	}
	out.Reset()
	if _, err := CopyBody(&out, reader("abcdefNEXT"), false, 6); err != nil || out.String() != "abcdef" {
		t.Fatalf("length: %v %q", err, out.String())
	}
	for _, bad := range []string{"x\r\n", "5\r\nhelloXX", "5\r\nhel", "fffffffffffffffffff\r\n", "5\x01\r\nhello\r\n0\r\n\r\n",
		"0\r\n" + strings.Repeat("T: v\r\n", 4000)} {
		if _, err := CopyBody(io.Discard, reader(bad), true, 0); err == nil {
			t.Errorf("chunked %q: no error", bad[:min(len(bad), 30)])
		}
	}
	if _, err := CopyBody(io.Discard, reader("abc"), false, 6); err != io.ErrUnexpectedEOF {
		t.Errorf("short body: %v", err)
	}
}

func TestReadResponse(t *testing.T) {
	for _, tc := range []struct {
		in, method      string
		noBody, chunked bool
		length          int64
		close           bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "GET", false, false, 3, false},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", false, true, -1, false},
		{"HTTP/1.1 200 OK\r\n\r\n", "GET", false, false, -1, true},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD", true, false, -1, false},
		{"HTTP/1.1 304 Not Modified\r\n\r\n", "GET", true, false, -1, false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n", "GET", false, false, 3, true},
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n", "GET", false, false, 3, true},
	} {
		resp, err := ReadResponse(reader(tc.in), Limits{}, tc.method)
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		if resp.NoBody != tc.noBody || resp.Chunked != tc.chunked || resp.ContentLength != tc.length || resp.Close != tc.close {
			t.Errorf("%q: %+v", tc.in, resp)
		}
	}
	resp, _ := ReadResponse(reader("HTTP/1.1 200 OK\r\nConnection: bar\r\nBar: 1\r\nKeep-Alive: x\r\nX: y\r\n\r\n"), Limits{}, "GET")
	if got := string(resp.AppendHead(nil, 1, true)); got != "HTTP/1.1 200 OK\r\nX: y\r\nConnection: close\r\n\r\n" {
		t.Fatalf("response head %q", got)
	}
	for _, bad := range []string{"HTTP/1.1 2000 OK\r\n\r\n", "ICY 200 OK\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "HTTP/1.1 200"} {
		if _, err := ReadResponse(reader(bad), Limits{}, "GET"); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestBasic(t *testing.T) {
	u, p, ok := Basic("Basic dXNlcjpwYTpzcw==")
	if !ok || u != "user" || p != "pa:ss" {
		t.Fatalf("%q %q %v", u, p, ok)
	}
	for _, bad := range []string{"", "Bearer x", "Basic !!", "Basic dXNlcg=="} {
		if _, _, ok := Basic(bad); ok {
			t.Errorf("%q accepted", bad)
		}
	}
	users := Users{"alice": "secret"}
	if !users.Check("alice", "secret") || users.Check("alice", "secreT") || users.Check("bob", "secret") || users.Check("", "") {
		t.Fatal("Check")
	}
}

func TestDetect(t *testing.T) {
	for b, want := range map[byte]Kind{5: SOCKS5, 4: SOCKS4, 'G': HTTP, 'C': HTTP, 0x16: Unknown, 'g': Unknown, 0: Unknown} {
		if got := Detect(b); got != want {
			t.Errorf("Detect(%#x) = %v, want %v", b, got, want)
		}
	}
}
