package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// sniffTimeout is detour's --sniff-timeout in these tests: long enough for
// a ClientHello dribbled in 1-byte segments, short enough to wait out.
const sniffTimeout = 1500 * time.Millisecond

// TestSniff: real clients through the gateway, and detour's access line
// names the host each asked for, while the bytes reach the server unchanged.
func TestSniff(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--mode", "redirect",
		"--sniff-timeout", sniffTimeout.String()}, capture...)...)

	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			for _, tc := range []struct {
				scheme, host, proto string
				port                int
			}{
				{"https", "curl-tls.test", "tls", httpsPort},
				{"http", "curl-http.test", "http", httpPort},
			} {
				t.Run("curl "+tc.scheme, func(t *testing.T) {
					host := f.name + "-" + tc.host
					url := fmt.Sprintf("%s://%s/", tc.scheme, host)
					resolve := fmt.Sprintf("%s:%d:%s", host, tc.port, f.server)
					if strings.Contains(f.server, ":") {
						resolve = fmt.Sprintf("%s:%d:[%s]", host, tc.port, f.server)
					}
					out, err := tp.exec(t, tp.C, "curl", "-sS", "-k", "-m", "10", "--resolve", resolve, url)
					if err != nil || !strings.HasPrefix(out, "hello from the server namespace") {
						t.Fatalf("curl %s: %v\n%s", url, err, out)
					}
					rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": host})
					t.Logf("access line: %v", rec)
					if rec["proto"] != tc.proto || rec["sniff"] != "found" || rec["dst"] != net.JoinHostPort(f.server, fmt.Sprint(tc.port)) {
						t.Errorf("access line = %v; want proto %s, sniff found, dst %s:%d", rec, tc.proto, f.server, tc.port)
					}
					if tc.proto == "tls" && !strings.Contains(fmt.Sprint(rec["alpn"]), "http/1.1") {
						t.Errorf("access line alpn = %v; curl offers http/1.1", rec["alpn"])
					}
				})
			}
		})
	}

	t.Run("ClientHello in 1-byte segments", func(t *testing.T) {
		hello, err := os.ReadFile("../sniff/testdata/flights/chromium-https.bin") // 1,988 bytes, post-quantum key share
		if err != nil {
			t.Fatal(err)
		}
		c := dial(t, tp, net.JoinHostPort(families[0].server, fmt.Sprint(httpsPort)))
		c.SetNoDelay(true) // one write, one segment
		start := time.Now()
		for i := range hello {
			if _, err := c.Write(hello[i : i+1]); err != nil {
				t.Fatalf("writing byte %d: %v", i, err)
			}
			if i%16 == 15 {
				time.Sleep(time.Millisecond) // a little gap now and then
			}
		}
		sent := time.Since(start)
		// The server answers the replayed hello with its own flight.
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 1 {
			t.Fatalf("no answer from the TLS server to the dribbled hello: %v", err)
		}
		c.Close() // the access line is written at close
		if sent > sniffTimeout {
			t.Skipf("writing 1,988 one-byte segments took %v, past the sniff timeout: machine too slow to test this", sent)
		}
		rec := d.waitLog(t, 15*time.Second, "conn", map[string]string{"host": "www.example.test"})
		if rec["proto"] != "tls" || rec["ech"] != true {
			t.Errorf("access line = %v; want tls with ech (Chromium sends GREASE ECH)", rec)
		}
	})

	t.Run("server-first protocol waits at most the sniff timeout", func(t *testing.T) {
		dst := net.JoinHostPort(families[0].server, fmt.Sprint(sshPort))
		first := bannerTime(t, tp, dst)
		if first < sniffTimeout || first > sniffTimeout+time.Second {
			t.Errorf("first banner after %v; want the sniff timeout %v plus a little", first, sniffTimeout)
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": dst, "sniff": "timeout"})
		// Its banner came before any client byte: learned as server-first,
		// so the next client does not wait.
		if again := bannerTime(t, tp, dst); again > sniffTimeout/3 {
			t.Errorf("second banner after %v; the silent destination should skip sniffing", again)
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": dst, "sniff": "skipped"})
		// Port 22 is a known server-first port: never sniffed.
		if ssh := bannerTime(t, tp, net.JoinHostPort(families[0].server, "22")); ssh > sniffTimeout/3 {
			t.Errorf("port 22 banner after %v; port 22 should skip sniffing", ssh)
		}
	})

	t.Run("chromium headless", func(t *testing.T) {
		bin, err := exec.LookPath("chromium")
		if err != nil {
			t.Skip("chromium is not installed (scripts/install-deps.sh installs it)")
		}
		for _, tc := range []struct{ scheme, host, proto string }{{"https", "chrome-tls.test", "tls"}, {"http", "chrome-http.test", "http"}} {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			profile := t.TempDir()
			cmd := exec.CommandContext(ctx, "ip", "netns", "exec", tp.C, bin,
				"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
				"--disable-background-networking", "--disable-component-update", "--disable-sync",
				"--ignore-certificate-errors", "--user-data-dir="+profile,
				"--host-resolver-rules=MAP "+tc.host+" "+families[0].server,
				"--dump-dom", tc.scheme+"://"+tc.host+"/")
			out, err := cmd.Output()
			cancel()
			if err != nil || !strings.Contains(string(out), "hello from the server namespace") {
				t.Fatalf("chromium %s://%s/: %v\n%s", tc.scheme, tc.host, err, out)
			}
			rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": tc.host})
			if rec["proto"] != tc.proto {
				t.Errorf("chromium %s: access line = %v", tc.scheme, rec)
			}
		}
	})
}

// bannerTime connects to a server-first service through detour and returns
// how long its banner took to arrive.
func bannerTime(t *testing.T, tp *topo, dst string) time.Duration {
	t.Helper()
	start := time.Now()
	c := dial(t, tp, dst)
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	n, err := io.ReadAtLeast(c, buf, 4)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "SSH-") {
		t.Fatalf("banner from %s: %q, %v", dst, buf[:n], err)
	}
	took := time.Since(start)
	c.Write([]byte("ping"))
	if _, err := io.ReadFull(c, buf[:4]); err != nil || string(buf[:4]) != "ping" {
		t.Fatalf("echo after the banner: %q, %v", buf[:4], err)
	}
	return took
}
