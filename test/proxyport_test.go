package test

// End-to-end tests of the explicit proxy port (--proxy-listen): real
// clients in the client namespace (curl as HTTP proxy client, with CONNECT
// and with SOCKS5 and SOCKS4a; Chromium with http:// and socks5:// proxies;
// python requests with HTTP_PROXY) use detour in the gateway as their
// proxy; the rules send one name through dante in the upstream namespace
// and others direct. Raw clients check what the proxy port does with
// hop-by-hop fields, pipelined requests and bad input.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const (
	proxyPortPort = 8080 // detour's proxy port in these tests
	headersPort   = 8088 // the server namespace's header-echo server
)

// headerServer answers every request with the address it came in on, the
// Host it named and its header fields, one per line; it counts requests.
func headerServer(t *testing.T, tp *topo) *atomic.Int64 {
	t.Helper()
	var n atomic.Int64
	ln := listenIn(t, tp.S, fmt.Sprintf("[::]:%d", headersPort))
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		body, _ := io.ReadAll(r.Body)
		local := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		host, _, _ := net.SplitHostPort(local.String())
		fmt.Fprintf(w, "local=%s\nhost=%s\npath=%s\nbody=%s\n", host, r.Host, r.URL.RequestURI(), body)
		names := make([]string, 0, len(r.Header))
		for k := range r.Header {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			fmt.Fprintf(w, "%s: %s\n", k, strings.Join(r.Header[k], ", "))
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return &n
}

// rawProxy connects to detour's proxy port from the client namespace.
func rawProxy(t *testing.T, tp *topo, addr string) (*net.TCPConn, *bufio.Reader) {
	t.Helper()
	c, err := dialIn(t, tp.C, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response body: %v", err)
	}
	return resp, string(b)
}

// gatewayServerSide is the gateway's address towards the server, where a
// direct connection comes from.
func gatewayServerSide(f family) string {
	for addr, who := range carriers {
		if who == byDirect && strings.Contains(addr, ":") == strings.Contains(f.server, ":") {
			return addr
		}
	}
	return ""
}

// rss is a process's resident memory in KiB.
func rss(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func TestProxyPort(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	served := headerServer(t, tp)
	v4, v6 := families[0], families[1]
	ps := startProxies(t, tp, map[string]string{"b.viadante.test": v4.server, "one.proxy.test": v4.server})
	writeHosts(t, tp.G, map[string]string{"one.proxy.test": v4.server, "two.proxy.test": v6.server})
	config := fmt.Sprintf(`groups:
  - name: viadante
    upstreams: [%q]
rules:
  - domain_suffix: viadante.test
    inbound: proxy
    action: viadante
  - domain: blocked.proxy.test
    action: reject
default: direct
proxy:
  listen: ["[::]:%d"]
`, proxyURL("socks5", "", v4, dantePort), proxyPortPort)
	path := filepath.Join(t.TempDir(), "detour.yaml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startChecked(t, tp, "--listen", fmt.Sprintf(":%d", listenPort), "--config", path, "--metrics", "127.0.0.1:9101",
		"--udp-dns-timeout", "500ms")
	d.waitLog(t, 10*time.Second, "proxy port listening", nil)
	proxy4 := net.JoinHostPort(v4.gateway, strconv.Itoa(proxyPortPort))
	proxy6 := net.JoinHostPort(v6.gateway, strconv.Itoa(proxyPortPort))
	_, _, idleFDs := d.stats(t)

	curl := func(args ...string) (string, error) {
		t.Helper()
		out, err := tp.exec(t, tp.C, append([]string{"curl", "-sS", "-k", "-m", "10"}, args...)...)
		if err != nil {
			return out, fmt.Errorf("curl %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return out, nil
	}

	t.Run("curl http and https", func(t *testing.T) {
		for _, proxy := range []string{proxy4, proxy6} {
			for _, url := range []string{"http://one.proxy.test/", "https://one.proxy.test/", "http://two.proxy.test/"} {
				out, err := curl("-x", "http://"+proxy, url)
				if err != nil {
					t.Fatal(err)
				}
				if who, err := carrierOf(out); err != nil || who != byDirect {
					t.Fatalf("curl -x %s %s: carried by %q (%v)", proxy, url, who, err)
				}
			}
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "request": "connect", "host": "one.proxy.test"})
		if rec["route"] != "direct" || rec["dst"] != net.JoinHostPort(v4.server, "443") || rec["sni"] != "one.proxy.test" || rec["sni_mismatch"] != nil {
			t.Errorf("CONNECT access line = %v", rec)
		}
		// A TLS name other than the CONNECT host is flagged: curl asks the
		// proxy for two.proxy.test but says one.proxy.test in its hello.
		if out, err := curl("-x", "http://"+proxy4, "--connect-to", "one.proxy.test:443:two.proxy.test:443", "https://one.proxy.test/"); err != nil {
			t.Fatal(err, out)
		}
		rec = d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "request": "connect", "host": "two.proxy.test"})
		if rec["sni"] != "one.proxy.test" || rec["sni_mismatch"] != true {
			t.Errorf("CONNECT two.proxy.test with SNI one.proxy.test: access line = %v", rec)
		}
		rec = d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "request": "http", "host": "two.proxy.test"})
		if rec["route"] != "direct" || rec["dst"] != net.JoinHostPort(v6.server, "80") || toInt(rec["status"]) != 200 {
			t.Errorf("forwarded request's access line = %v", rec)
		}
	})

	t.Run("curl socks5-hostname through dante and direct", func(t *testing.T) {
		out, err := curl("--socks5-hostname", proxy4, "http://b.viadante.test/")
		if err != nil {
			t.Fatal(err)
		}
		if who, err := carrierOf(out); err != nil || who != byDante {
			t.Fatalf("b.viadante.test carried by %q (%v), want dante", who, err)
		}
		if n := waitCount(5*time.Second, 1, func() int { return ps.requests("b.viadante.test", 80)[byDante] }); n != 1 {
			t.Errorf("dante logged %d requests for the name b.viadante.test:80, want 1", n)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": "b.viadante.test"})
		if rec["route"] != "viadante" || rec["request"] != "socks5" || rec["target"] != "b.viadante.test:80" {
			t.Errorf("access line = %v", rec)
		}
		// The same name over HTTP goes through dante too; another name direct.
		out, err = curl("-x", "http://"+proxy4, "https://b.viadante.test/")
		if who, err2 := carrierOf(out); err != nil || err2 != nil || who != byDante {
			t.Fatalf("CONNECT b.viadante.test carried by %q (%v %v), want dante", who, err, err2)
		}
		out, err = curl("--socks5-hostname", proxy6, "https://one.proxy.test/")
		if who, err2 := carrierOf(out); err != nil || err2 != nil || who != byDirect {
			t.Fatalf("one.proxy.test carried by %q (%v %v), want direct", who, err, err2)
		}
		out, err = curl("--socks4a", proxy4, "http://one.proxy.test/")
		if who, err2 := carrierOf(out); err != nil || err2 != nil || who != byDirect {
			t.Fatalf("SOCKS4a: carried by %q (%v %v), want direct", who, err, err2)
		}
		if _, err := curl("-f", "-x", "http://"+proxy4, "http://blocked.proxy.test/"); err == nil {
			t.Error("a name the rules reject was fetched")
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": "blocked.proxy.test", "route": "reject"})
	})

	t.Run("chromium", func(t *testing.T) {
		bin, err := exec.LookPath("chromium")
		if err != nil {
			t.Fatal("chromium is not installed (scripts/install-deps.sh installs it)")
		}
		for _, tc := range []struct{ proxy, url, request string }{
			{"http://" + proxy4, "http://one.proxy.test/", "http"},
			{"http://" + proxy4, "https://one.proxy.test/", "connect"},
			{"socks5://" + proxy4, "https://two.proxy.test/", "socks5"},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			cmd := exec.CommandContext(ctx, "ip", "netns", "exec", tp.C, bin,
				"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
				"--disable-background-networking", "--disable-component-update", "--disable-sync",
				"--ignore-certificate-errors", "--user-data-dir="+t.TempDir(),
				// Names are the proxy's to resolve; the proxy's own IP
				// literal must stay out of the catch-all rule.
				"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE "+v4.gateway, "--proxy-server="+tc.proxy,
				"--disable-features=NetworkTimeServiceQuerying",
				"--dump-dom", tc.url)
			out, err := cmd.Output()
			cancel()
			if who, err2 := carrierOf(string(out)); err != nil || err2 != nil || who != byDirect {
				t.Fatalf("chromium --proxy-server=%s %s: %q, %v %v\n%s", tc.proxy, tc.url, who, err, err2, out)
			}
			host := strings.TrimSuffix(strings.SplitN(tc.url, "//", 2)[1], "/")
			d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": host, "request": tc.request})
		}
	})

	t.Run("python requests with HTTP_PROXY", func(t *testing.T) {
		if err := exec.Command("/usr/bin/python3", "-c", "import requests").Run(); err != nil {
			t.Fatal("python3-requests is not installed (scripts/install-deps.sh installs it)")
		}
		out, err := tp.exec(t, tp.C, "env", "HTTP_PROXY=http://"+proxy4, "/usr/bin/python3", "-c",
			`import requests; print(requests.get("http://one.proxy.test/py", timeout=10).text)`)
		if who, err2 := carrierOf(out); err != nil || err2 != nil || who != byDirect {
			t.Fatalf("python requests: %q %v %v\n%s", who, err, err2, out)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": "one.proxy.test", "request": "http"})
		if rec["route"] != "direct" {
			t.Errorf("access line = %v", rec)
		}
	})

	t.Run("hop-by-hop fields removed and Host rewritten", func(t *testing.T) {
		c, br := rawProxy(t, tp, proxy4)
		fmt.Fprintf(c, "POST http://one.proxy.test:%d/form?x=1 HTTP/1.1\r\nHost: wrong.test\r\nConnection: Foo, keep-alive\r\n"+
			"Foo: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic dTpw\r\n"+
			"TE: trailers\r\nUpgrade: h2c\r\nX-End-To-End: kept\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", headersPort)
		resp, body := readResp(t, br, "POST")
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		for _, bad := range []string{"Connection:", "Foo:", "Keep-Alive:", "Proxy-Connection:", "Proxy-Authorization:", "Te:", "Upgrade:", "wrong.test"} {
			if strings.Contains(body, bad) {
				t.Errorf("the server saw %q:\n%s", bad, body)
			}
		}
		for _, want := range []string{fmt.Sprintf("host=one.proxy.test:%d\n", headersPort), "path=/form?x=1\n", "body=hello\n", "X-End-To-End: kept\n"} {
			if !strings.Contains(body, want) {
				t.Errorf("the server did not see %q:\n%s", want, body)
			}
		}
	})

	t.Run("pipelined requests to two hosts", func(t *testing.T) {
		c, br := rawProxy(t, tp, proxy4)
		// One write: both requests are in the proxy's buffer before the
		// first is routed.
		fmt.Fprintf(c, "GET http://one.proxy.test:%d/first HTTP/1.1\r\nHost: one.proxy.test\r\n\r\n"+
			"GET http://two.proxy.test:%d/second HTTP/1.1\r\nHost: two.proxy.test\r\n\r\n", headersPort, headersPort)
		for _, want := range []struct{ local, path string }{{v4.server, "/first"}, {v6.server, "/second"}} {
			_, body := readResp(t, br, "GET")
			if !strings.Contains(body, "local="+want.local+"\n") || !strings.Contains(body, "path="+want.path+"\n") {
				t.Errorf("response for %s: %s", want.path, body)
			}
		}
		c.Close()
		for _, host := range []string{"one.proxy.test", "two.proxy.test"} {
			rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": host, "dst": net.JoinHostPort(map[string]string{"one.proxy.test": v4.server, "two.proxy.test": v6.server}[host], strconv.Itoa(headersPort))})
			if rec["route"] != "direct" {
				t.Errorf("access line = %v", rec)
			}
		}
	})

	t.Run("the gateway itself is refused", func(t *testing.T) {
		before := len(d.find("conn", map[string]string{"inbound": "transparent"}))
		c, br := rawProxy(t, tp, proxy4)
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", net.JoinHostPort(v4.gateway, strconv.Itoa(listenPort)))
		if resp, body := readResp(t, br, "CONNECT"); resp.StatusCode != 403 || !strings.Contains(body, "gateway itself") {
			t.Errorf("CONNECT to detour's own listener: %d %s", resp.StatusCode, body)
		}
		time.Sleep(200 * time.Millisecond)
		if after := len(d.find("conn", map[string]string{"inbound": "transparent"})); after != before {
			t.Errorf("the transparent listener served %d connections; nothing may be dialled", after-before)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		pid := d.cmd.Process.Pid
		rssBefore := rss(t, pid)
		for _, tc := range []struct {
			name, in string
			status   int
		}{
			{"garbage first byte", "\x16\x03\x01\x02\x00garbage", 400},
			{"1 MiB request line", "GET http://one.proxy.test/" + strings.Repeat("a", 1<<20) + " HTTP/1.1\r\n\r\n", 414},
		} {
			for range 5 {
				c, br := rawProxy(t, tp, proxy4)
				go c.Write([]byte(tc.in))
				resp, body := readResp(t, br, "GET")
				if resp.StatusCode != tc.status || !strings.Contains(body, "detour:") {
					t.Fatalf("%s: %d %q", tc.name, resp.StatusCode, body)
				}
				c.Close()
			}
			d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "error": map[int]string{
				400: "first byte 0x16 is not HTTP (a method's letter), SOCKS5 (0x05) or SOCKS4 (0x04)",
				414: "414 URI Too Long: request line longer than 8192 bytes"}[tc.status]})
		}
		if grown := rss(t, pid) - rssBefore; grown > 16<<10 {
			t.Errorf("detour's RSS grew by %d KiB over five 1 MiB request lines", grown)
		}

		// A SOCKS5 greeting with 255 methods, none acceptable.
		c, br := rawProxy(t, tp, proxy4)
		greeting := []byte{5, 255}
		for i := range 255 {
			greeting = append(greeting, byte(3+i%250))
		}
		c.Write(greeting)
		reply := make([]byte, 2)
		if _, err := io.ReadFull(br, reply); err != nil || reply[0] != 5 || reply[1] != 0xff {
			t.Errorf("255-method greeting: reply %x, %v; want 05ff", reply, err)
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "request": "socks",
			"error": `none of the greeting's 255 methods is "no authentication"`})

		// Truncated requests: the client gives up half-way.
		for _, part := range []string{"CONNECT one.proxy.test:4", "\x05\x01\x00\x05\x01\x00\x03\x0eone.pro"} {
			c, br := rawProxy(t, tp, proxy4)
			c.Write([]byte(part))
			c.CloseWrite()
			if b, _ := io.ReadAll(br); strings.HasPrefix(string(b), "HTTP/1.1 200") || strings.HasPrefix(string(b), "\x05\x00\x05\x00") {
				t.Errorf("truncated %q got a success: %q", part, b)
			}
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "error": "reading the request line: unexpected EOF"})
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "error": "reading the domain name: unexpected EOF"})

		// Still serving, and back to idle.
		if out, err := curl("-x", "http://"+proxy4, "http://one.proxy.test/"); err != nil {
			t.Fatalf("after bad input: %v %s", err, out)
		}
		var active, fds int
		waitFor(t, 10*time.Second, "detour back to idle", func() bool {
			active, _, fds = d.stats(t)
			return active == 0 && fds <= idleFDs+2
		})
	})

	t.Run("credentials and allow list", func(t *testing.T) {
		// A second detour: users required, and a proxy port that only
		// 10.0.0.0/8 may use.
		cfg2 := filepath.Join(t.TempDir(), "auth.yaml")
		if err := os.WriteFile(cfg2, []byte(fmt.Sprintf(`proxy:
  listen: ["[::]:%d"]
  users: ["alice:%s"]
`, proxyPortPort+1, proxyPass)), 0o600); err != nil {
			t.Fatal(err)
		}
		d2 := startChecked(t, tp, "--listen", fmt.Sprintf(":%d", listenPort+1), "--config", cfg2,
			"--proxy-listen", fmt.Sprintf("[::]:%d", proxyPortPort+2), "--proxy-allow", "10.0.0.0/8")
		d2.waitLog(t, 10*time.Second, "proxy port listening", nil)
		if err := os.WriteFile(cfg2, nil, 0o600); err != nil { // --proxy-listen overrides the file's listen
			t.Fatal(err)
		}
		// Only the flag's port listens: the file's listen is overridden.
		if _, err := dialIn(t, tp.C, net.JoinHostPort(v4.gateway, strconv.Itoa(proxyPortPort+1))); err == nil {
			t.Error("the config file's proxy.listen was used though --proxy-listen was given")
		}
		before := served.Load()
		addr := net.JoinHostPort(v4.gateway, strconv.Itoa(proxyPortPort+2))
		if out, err := curl("-x", "http://alice:"+proxyPass+"@"+addr, fmt.Sprintf("http://one.proxy.test:%d/", headersPort)); err == nil {
			t.Errorf("a client outside --proxy-allow was served: %s", out)
		}
		d2.waitLog(t, 5*time.Second, "refused", map[string]string{"inbound": "proxy", "error": "client address not in the proxy port's allow list"})
		if served.Load() != before {
			t.Error("a request from outside the allow list reached the server")
		}
	})

	t.Run("wrong credentials", func(t *testing.T) {
		cfg3 := filepath.Join(t.TempDir(), "users.yaml")
		if err := os.WriteFile(cfg3, []byte(fmt.Sprintf("proxy:\n  listen: [\"[::]:%d\"]\n  users: [\"alice:%s\"]\n", proxyPortPort+3, proxyPass)), 0o600); err != nil {
			t.Fatal(err)
		}
		d3 := startChecked(t, tp, "--listen", fmt.Sprintf(":%d", listenPort+2), "--config", cfg3)
		d3.waitLog(t, 10*time.Second, "proxy port listening", nil)
		addr := net.JoinHostPort(v4.gateway, strconv.Itoa(proxyPortPort+3))
		out, _ := tp.exec(t, tp.C, "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", "http://alice:"+wrongPass+"@"+addr, "http://one.proxy.test/")
		if out != "407" {
			t.Errorf("wrong Basic credentials: %q, want 407", out)
		}
		if _, err := curl("-x", "socks5h://alice:"+wrongPass+"@"+addr, "http://one.proxy.test/"); err == nil {
			t.Error("wrong SOCKS5 credentials were accepted")
		}
		if out, err := curl("-x", "socks5h://alice:"+proxyPass+"@"+addr, "http://one.proxy.test/"); err != nil {
			t.Errorf("right SOCKS5 credentials: %v %s", err, out)
		}
		if out, err := curl("-x", "http://alice:"+proxyPass+"@"+addr, "https://one.proxy.test/"); err != nil {
			t.Errorf("right Basic credentials: %v %s", err, out)
		}
		d3.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "error": `wrong or missing credentials (user "alice")`})
		d3.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "error": "wrong user name or password"})
		if strings.Contains(d3.rawLog(), wrongPass) || strings.Contains(d3.rawLog(), proxyPass) {
			t.Errorf("detour logged a password:\n%s", d3.rawLog())
		}
	})

	t.Run("a CIDR rule matches a name by its address", func(t *testing.T) {
		cfg4 := filepath.Join(t.TempDir(), "cidr.yaml")
		if err := os.WriteFile(cfg4, []byte(fmt.Sprintf(`groups:
  - name: viadante
    upstreams: [%q]
rules:
  - cidr: [198.18.2.0/24]
    inbound: proxy
    action: viadante
proxy:
  listen: ["[::]:%d"]
`, proxyURL("socks5", "", v4, dantePort), proxyPortPort+4)), 0o600); err != nil {
			t.Fatal(err)
		}
		d4 := startChecked(t, tp, "--listen", fmt.Sprintf(":%d", listenPort+4), "--config", cfg4)
		d4.waitLog(t, 10*time.Second, "proxy port listening", nil)
		addr := net.JoinHostPort(v4.gateway, strconv.Itoa(proxyPortPort+4))
		for _, tc := range []struct{ url, host, who, route string }{
			{"http://one.proxy.test/", "one.proxy.test", byDante, "viadante"}, // 198.18.2.2
			{"http://two.proxy.test/", "two.proxy.test", byDirect, "direct"},  // fd00:2::2
		} {
			out, err := curl("-x", "http://"+addr, tc.url)
			if who, err2 := carrierOf(out); err != nil || err2 != nil || who != tc.who {
				t.Fatalf("%s carried by %q (%v %v), want %s", tc.url, who, err, err2, tc.who)
			}
			rec := d4.waitLog(t, 5*time.Second, "conn", map[string]string{"inbound": "proxy", "host": tc.host})
			if rec["route"] != tc.route {
				t.Errorf("access line = %v, want route %s", rec, tc.route)
			}
		}
	})

	t.Run("SOCKS5 UDP ASSOCIATE with socksify", func(t *testing.T) {
		if _, err := exec.LookPath("socksify"); err != nil {
			t.Fatal("socksify is not installed (scripts/install-deps.sh installs dante-client)")
		}
		dns := startDNS(t, tp)
		conf := filepath.Join(t.TempDir(), "socks.conf")
		if err := os.WriteFile(conf, []byte(fmt.Sprintf(`route {
	from: 0.0.0.0/0 to: 0.0.0.0/0 via: %s port = %d
	proxyprotocol: socks_v5
	command: connect udpassociate
	method: none
}
`, v4.gateway, proxyPortPort)), 0o644); err != nil {
			t.Fatal(err)
		}
		// python's socket module with dante's client library taking over
		// its UDP calls (dig's BIND library is not one socksify can take
		// over: its queries go out directly, and time out).
		out, err := tp.exec(t, tp.C, "env", "SOCKS_CONF="+conf, "socksify", "/usr/bin/python3", "-c", fmt.Sprintf(`
import socket
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x06python\x09udp-proxy\x04test\x00" + b"\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, (%q, %d))
r, src = s.recvfrom(512)
print(src[0], socket.inet_ntoa(r[-4:]))
`, v4.server, dnsPort))
		if strings.TrimSpace(out) != v4.server+" "+v4.server {
			t.Errorf("socksify python: %q (%v)", out, err)
		}
		for _, name := range []string{"python.udp-proxy.test"} {
			if from := dns.askedBy(name); len(from) != 1 || from[0].String() != gatewayServerSide(v4) {
				t.Errorf("the DNS server was asked for %s by %v, want once by the gateway", name, from)
			}
			rec := d.waitLog(t, 10*time.Second, "udp", map[string]string{"inbound": "proxy", "host": name})
			if rec["route"] != "direct" || rec["dst"] != net.JoinHostPort(v4.server, strconv.Itoa(dnsPort)) {
				t.Errorf("UDP access line = %v", rec)
			}
		}
		d.waitLog(t, 10*time.Second, "conn", map[string]string{"inbound": "proxy", "request": "socks5-udp"})
	})

	t.Run("metrics per inbound", func(t *testing.T) {
		out, err := tp.exec(t, tp.G, "curl", "-sS", "-m", "10", "http://127.0.0.1:9101/metrics")
		if err != nil {
			t.Fatalf("metrics: %v %s", err, out)
		}
		for _, want := range []string{`detour_inbound_accepted_total{inbound="proxy"}`, `detour_inbound_closed_total{inbound="proxy",route="viadante"}`,
			`detour_inbound_refused_total{inbound="proxy",reason="bad_request"}`, "detour_proxy_udp_sessions_total 1\n"} {
			if !strings.Contains(out, want) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
}
