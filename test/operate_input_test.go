package test

// Hostile first bytes: random bytes, endless heads, half hellos.

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestOperateBadInput: random bytes, a header of 1 MB without an end, half a
// ClientHello then silence. detour stays up, its memory stays bounded, and
// each connection is forwarded by IP or closed, and logged.
func TestOperateBadInput(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	// A sniff timeout well above any delay of this busy test's clients
	// between their first bytes and the next, so that only the half
	// hellos wait for it.
	const sniffTimeout = 2 * time.Second
	// All 520 clients come from one address, and one source may hold only
	// a sixteenth of the sniffing slots: enough slots that this one
	// address gets a slot for each (this test is about the parsers, not
	// fairness; TestMaxSniffingPerSource in tunnel is).
	d := startOp(t, tp, "--sniff-timeout", sniffTimeout.String(), "--max-sniffing", "16384")
	pid := d.cmd.Process.Pid
	m0 := scrape(t, tp)
	rss0 := procKB(t, pid, "VmRSS")

	hello, err := os.ReadFile("../sniff/testdata/flights/chromium-https.bin")
	if err != nil {
		t.Fatal(err)
	}
	server := func(port int) string { return net.JoinHostPort(families[0].server, strconv.Itoa(port)) }
	const (
		randoms   = 200
		huge      = 20
		halfHello = 300
	)
	type attempt struct {
		kind string
		key  map[string]string
		err  error
	}
	var (
		mu       sync.Mutex
		attempts []attempt
		wg       sync.WaitGroup
		sem      = make(chan struct{}, 300)
	)
	run := func(kind, addr string, fn func(c *net.TCPConn) error) {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := clientDial(tp, addr)
			a := attempt{kind: kind, err: err}
			if err == nil {
				a.key = connKey(c)
				c.SetDeadline(time.Now().Add(20 * time.Second))
				a.err = fn(c)
				c.Close()
			}
			mu.Lock()
			attempts = append(attempts, a)
			mu.Unlock()
		})
	}
	// drain reads until the other side ends the connection: any end will
	// do, but it must end.
	drain := func(c *net.TCPConn) error {
		_, err := io.Copy(io.Discard, c)
		if isTimeout(err) {
			return fmt.Errorf("connection not ended: %w", err)
		}
		return nil
	}
	// Peak memory, sampled while it runs.
	stop := make(chan struct{})
	peak := make(chan int, 1)
	go func() {
		top := 0
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
						n, _ := strconv.Atoi(strings.Fields(v)[0])
						top = max(top, n)
					}
				}
			}
			select {
			case <-stop:
				peak <- top
				return
			case <-tick.C:
			}
		}
	}()

	start := time.Now()
	ports := []int{httpPort, httpsPort, sshPort}
	for i := range randoms {
		junk := make([]byte, 1+i*83%16384)
		rand.Read(junk)
		run("random", server(ports[i%len(ports)]), func(c *net.TCPConn) error {
			c.Write(junk)
			c.CloseWrite()
			return drain(c)
		})
	}
	// A request head of 1 MB that never ends: no Host before the cap, no
	// blank line.
	head := append([]byte("GET / HTTP/1.1\r\nX-Filler: "), bytes.Repeat([]byte("a"), 1<<20)...)
	for range huge {
		run("huge", server(httpPort), func(c *net.TCPConn) error {
			go func() {
				c.Write(head)
				c.CloseWrite()
			}()
			return drain(c)
		})
	}
	// A half hello stays silent until detour has given up on every one
	// (its sniff timeouts all counted), however late detour got to it on a
	// busy machine: a client that closed first would be sniffed "closed".
	timedOut := make(chan struct{})
	for range halfHello {
		run("half-hello", server(httpsPort), func(c *net.TCPConn) error {
			c.Write(hello[:100])
			select {
			case <-timedOut:
			case <-time.After(15 * time.Second):
			}
			return nil
		})
	}
	waitFor(t, 20*time.Second, fmt.Sprintf("sniff timeout for each of the %d half hellos", halfHello), func() bool {
		return delta(m0, scrape(t, tp), "detour_sniff_total", "outcome", "timeout") >= halfHello
	})
	close(timedOut)
	wg.Wait()
	close(stop)
	top := <-peak
	took := time.Since(start)
	hwm := procKB(t, pid, "VmHWM")
	d.alive(t)
	t.Logf("%d connections of bad input in %v; detour VmRSS %d kB before, peak sampled %d kB, VmHWM %d kB",
		len(attempts), took.Round(time.Millisecond), rss0, top, hwm)
	if grew := max(top, hwm) - rss0; grew > 64<<10 {
		t.Errorf("detour's memory grew by %d kB under bad input, want under 64 MB", grew)
	}

	// Each one logged: forwarded by IP (route direct, no name) or closed
	// with an error.
	count := map[string]int{}
	sniffs := map[string]map[string]int{}
	for _, a := range attempts {
		if a.err != nil {
			t.Errorf("%s connection %v: %v", a.kind, a.key, a.err)
			continue
		}
		rec := d.waitLog(t, 10*time.Second, "conn", a.key)
		count[a.kind]++
		if sniffs[a.kind] == nil {
			sniffs[a.kind] = map[string]int{}
		}
		sniffs[a.kind][fmt.Sprint(rec["sniff"])]++
		checkAccessFields(t, rec)
		if rec["route"] != "direct" || rec["host"] != "" {
			t.Errorf("%s connection: access line %v; want it routed direct by IP", a.kind, rec)
		}
	}
	t.Logf("access lines by kind %v, sniff outcomes %v", count, sniffs)
	if count["random"] != randoms || count["huge"] != huge || count["half-hello"] != halfHello {
		t.Errorf("logged %v, want %d random, %d huge, %d half-hello", count, randoms, huge, halfHello)
	}
	if sniffs["huge"]["too-large"] != huge {
		t.Errorf("sniff outcomes of the 1 MB heads: %v, want too-large for all %d", sniffs["huge"], huge)
	}
	if sniffs["half-hello"]["timeout"] != halfHello {
		t.Errorf("sniff outcomes of the half ClientHellos: %v, want timeout for all %d", sniffs["half-hello"], halfHello)
	}

	// Still serving, and holding nothing.
	if _, _, _, err := httpGet(tp, server(httpPort), "after.test"); err != nil {
		t.Fatalf("a normal request after the bad input: %v", err)
	}
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Errorf("detour still serves %d connections after the bad input", n)
	}
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, randoms+huge+halfHello+1, "detour_connections_accepted_total")
	wantDelta(t, m0, m1, huge, "detour_sniff_total", "outcome", "too-large")
	if got := delta(m0, m1, "detour_bytes_total", "direction", "up"); got < huge<<20 {
		t.Errorf("detour_bytes_total{direction=up} moved by %g, want at least the %d MB of the huge heads", got, huge)
	}
}
