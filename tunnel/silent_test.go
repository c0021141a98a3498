package tunnel

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// greeterDelay is how long greeter waits before its banner: long enough
// that a client writing at once is deterministically first, far shorter
// than the sniff timeout of silentTunnel.
const greeterDelay = 50 * time.Millisecond

// greeter is a destination that says banner to each connection soon after
// it accepts it (SSH, SMTP, FTP greet first), then echoes.
func greeter(t *testing.T, banner string) netip.AddrPort {
	t.Helper()
	addr, _ := testkit.Server(t, func(c *net.TCPConn) {
		time.Sleep(greeterDelay)
		io.WriteString(c, banner)
		io.Copy(c, c)
	})
	return addr
}

// silentTunnel serves connections to dst with a short sniff timeout; it
// returns the tunnel for its silent cache.
func silentTunnel(t *testing.T, dst netip.AddrPort) (*fakeListener, *Tunnel, *testkit.LogBuffer) {
	t.Helper()
	ln := newFakeListener(t, dst, nil)
	tun := &Tunnel{Sniff: SniffOptions{Timeout: 100 * time.Millisecond}}
	return ln, tun, startTunnel(t, ln, tun)
}

// connLines are the access lines logged so far.
func connLines(logs *testkit.LogBuffer) []string {
	var out []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "msg=conn") {
			out = append(out, l)
		}
	}
	return out
}

// waitLines waits for n access lines and returns the nth.
func waitLines(t *testing.T, logs *testkit.LogBuffer, n int) string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(connLines(logs)) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d access lines, want %d:\n%s", len(connLines(logs)), n, logs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return connLines(logs)[n-1]
}

func wantIn(t *testing.T, line string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(line, w) {
			t.Errorf("access line lacks %q: %s", w, line)
		}
	}
}

// readBanner reads the greeting at the client.
func readBanner(t *testing.T, c *net.TCPConn, banner string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(banner))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != banner {
		t.Fatalf("client read %q, %v; want the banner %q", got, err, banner)
	}
}

// A server that greets first is learned from its first connection: the
// next one is not sniffed (no wait). The first client of it seen speaking
// first ends the entry.
func TestServerFirstLearnedThenForgotten(t *testing.T) {
	testkit.CheckGoroutines(t)
	const banner = "220 greeter ready\r\n"
	dst := greeter(t, banner)
	ln, tun, logs := silentTunnel(t, dst)

	// 1: the client waits for the banner, as an SMTP client does.
	c := dialTunnel(t, ln)
	readBanner(t, c, banner)
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "sniff=timeout")
	if !tun.silent.Silent(dst) {
		t.Fatal("a server that greeted first was not learned")
	}

	// 2: not held for the sniff timeout.
	c = dialTunnel(t, ln)
	readBanner(t, c, banner)
	c.Close()
	wantIn(t, waitLines(t, logs, 2), "sniff=skipped", "sniff_time=0s")

	// 3: a client that speaks first (it does not wait for the banner to
	// arrive); it is forwarded by IP, and the entry ends.
	c = dialTunnel(t, ln)
	roundTripAfterBanner(t, c, banner)
	c.Close()
	wantIn(t, waitLines(t, logs, 3), "sniff=skipped")
	if tun.silent.Silent(dst) {
		t.Fatal("the entry outlived a client that spoke first")
	}

	// 4: sniffed again.
	c = dialTunnel(t, ln)
	c.Write([]byte("GET / HTTP/1.1\r\nHost: again.test\r\n\r\n"))
	readBanner(t, c, banner)
	c.Close()
	wantIn(t, waitLines(t, logs, 4), "sniff=found", "host=again.test")
}

// roundTripAfterBanner writes at once, greeterDelay before the banner
// comes, then reads the banner and the echo.
func roundTripAfterBanner(t *testing.T, c *net.TCPConn, banner string) {
	t.Helper()
	const msg = "EHLO client.test\r\n"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	readBanner(t, c, banner)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo %q, %v", got, err)
	}
}

// A client that says nothing, like a browser's preconnected socket, teaches
// nothing: the next clients of that destination are sniffed, by name.
func TestSilentClientTeachesNothing(t *testing.T) {
	testkit.CheckGoroutines(t)
	dst, _ := echoServer(t)
	ln, tun, logs := silentTunnel(t, dst)

	c := dialTunnel(t, ln)
	time.Sleep(300 * time.Millisecond) // past the sniff timeout
	c.Close()
	wantIn(t, waitLines(t, logs, 1), "sniff=timeout")
	if tun.silent.Silent(dst) {
		t.Fatal("a connection where nobody spoke was learned")
	}
	// A preconnect that speaks late teaches nothing either.
	c = dialTunnel(t, ln)
	time.Sleep(300 * time.Millisecond)
	c.Write([]byte("late"))
	readEcho(t, c, "late")
	c.Close()
	wantIn(t, waitLines(t, logs, 2), "sniff=timeout")

	for i := range 20 {
		c := dialTunnel(t, ln)
		req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: n%d.test\r\n\r\n", i)
		c.Write([]byte(req))
		readEcho(t, c, req)
		c.Close()
		wantIn(t, waitLines(t, logs, 3+i), "sniff=found", fmt.Sprintf("host=n%d.test", i))
	}
	if tun.silent.Silent(dst) {
		t.Fatal("silent cache not empty")
	}
}

// A server that speaks only long after connect (an HTTP server timing out a
// request it never got) is not server-first. Tested on watchFirst itself:
// the window is seconds long.
func TestLateServerBytesTeachNothing(t *testing.T) {
	var tun Tunnel
	dst := netip.MustParseAddrPort("198.18.2.2:8080")
	src := netip.MustParseAddr("198.18.1.2")
	tun.watchFirst(dst, src, time.Now().Add(-serverFirstWindow))(true)
	if tun.silent.Silent(dst) {
		t.Fatal("server bytes after the window were learned")
	}
	tun.watchFirst(dst, src, time.Now())(true)
	if !tun.silent.Silent(dst) {
		t.Fatal("server bytes at once were not learned")
	}
	tun.watchFirst(dst, src, time.Now())(false)
	if tun.silent.Silent(dst) {
		t.Fatal("a client speaking first did not end the entry")
	}
}

// One source opening silent connections holds only its share of the
// sniffing slots: another source's connection is still sniffed.
func TestMaxSniffingPerSource(t *testing.T) {
	testkit.CheckGoroutines(t)
	dst, _ := echoServer(t)
	ln := newFakeListener(t, dst, nil)
	obs := newCountingObserver()
	const maxSniffing = 32 // 2 per source
	logs := startTunnel(t, ln, &Tunnel{MaxSniffing: maxSniffing, Observer: obs, Sniff: SniffOptions{Timeout: 5 * time.Second}})

	from := func(ip string) *net.TCPConn {
		t.Helper()
		c, err := net.DialTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip)}, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	for range maxSniffing {
		from("127.0.0.1") // silent, holding what slots it may
	}
	deadline := time.Now().Add(5 * time.Second)
	for obs.get(func(o *countingObserver) int { return o.sniffOutcomes["busy"] }) < maxSniffing-2 {
		if time.Now().After(deadline) {
			t.Fatalf("busy = %d, want %d: one source holds more than 2 slots", obs.get(func(o *countingObserver) int { return o.sniffOutcomes["busy"] }), maxSniffing-2)
		}
		time.Sleep(5 * time.Millisecond)
	}
	c := from("127.0.0.2")
	const req = "GET / HTTP/1.1\r\nHost: other.test\r\n\r\n"
	c.Write([]byte(req))
	readEcho(t, c, req)
	c.Close()
	logs.WaitFor(t, "host=other.test")
	wantIn(t, logs.String(), "sniff=found")
	if n := obs.get(func(o *countingObserver) int { return o.sniffOutcomes["busy"] }); n != maxSniffing-2 {
		t.Errorf("busy = %d, want %d", n, maxSniffing-2)
	}
}
