package test

// The metrics compared with what the test did.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestOperateMetrics: the counters match what the test did, one kind of
// connection at a time; --max-conns refuses the one too many.
func TestOperateMetrics(t *testing.T) {
	const maxConns = 20
	tp := newTopo(t)
	startServers(t, tp)
	cfg := filepath.Join(t.TempDir(), "detour.yaml")
	writeFileAtomic(t, cfg, "rules:\n  - port: \"6666\"\n    action: reject\ndefault: direct\n")
	d := startOp(t, tp, "--config", cfg, "--max-conns", strconv.Itoa(maxConns))
	server := func(port int) string { return net.JoinHostPort(families[0].server, strconv.Itoa(port)) }
	m0 := scrape(t, tp)
	for _, name := range []string{"detour_connections_accepted_total", "detour_connections_active", "go_goroutines", "process_open_fds"} {
		if !m0.has(name) {
			t.Errorf("no %s before any connection", name)
		}
	}

	var up, down int // bytes the clients sent and received on relayed connections

	// 1. HTTP requests, sniffed, direct.
	const gets = 10
	for range gets {
		sent, reply, key, err := httpGet(tp, server(httpPort), "metrics.test")
		if err != nil {
			t.Fatalf("request: %v", err)
		}
		up += sent
		down += len(reply)
		rec := d.waitLog(t, 5*time.Second, "conn", key)
		checkAccessFields(t, rec)
		want := map[string]string{"route": "direct", "host": "metrics.test", "proto": "http", "sniff": "found",
			"up": fmt.Sprint(sent), "down": fmt.Sprint(len(reply)), "error": "", "dst": server(httpPort)}
		wantFields(t, rec, want)
	}
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, gets, "detour_connections_accepted_total")
	wantDelta(t, m0, m1, gets, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m0, m1, gets, "detour_sniff_total", "proto", "http", "outcome", "found")
	wantDelta(t, m0, m1, gets, "detour_sniff_duration_seconds_count")
	wantDelta(t, m0, m1, gets, "detour_dial_duration_seconds_count", "route", "direct")
	wantDelta(t, m0, m1, float64(up), "detour_bytes_total", "direction", "up")
	wantDelta(t, m0, m1, float64(down), "detour_bytes_total", "direction", "down")
	if c, inf := m1.sum("detour_dial_duration_seconds_count", "route", "direct"), m1.sum("detour_dial_duration_seconds_bucket", "route", "direct", "le", "+Inf"); c != inf {
		t.Errorf("dial histogram: count %g, +Inf bucket %g", c, inf)
	}

	// 2. A rejected connection, a failed dial, a connection that was not
	// redirected.
	expectEnd := func(what, addr string, payload string) {
		t.Helper()
		c := opDial(t, tp, addr)
		if payload != "" {
			io.WriteString(c, payload)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || isTimeout(err) {
			t.Errorf("%s: read %d bytes, %v; want the connection ended", what, n, err)
		}
		c.Close()
	}
	expectEnd("rejected", server(6666), "GET / HTTP/1.1\r\nHost: rejected.test\r\n\r\n")
	expectEnd("closed port", server(1), "GET / HTTP/1.1\r\nHost: closed.test\r\n\r\n")
	expectEnd("not redirected", net.JoinHostPort(families[0].gateway, strconv.Itoa(listenPort)), "GET / HTTP/1.1\r\nHost: self.test\r\n\r\n")
	d.waitLog(t, 5*time.Second, "refused", nil)
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"route": "reject"})
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "closed.test"})
	m2 := scrape(t, tp)
	wantDelta(t, m1, m2, 3, "detour_connections_accepted_total")
	wantDelta(t, m1, m2, 1, "detour_connections_closed_total", "route", "reject")
	wantDelta(t, m1, m2, 1, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m1, m2, 1, "detour_dial_failures_total", "route", "direct")
	wantDelta(t, m1, m2, 1, "detour_connections_refused_total", "reason", "not_redirected")
	wantDelta(t, m1, m2, 0, "detour_bytes_total")

	// 3. --max-conns: the one too many is closed at once and counted.
	held, errs := dialMany(tp, server(bulkPort), maxConns, 4, 20*time.Second, holdIdle)
	t.Cleanup(func() { closeAll(held) })
	if len(errs) > 0 {
		t.Fatalf("holding %d connections: %v", maxConns, errs[0])
	}
	if a := scrape(t, tp).sum("detour_connections_active"); a != maxConns {
		t.Errorf("detour_connections_active = %g with %d held, want %d", a, maxConns, maxConns)
	}
	// The reset may come so soon that connect itself reports it.
	start := time.Now()
	if extra, err := clientDial(tp, server(bulkPort)); err == nil {
		extra.Write([]byte("Ihold"))
		extra.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := extra.Read(make([]byte, 1))
		extra.Close()
		if n != 0 || isTimeout(err) || time.Since(start) > 2*time.Second {
			t.Errorf("connection %d with --max-conns %d: read %d bytes, %v after %v; want it closed at once", maxConns+1, maxConns, n, err, time.Since(start))
		}
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("connection %d with --max-conns %d: dial %v; want a reset", maxConns+1, maxConns, err)
	}
	m3 := scrape(t, tp)
	wantDelta(t, m2, m3, 1, "detour_connections_refused_total", "reason", "limit")
	wantDelta(t, m2, m3, maxConns, "detour_connections_accepted_total")
	closeAll(held)
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Fatalf("detour still serves %d connections", n)
	}
	// Below the limit again: served.
	if _, _, _, err := httpGet(tp, server(httpPort), "again.test"); err != nil {
		t.Errorf("a request once the held connections closed: %v", err)
	}
	// The client has its response before detour has seen both ends close:
	// the counters are final once the connection has left.
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Fatalf("detour still serves %d connections after the last request", n)
	}
	m4 := scrape(t, tp)
	wantDelta(t, m2, m4, maxConns+1, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m2, m4, 0, "detour_dial_failures_total")
	if m4.sum("detour_connections_active") != 0 {
		t.Errorf("detour_connections_active = %g with nothing open", m4.sum("detour_connections_active"))
	}
	for _, name := range []string{
		"detour_connections_accepted_total", "detour_connections_active", "detour_connections_closed_total",
		"detour_connections_refused_total", "detour_bytes_total", "detour_sniff_total", "detour_sniff_duration_seconds_bucket",
		"detour_dial_duration_seconds_bucket", "detour_dial_failures_total", "go_goroutines", "process_open_fds",
	} {
		if !m4.has(name) {
			t.Errorf("/metrics has no %s", name)
		}
	}
	t.Logf("metrics: accepted %g, closed %g, refused %g, bytes up %g down %g, goroutines %g, open fds %g",
		m4.sum("detour_connections_accepted_total"), m4.sum("detour_connections_closed_total"), m4.sum("detour_connections_refused_total"),
		m4.sum("detour_bytes_total", "direction", "up"), m4.sum("detour_bytes_total", "direction", "down"),
		m4.sum("go_goroutines"), m4.sum("process_open_fds"))
}
