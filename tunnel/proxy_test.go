package tunnel

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/tunnel/proxyport"
)

func notLocal(netip.Addr) bool { return false }

// startProxy serves a proxy port on loopback; it returns its address and
// the log.
func startProxy(t *testing.T, p *ProxyPort, tun *Tunnel) (string, *testkit.LogBuffer) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	if tun == nil {
		tun = &Tunnel{}
	}
	logs := startTunnel(t, &proxyListener{TCPListener: ln, port: p}, tun)
	return ln.Addr().String(), logs
}

// recordingServer is an HTTP server that answers with its name and keeps
// the requests it got.
type recordingServer struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []*http.Request
}

func newRecordingServer(t *testing.T, name string) *recordingServer {
	s := &recordingServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		s.mu.Lock()
		s.reqs = append(s.reqs, r)
		s.mu.Unlock()
		fmt.Fprintf(w, "%s got %s %s body=%q", name, r.Method, r.URL.Path, body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *recordingServer) requests() []*http.Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*http.Request(nil), s.reqs...)
}

func dialProxyPort(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func readResponse(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func TestProxyForwardStripsHopByHop(t *testing.T) {
	srv := newRecordingServer(t, "one")
	addr, logs := startProxy(t, &ProxyPort{IsLocal: notLocal}, nil)
	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "POST http://%s/path?q=1 HTTP/1.1\r\nHost: wrong.test\r\nConnection: Foo, keep-alive\r\nFoo: secret\r\n"+
		"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers\r\n"+
		"X-Kept: 1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", srv.Listener.Addr())
	resp, body := readResponse(t, br, "POST")
	if resp.StatusCode != 200 || body != `one got POST /path body="hello"` {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
	got := srv.requests()[0]
	for _, h := range []string{"Connection", "Foo", "Keep-Alive", "Proxy-Connection", "Proxy-Authorization", "Te"} {
		if v, ok := got.Header[h]; ok {
			t.Errorf("server saw %s: %q", h, v)
		}
	}
	if got.Host != srv.Listener.Addr().String() || got.Header.Get("X-Kept") != "1" || got.URL.RawQuery != "q=1" {
		t.Errorf("server saw Host %q, X-Kept %q, query %q", got.Host, got.Header.Get("X-Kept"), got.URL.RawQuery)
	}
	logs.WaitFor(t, "inbound=proxy")
	if !strings.Contains(logs.String(), "request=http") || !strings.Contains(logs.String(), "status=200") {
		t.Errorf("access line: %s", logs)
	}
}

// Two pipelined requests for two servers on one connection: each goes to
// its own server, the responses come back in order.
func TestProxyPipelinedToTwoServers(t *testing.T) {
	one, two := newRecordingServer(t, "one"), newRecordingServer(t, "two")
	addr, _ := startProxy(t, &ProxyPort{IsLocal: notLocal}, nil)
	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "GET http://%s/a HTTP/1.1\r\nHost: x\r\n\r\nGET http://%s/b HTTP/1.1\r\nHost: y\r\n\r\nGET http://%s/c HTTP/1.1\r\n\r\n",
		one.Listener.Addr(), two.Listener.Addr(), one.Listener.Addr())
	for _, want := range []string{`one got GET /a body=""`, `two got GET /b body=""`, `one got GET /c body=""`} {
		if _, body := readResponse(t, br, "GET"); body != want {
			t.Fatalf("got %q, want %q", body, want)
		}
	}
	if len(one.requests()) != 2 || len(two.requests()) != 1 {
		t.Fatalf("one got %d, two got %d", len(one.requests()), len(two.requests()))
	}
}

func TestProxyConnectAndSOCKS(t *testing.T) {
	echo, _ := echoServer(t)
	addr, logs := startProxy(t, &ProxyPort{IsLocal: notLocal}, nil)

	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nearly", echo, echo)
	resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "early" {
		t.Fatalf("echo of the bytes sent with CONNECT: %q %v", buf, err)
	}

	c2, br2 := dialProxyPort(t, addr)
	a4 := echo.Addr().As4()
	c2.Write([]byte{5, 1, 0, 5, 1, 0, 1, a4[0], a4[1], a4[2], a4[3], byte(echo.Port() >> 8), byte(echo.Port())})
	rep := make([]byte, 12)
	if _, err := io.ReadFull(br2, rep); err != nil || rep[0] != 5 || rep[1] != 0 || rep[3] != 0 {
		t.Fatalf("SOCKS5: %x %v", rep, err)
	}
	c2.Write([]byte("ping"))
	if _, err := io.ReadFull(br2, buf[:4]); err != nil || string(buf[:4]) != "ping" {
		t.Fatalf("SOCKS5 echo %q %v", buf[:4], err)
	}
	c.Close()
	c2.Close()
	logs.WaitFor(t, "request=socks5")
	logs.WaitFor(t, "request=connect")
}

func TestProxyRefusals(t *testing.T) {
	echo, accepted := echoServer(t)
	// Outside allow: reset, nothing dialled.
	addr, logs := startProxy(t, &ProxyPort{Allow: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, IsLocal: notLocal}, nil)
	// The reset may come before connect(2) has returned.
	if c, err := net.Dial("tcp", addr); err == nil {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", echo)
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a client outside allow got an answer")
		}
		c.Close()
	}
	logs.WaitFor(t, "not in the proxy port's allow list")

	// The gateway's own address: refused unless a rule routes it.
	addr, logs = startProxy(t, &ProxyPort{}, nil)
	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", echo)
	if resp, _ := readResponse(t, br, "CONNECT"); resp.StatusCode != 403 {
		t.Fatalf("local target: %d", resp.StatusCode)
	}
	logs.WaitFor(t, "destination is the gateway itself")
	tun := &Tunnel{}
	tun.SetRouter(&Router{Rules: []Rule{{CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, Inbounds: []Inbound{ProxyInbound}}}})
	addr, _ = startProxy(t, &ProxyPort{}, tun)
	c, br = dialProxyPort(t, addr)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", echo)
	if resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("local target with a rule: %v %v", resp, err)
	}
	// The echo server counts a connection when its accept returns, maybe
	// after the 200 came: its echo comes after. (Any connection dialled
	// before, wrongly, was in its accept queue ahead of this one.)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprint(c, "ping")
	b := make([]byte, 4)
	if _, err := io.ReadFull(br, b); err != nil || string(b) != "ping" {
		t.Fatalf("through the tunnel to the echo server: %q %v", b, err)
	}
	if n := int(accepted.Load()); n != 1 {
		t.Fatalf("echo server accepted %d connections, want 1 (the one a rule allowed)", n)
	}

	// Bad input.
	addr, _ = startProxy(t, &ProxyPort{IsLocal: notLocal}, nil)
	for _, tc := range []struct {
		name, in string
		status   int
	}{
		{"garbage first byte", "\x16\x03\x01garbage", 400},
		{"1 MiB request line", "GET http://a.test/" + strings.Repeat("a", 1<<20) + " HTTP/1.1\r\n\r\n", 414},
		{"origin-form", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
	} {
		c, br := dialProxyPort(t, addr)
		go c.Write([]byte(tc.in))
		resp, body := readResponse(t, br, "GET")
		if resp.StatusCode != tc.status || !strings.Contains(body, "detour") {
			t.Errorf("%s: %d %q", tc.name, resp.StatusCode, body)
		}
	}
}

func TestProxyAuth(t *testing.T) {
	echo, _ := echoServer(t)
	addr, logs := startProxy(t, &ProxyPort{IsLocal: notLocal, Users: proxyport.Users{"alice": "s3cret"}}, nil)
	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6d3JvbmdwYXNz\r\n\r\n", echo) // alice:wrongpass
	resp, _ := readResponse(t, br, "CONNECT")
	if resp.StatusCode != 407 || resp.Header.Get("Proxy-Authenticate") == "" {
		t.Fatalf("wrong password: %d %v", resp.StatusCode, resp.Header)
	}
	c, br = dialProxyPort(t, addr)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n", echo) // alice:s3cret
	if resp, err := http.ReadResponse(br, &http.Request{Method: "CONNECT"}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("right password: %v %v", resp, err)
	}
	c, br = dialProxyPort(t, addr)
	c.Write([]byte("\x05\x01\x02\x01\x05alice\x09wrongpass"))
	rep := make([]byte, 4)
	if _, err := io.ReadFull(br, rep); err != nil || string(rep) != "\x05\x02\x01\x01" {
		t.Fatalf("SOCKS5 wrong password: %x %v", rep, err)
	}
	logs.WaitFor(t, `user \"alice\"`)
	logs.WaitFor(t, "wrong user name or password")
	if strings.Contains(logs.String(), "wrongpass") {
		t.Fatalf("the log has the password:\n%s", logs)
	}
}

// Bodies stream both ways: the server reads the first chunk of an upload
// before the client has sent the rest, and a response that takes longer
// than the idle timeout in all, but never stalls that long, gets through.
func TestProxyStreamsBodies(t *testing.T) {
	firstChunk := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" {
			buf := make([]byte, 5)
			if _, err := io.ReadFull(r.Body, buf); err != nil || string(buf) != "first" {
				t.Errorf("first chunk: %q %v", buf, err)
			}
			close(firstChunk)
			rest, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "got %q", rest)
			return
		}
		for i := range 8 {
			fmt.Fprintf(w, "part %d\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(60 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	addr, _ := startProxy(t, &ProxyPort{IsLocal: notLocal}, &Tunnel{IdleTimeout: 200 * time.Millisecond})
	c, br := dialProxyPort(t, addr)
	fmt.Fprintf(c, "POST http://%s/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n", srv.Listener.Addr())
	select {
	case <-firstChunk:
	case <-time.After(5 * time.Second):
		t.Fatal("the server did not get the first chunk before the body was complete")
	}
	fmt.Fprintf(c, "4\r\nrest\r\n0\r\n\r\n")
	if _, body := readResponse(t, br, "POST"); body != `got "rest"` {
		t.Fatalf("upload: %q", body)
	}
	fmt.Fprintf(c, "GET http://%s/slow HTTP/1.1\r\n\r\n", srv.Listener.Addr())
	resp, body := readResponse(t, br, "GET")
	if resp.StatusCode != 200 || !strings.HasSuffix(body, "part 7\n") {
		t.Fatalf("slow response (480 ms, idle timeout 200 ms): %d %q", resp.StatusCode, body)
	}
}

// Requests to the same destination on one client connection share one
// connection to it; a request for another destination opens its own.
func TestProxyKeepsOriginConnection(t *testing.T) {
	var mu sync.Mutex
	conns := map[string]int{}
	newServer := func(name string) *httptest.Server {
		s := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, name) }))
		s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				mu.Lock()
				conns[name]++
				mu.Unlock()
			}
		}
		s.Start()
		t.Cleanup(s.Close)
		return s
	}
	one, two := newServer("one"), newServer("two")
	addr, _ := startProxy(t, &ProxyPort{IsLocal: notLocal}, nil)
	c, br := dialProxyPort(t, addr)
	for _, s := range []*httptest.Server{one, one, one, two, one} {
		fmt.Fprintf(c, "GET http://%s/ HTTP/1.1\r\n\r\n", s.Listener.Addr())
		readResponse(t, br, "GET")
	}
	mu.Lock()
	defer mu.Unlock()
	if conns["one"] != 2 || conns["two"] != 1 {
		t.Fatalf("connections to the servers: %v, want one 2 (three requests, then one after two's), two 1", conns)
	}
}
