package test

// Operation under load: thousands of held connections and back to idle,
// silent clients beside normal ones (--max-sniffing).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestOperateLoad: 5,000 connections held through detour at once, then
// closed; detour's goroutines and fds go back to their idle level, by its
// stats line and by its metrics, and its counters add up.
func TestOperateLoad(t *testing.T) {
	const conns = 5000
	// This process holds both ends (client and server sockets).
	raiseNoFile(t, 2*conns+2048)
	tp := newTopo(t)
	startServers(t, tp)
	d := startOp(t, tp)
	addr := net.JoinHostPort(families[0].server, strconv.Itoa(bulkPort))

	// A few first, so that what is made once (metric series, pools) is in
	// the idle level.
	warm, errs := dialMany(tp, addr, 20, 4, 20*time.Second, holdIdle)
	closeAll(warm)
	if len(errs) > 0 {
		t.Fatalf("warm-up: %v", errs[0])
	}
	base := measureIdle(t, d, tp)
	m0 := scrape(t, tp)
	rss0 := procKB(t, d.cmd.Process.Pid, "VmRSS")

	start := time.Now()
	held, errs := dialMany(tp, addr, conns, 64, 90*time.Second, holdIdle)
	t.Cleanup(func() { closeAll(held) })
	took := time.Since(start)
	for _, err := range errs[:min(len(errs), 5)] {
		t.Error(err)
	}
	if len(errs) > 0 {
		t.Fatalf("%d of %d connections failed (in %v)", len(errs), conns, took)
	}
	active, goroutines, fds := d.stats(t)
	mHeld := scrape(t, tp)
	rss := procKB(t, d.cmd.Process.Pid, "VmRSS")
	t.Logf("%d connections made in %v; held: active %d (metric %g), goroutines %d (idle %d), fds %d (idle %d), VmRSS %d kB (idle %d kB)",
		conns, took.Round(time.Millisecond), active, mHeld.sum("detour_connections_active"), goroutines, base.goroutines, fds, base.fds, rss, rss0)
	if active != conns || mHeld.sum("detour_connections_active") != conns {
		t.Errorf("detour serves %d connections (metric %g), want %d", active, mHeld.sum("detour_connections_active"), conns)
	}
	if per := float64(fds-base.fds) / conns; per > 2.1 {
		t.Errorf("%.2f fds per idle connection (%d → %d), want 2", per, base.fds, fds)
	}
	if got := mHeld.sum("process_open_fds"); got < float64(base.fds+2*conns) {
		t.Errorf("process_open_fds = %g with %d connections held, want at least %d", got, conns, base.fds+2*conns)
	}

	start = time.Now()
	closeAll(held)
	now, m1 := backToIdle(t, d, tp, base, 30*time.Second)
	t.Logf("back to idle %v after closing: goroutines %d (idle %d), fds %d (idle %d); metrics go_goroutines %d (idle %d), process_open_fds %d (idle %d)",
		time.Since(start).Round(time.Millisecond), now.goroutines, base.goroutines, now.fds, base.fds,
		now.mGoroutines, base.mGoroutines, now.mOpenFDs, base.mOpenFDs)

	// The counters say what the clients did: conns accepted, closed direct,
	// "Ihold" up and "I" down each, one sniff and one dial each.
	wantDelta(t, m0, m1, conns, "detour_connections_accepted_total")
	wantDelta(t, m0, m1, conns, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m0, m1, 0, "detour_connections_refused_total")
	wantDelta(t, m0, m1, 5*conns, "detour_bytes_total", "direction", "up")
	wantDelta(t, m0, m1, conns, "detour_bytes_total", "direction", "down")
	wantDelta(t, m0, m1, conns, "detour_sniff_total")
	wantDelta(t, m0, m1, conns, "detour_dial_duration_seconds_count", "route", "direct")
	wantDelta(t, m0, m1, 0, "detour_dial_failures_total")
	if n := len(d.find("conn", map[string]string{"dst": addr, "route": "direct", "up": "5", "down": "1", "error": ""})); n != conns+len(warm) {
		t.Errorf("%d clean access lines for %s, want %d", n, addr, conns+len(warm))
	}
}

// TestOperateSlowloris: 1,000 clients connect and send nothing while 200
// others make HTTP requests; with --max-sniffing below the silent crowd,
// every request is answered at once, routed by IP when no sniffing slot is
// free (sniff outcome "busy").
func TestOperateSlowloris(t *testing.T) {
	const silent, normal, maxSniffing = 1000, 200, 256
	raiseNoFile(t, 2*(silent+normal)+2048)
	tp := newTopo(t)
	startServers(t, tp)
	// A sniff timeout long enough that the silent clients hold their
	// sniffing slots while the others come.
	d := startOp(t, tp, "--max-sniffing", strconv.Itoa(maxSniffing), "--sniff-timeout", "3s")
	m0 := scrape(t, tp)
	web := net.JoinHostPort(families[0].server, strconv.Itoa(httpPort))

	start := time.Now()
	quiet, errs := dialMany(tp, web, silent, 50, 30*time.Second, nil)
	t.Cleanup(func() { closeAll(quiet) })
	if len(errs) > 0 {
		t.Fatalf("%d silent clients could not connect: %v", len(errs), errs[0])
	}
	t.Logf("%d silent clients connected in %v", silent, time.Since(start).Round(time.Millisecond))
	// detour has accepted them all before the others come.
	if n := waitActive(t, d, func(a int) bool { return a >= silent }, 10*time.Second); n < silent {
		t.Fatalf("detour serves %d connections, want the %d silent ones", n, silent)
	}

	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return clientDial(tp, addr)
			},
		},
	}
	defer client.CloseIdleConnections()
	var (
		mu      sync.Mutex
		slowest time.Duration
		failed  []error
		next    atomic.Int64
		wg      sync.WaitGroup
	)
	start = time.Now()
	for range 20 {
		wg.Go(func() {
			for i := next.Add(1); i <= normal; i = next.Add(1) {
				req, _ := http.NewRequest("GET", "http://"+web+"/", nil)
				req.Host = fmt.Sprintf("normal%d.test", i)
				t0 := time.Now()
				resp, err := client.Do(req)
				var body []byte
				if err == nil {
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && (resp.StatusCode != 200 || !bytes.HasPrefix(body, []byte("hello from the server namespace"))) {
						err = fmt.Errorf("%s %q", resp.Status, body)
					}
				}
				took := time.Since(t0)
				mu.Lock()
				slowest = max(slowest, took)
				if err != nil {
					failed = append(failed, fmt.Errorf("request %d: %w", i, err))
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	t.Logf("%d requests (20 at a time) beside %d silent clients in %v; slowest %v",
		normal, silent, time.Since(start).Round(time.Millisecond), slowest.Round(time.Millisecond))
	for _, err := range failed[:min(len(failed), 5)] {
		t.Error(err)
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d requests failed beside the silent clients", len(failed), normal)
	}
	if slowest > 2*time.Second {
		t.Errorf("the slowest request took %v beside silent clients; want under 2s (the sniff timeout is 3s)", slowest)
	}

	closeAll(quiet)
	if n := waitActive(t, d, nil, 15*time.Second); n != 0 {
		t.Fatalf("detour still serves %d connections after the clients left", n)
	}
	m1 := scrape(t, tp)
	outcomes := map[string]float64{}
	for _, o := range []string{"found", "none", "timeout", "too-large", "closed", "skipped", "off", "busy"} {
		outcomes[o] = delta(m0, m1, "detour_sniff_total", "outcome", o)
	}
	t.Logf("sniff outcomes: %v", outcomes)
	if outcomes["busy"] == 0 {
		t.Errorf("no sniff outcome \"busy\" with %d silent clients and --max-sniffing %d:\n%s", silent, maxSniffing, m1.series("detour_sniff_total"))
	}
	// Only silent clients wait in the sniffing stage (the others send at
	// once): no more of them than --max-sniffing.
	if waited := outcomes["timeout"] + outcomes["closed"]; waited > maxSniffing {
		t.Errorf("%g silent clients waited in the sniffing stage, want at most --max-sniffing %d", waited, maxSniffing)
	}
	wantDelta(t, m0, m1, silent+normal, "detour_sniff_total")
	wantDelta(t, m0, m1, silent+normal, "detour_connections_closed_total", "route", "direct")
	if n := len(d.find("conn", map[string]string{"sniff": "busy"})); float64(n) != outcomes["busy"] {
		t.Errorf("%d access lines with sniff busy, the metric says %g", n, outcomes["busy"])
	}
}
