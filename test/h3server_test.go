package test

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// h3Server is a running test/h3server: HTTP/3 on UDP and HTTPS on TCP at
// one port, with a self-signed certificate.
type h3Server struct {
	Addr string // host:port it listens on
	SPKI string // for chromium --ignore-certificate-errors-spki-list

	mu       sync.Mutex
	requests []string // its "request ..." lines
}

var (
	h3BinOnce sync.Once
	h3Bin     string
	h3BinErr  error
)

// h3ServerBin builds test/h3server once per run, next to the detour binary
// (TestMain removes the directory).
func h3ServerBin(t *testing.T) string {
	t.Helper()
	h3BinOnce.Do(func() {
		h3Bin = filepath.Join(filepath.Dir(detourBin), "h3server")
		out, err := exec.Command("go", "build", "-o", h3Bin, "github.com/detour-proxy/detour/test/h3server").CombinedOutput()
		if err != nil {
			h3BinErr = &buildError{err, string(out)}
		}
	})
	if h3BinErr != nil {
		t.Fatalf("building test/h3server: %v", h3BinErr)
	}
	return h3Bin
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

// startH3Server runs test/h3server on addr (for example "198.18.1.2:443"
// or "[::]:443"), inside the namespace ns unless ns is "", serving a
// certificate for names (comma-separated). It is killed at the end of the
// test.
func startH3Server(t *testing.T, ns, addr, names string) *h3Server {
	t.Helper()
	argv := []string{h3ServerBin(t), "-listen", addr, "-name", names, "-body", "hello over h3"}
	if ns != "" {
		argv = append([]string{"ip", "netns", "exec", ns}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		<-done
	})
	s := &h3Server{}
	ready := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "spki "):
				s.SPKI = strings.TrimPrefix(line, "spki ")
			case strings.HasPrefix(line, "listening "):
				s.Addr = strings.TrimPrefix(line, "listening ")
				close(ready)
			case strings.HasPrefix(line, "request "):
				s.mu.Lock()
				s.requests = append(s.requests, line)
				s.mu.Unlock()
			}
		}
	}()
	select {
	case <-ready:
	case <-done:
		t.Fatal("h3server exited before listening")
	case <-time.After(10 * time.Second):
		t.Fatal("h3server did not listen within 10s")
	}
	return s
}

// Requests returns the request lines the server has logged so far.
func (s *h3Server) Requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.requests...)
}

// waitRequest waits for a logged request line containing all of parts.
func (s *h3Server) waitRequest(t *testing.T, within time.Duration, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, r := range s.Requests() {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(r, p)
			}
			if ok {
				return r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("h3server logged no request with %q; it logged %q", parts, s.Requests())
			return ""
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// chromiumQUIC loads https://host:port/ in headless Chromium with QUIC
// forced for that origin, host mapped to ip, and the server's certificate
// trusted by its SPKI hash; inside ns unless ns is "". It returns the DOM.
func chromiumQUIC(t *testing.T, ns, host, ip, port, spki string) (string, error) {
	t.Helper()
	bin, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium is not installed (scripts/install-deps.sh installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	argv := []string{bin, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir(),
		"--enable-quic", "--origin-to-force-quic-on=" + host + ":" + port,
		"--host-resolver-rules=MAP " + host + " " + ip + ", MAP * ~NOTFOUND",
		"--ignore-certificate-errors-spki-list=" + spki,
		"--dump-dom", "https://" + host + ":" + port + "/"}
	if ns != "" {
		argv = append([]string{"ip", "netns", "exec", ns}, argv...)
	}
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).Output()
	return string(out), err
}

// TestH3Server checks the tests' HTTP/3 server on loopback with real
// clients: Chromium over QUIC (trusting the certificate by SPKI only),
// quic-go's client over QUIC v1 and v2, ngtcp2's client, and curl over TCP,
// which gets the Alt-Svc that advertises HTTP/3 on the same port.
func TestH3Server(t *testing.T) {
	s := startH3Server(t, "", "127.0.0.1:0", "site.test")
	_, port, _ := net.SplitHostPort(s.Addr)

	t.Run("chromium", func(t *testing.T) {
		dom, err := chromiumQUIC(t, "", "site.test", "127.0.0.1", port, s.SPKI)
		if err != nil || !strings.Contains(dom, "hello over h3 via HTTP/3.0") {
			t.Fatalf("chromium: %v\n%s", err, dom)
		}
		s.waitRequest(t, 5*time.Second, "proto=HTTP/3.0", "host=site.test:"+port, "path=/ ")
	})
	for _, v := range []string{"1", "2"} {
		t.Run("quic-go v"+v, func(t *testing.T) {
			out, err := exec.Command(h3ServerBin(t), "-client", "https://v"+v+".site.test:"+port+"/",
				"-connect", s.Addr, "-quic-version", v, "-timeout", "10s").CombinedOutput()
			if err != nil || !strings.Contains(string(out), "HTTP/3.0 200") {
				t.Fatalf("quic-go client: %v\n%s", err, out)
			}
			s.waitRequest(t, 5*time.Second, "proto=HTTP/3.0", "host=v"+v+".site.test:"+port)
		})
	}
	t.Run("ngtcp2", func(t *testing.T) {
		if _, err := exec.LookPath("gtlsclient"); err != nil {
			t.Skip("gtlsclient is not installed (ngtcp2-client; scripts/install-deps.sh installs it)")
		}
		out, err := exec.Command("timeout", "20", "gtlsclient", "-q", "--exit-on-first-stream-close",
			"127.0.0.1", port, "https://ngtcp2.site.test:"+port+"/ngtcp2").CombinedOutput()
		if err != nil {
			t.Fatalf("gtlsclient: %v\n%s", err, out)
		}
		s.waitRequest(t, 5*time.Second, "proto=HTTP/3.0", "path=/ngtcp2")
	})
	t.Run("curl over TCP", func(t *testing.T) {
		out, err := exec.Command("curl", "-sk", "--max-time", "10", "-D", "-",
			"--resolve", "site.test:"+port+":127.0.0.1", "https://site.test:"+port+"/tcp").CombinedOutput()
		if err != nil || !strings.Contains(strings.ToLower(string(out)), `alt-svc: h3=":`+port+`"`) ||
			!strings.Contains(string(out), "via HTTP/2.0") {
			t.Fatalf("curl: %v\n%s", err, out)
		}
		s.waitRequest(t, 5*time.Second, "proto=HTTP/2.0", "path=/tcp")
	})
}
