package test

// Operation through faults: upstreams killed mid-transfer, servers that
// reset, clients that vanish.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestOperateFaults: an upstream killed mid-transfer ends the client's
// connection at once and the next connections go to the other upstream; a
// server's reset reaches the client as a reset; a client that vanishes
// without a word is freed by the idle timeout.
func TestOperateFaults(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	bulkAddr := net.JoinHostPort(families[0].server, strconv.Itoa(bulkPort))

	t.Run("upstream killed mid-transfer", func(t *testing.T) {
		a, b := startSOCKS5(t, tp, socksPortA), startSOCKS5(t, tp, socksPortB)
		d := startOp(t, tp, "--upstream", a.url, "--upstream", b.url)

		// A download that would never end (1 TiB), read a little.
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		var req [9]byte
		req[0] = 'D'
		binary.BigEndian.PutUint64(req[1:], 1<<40)
		c.Write(req[:])
		if _, err := io.CopyN(io.Discard, c, 8<<20); err != nil {
			t.Fatalf("download through the upstream: %v", err)
		}
		var victim, survivor *socks5Server
		switch {
		case a.active.Load() == 1 && b.active.Load() == 0:
			victim, survivor = a, b
		case b.active.Load() == 1 && a.active.Load() == 0:
			victim, survivor = b, a
		default:
			t.Fatalf("upstreams carry %d and %d connections, want one on one of them", a.active.Load(), b.active.Load())
		}
		m := scrape(t, tp)
		if got := m.sum("detour_upstream_active", "upstream", victim.url); got != 1 {
			t.Errorf("detour_upstream_active of the upstream carrying the download = %g, want 1:\n%s", got, m.series("detour_upstream_active"))
		}
		if got := m.sum("detour_upstream_active", "upstream", survivor.url); got != 0 {
			t.Errorf("detour_upstream_active of the idle upstream = %g, want 0:\n%s", got, m.series("detour_upstream_active"))
		}
		victim.kill()
		killed := time.Now()
		c.SetReadDeadline(killed.Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		took := time.Since(killed)
		t.Logf("%s killed: the client's download ended %v later with %v (after %d more bytes)", victim.url, took.Round(time.Millisecond), err, n)
		if isTimeout(err) || took > 5*time.Second {
			t.Fatalf("the client's connection did not end within 5s of its upstream's death: %v after %v", err, took)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", key)
		if rec["upstream"] != victim.url || rec["error"] == "" {
			t.Errorf("access line of the cut download = %v; want upstream %s and an error", rec, victim.url)
		}

		// The next connections go to the survivor, and the client sees no
		// failure.
		before := survivor.served.Load()
		const next = 10
		for i := range next {
			if _, _, _, err := httpGet(tp, net.JoinHostPort(families[0].server, strconv.Itoa(httpPort)), "after-kill.test"); err != nil {
				t.Errorf("request %d after the kill: %v", i, err)
			}
		}
		if got := survivor.served.Load() - before; got != next {
			t.Errorf("the surviving upstream carried %d of the %d requests after the kill", got, next)
		}
		named := 0
		for _, target := range survivor.requested() {
			if target == net.JoinHostPort("after-kill.test", strconv.Itoa(httpPort)) {
				named++
			}
		}
		if named != next {
			t.Errorf("the surviving upstream was asked %d times for after-kill.test:%d, want %d (the sniffed name); it was asked for %v", named, httpPort, next, survivor.requested())
		}
		// detour logs a connection once both sides are done: wait for all.
		var recs []map[string]any
		waitCount(5*time.Second, next, func() int {
			recs = d.find("conn", map[string]string{"host": "after-kill.test"})
			return len(recs)
		})
		for _, rec := range recs {
			checkAccessFields(t, rec, "upstream")
			if rec["upstream"] != survivor.url || rec["error"] != "" || rec["route"] != "upstream" {
				t.Errorf("access line after the kill = %v; want upstream %s, route upstream, no error", rec, survivor.url)
			}
		}
		if len(recs) != next {
			t.Errorf("%d access lines for after-kill.test, want %d", len(recs), next)
		}
		m = scrape(t, tp)
		if up := m.sum("detour_upstream_up", "upstream", victim.url); up != 0 || !m.has("detour_upstream_up") {
			t.Errorf("detour_upstream_up of the killed upstream = %g, want 0:\n%s", up, m.series("detour_upstream_up"))
		}
		if up := m.sum("detour_upstream_up", "upstream", survivor.url); up != 1 {
			t.Errorf("detour_upstream_up of the surviving upstream = %g, want 1:\n%s", up, m.series("detour_upstream_up"))
		}

		// A reset from the server, through the surviving upstream.
		r := opDial(t, tp, bulkAddr)
		r.Write([]byte("Rx"))
		if _, err := r.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server reset through an upstream: client read %v, want connection reset", err)
		}
	})

	t.Run("server resets, client vanishes", func(t *testing.T) {
		const idleTimeout = 2 * time.Second
		d := startOp(t, tp, "--idle-timeout", idleTimeout.String())

		r := opDial(t, tp, bulkAddr)
		rkey := connKey(r)
		r.Write([]byte("Rx"))
		start := time.Now()
		if _, err := r.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server reset: client read %v after %v, want connection reset", err, time.Since(start))
		}
		rec := d.waitLog(t, 5*time.Second, "conn", rkey)
		if !strings.Contains(fmt.Sprint(rec["error"]), "reset") {
			t.Errorf("access line of the reset connection = %v; want an error naming the reset", rec)
		}
		base := measureIdle(t, d, tp)

		// A client that vanishes: its packets are dropped from now on, both
		// ways, so detour hears nothing (no FIN, no RST, no ACK).
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		c.Write([]byte("Eping"))
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatalf("echo: %v", err)
		}
		lastTraffic := time.Now() // detour's idle clock started a little before
		port := strconv.Itoa(c.LocalAddr().(*net.TCPAddr).Port)
		for _, rule := range [][]string{{"INPUT", "--dport", port}, {"OUTPUT", "--sport", port}} {
			if out, err := tp.exec(t, tp.C, "iptables", "-w", "-I", rule[0], "-p", "tcp", rule[1], rule[2], "-j", "DROP"); err != nil {
				t.Fatalf("dropping the client's packets: %v\n%s", err, out)
			}
		}
		if active, _, _ := d.stats(t); active != 1 {
			t.Fatalf("detour serves %d connections, want the vanished client's", active)
		}
		rec = d.waitLog(t, idleTimeout+5*time.Second, "conn", key)
		took := time.Since(lastTraffic)
		t.Logf("vanished client freed %v after its last traffic (idle timeout %v): %v", took.Round(time.Millisecond), idleTimeout, rec["error"])
		if rec["error"] != "idle timeout" {
			t.Errorf("access line of the vanished client = %v; want error \"idle timeout\"", rec)
		}
		if took < idleTimeout-100*time.Millisecond || took > idleTimeout+3*time.Second {
			t.Errorf("vanished client freed after %v, want about the idle timeout %v", took, idleTimeout)
		}
		now, _ := backToIdle(t, d, tp, base, 10*time.Second)
		t.Logf("after the vanished client: goroutines %d (idle %d), fds %d (idle %d)", now.goroutines, base.goroutines, now.fds, base.fds)
	})
}
