//go:build linux

package main

// The measurements: bulk throughput (iperf3), new connections per second
// and latency (wrk against nginx), held idle connections (holdclient and
// holdserver), and the cost of sniffing (tlsclient and tlsserver).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// bulkTests are the iperf3 runs, in order.
var bulkTests = []struct {
	Key     string
	Reverse bool // server → client
	Streams int
}{
	{"up1", false, 1},
	{"down1", true, 1},
	{"up8", false, 8},
	{"down8", true, 8},
}

// bulkResult is one iperf3 run.
type bulkResult struct {
	Gbps        float64 `json:"gbps"`  // at the receiver
	Bytes       int64   `json:"bytes"` // received
	ProxyCPUs   float64 `json:"proxy_cpu_s,omitempty"`
	UpstreamCPU float64 `json:"upstream_cpu_s,omitempty"`
	Retransmits int64   `json:"retransmits"`
}

// iperf3's JSON, the parts used.
type iperfJSON struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			Retransmits int64 `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
	ServerOutput struct {
		Start struct {
			Connected []struct {
				RemoteHost string `json:"remote_host"`
			} `json:"connected"`
		} `json:"start"`
	} `json:"server_output_json"`
}

// bulk runs one iperf3 test from the client and checks that the server
// saw the peer it should.
func (b *bench) bulk(r *running, reverse bool, streams int) (*bulkResult, error) {
	args := []string{"iperf3", "-c", serverIP, "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(b.opts.bulkSeconds),
		"-P", strconv.Itoa(streams), "-J", "--get-server-output", "--connect-timeout", "3000"}
	if reverse {
		args = append(args, "-R")
	}
	var out string
	var err error
	var res bulkResult
	for try := 0; try < 2; try++ {
		cpu0, up0 := b.proxyCPU(r)
		out, err = runCmd(b.ctx, time.Duration(b.opts.bulkSeconds+20)*time.Second, "ip", append([]string{"netns", "exec", b.topo.C}, args...)...)
		cpu1, up1 := b.proxyCPU(r)
		res.ProxyCPUs, res.UpstreamCPU = (cpu1 - cpu0).Seconds(), (up1 - up0).Seconds()
		if err == nil || b.ctx.Err() != nil {
			break
		}
		// A stuck iperf3 server ("busy") is restarted once.
		b.logf("    iperf3 failed (%v), restarting the iperf3 server and trying again", err)
		if rerr := b.restartIperf(); rerr != nil {
			return nil, rerr
		}
	}
	var j iperfJSON
	if jerr := json.Unmarshal([]byte(out), &j); jerr != nil {
		return nil, fmt.Errorf("iperf3: %v (%v)\n%s", err, jerr, truncate(out))
	}
	if j.Error != "" || err != nil {
		return nil, fmt.Errorf("iperf3: %v %s", err, j.Error)
	}
	if len(j.ServerOutput.Start.Connected) != streams {
		return nil, fmt.Errorf("iperf3 server reports %d streams, want %d", len(j.ServerOutput.Start.Connected), streams)
	}
	for _, c := range j.ServerOutput.Start.Connected {
		if c.RemoteHost != r.c.Peer {
			return nil, fmt.Errorf("the iperf3 server saw a stream from %s, want %s: the traffic did not cross %s", c.RemoteHost, r.c.Peer, r.c.Name)
		}
	}
	res.Gbps = j.End.SumReceived.BitsPerSecond / 1e9
	res.Bytes = int64(j.End.SumReceived.Bytes)
	res.Retransmits = j.End.SumSent.Retransmits
	return &res, nil
}

// proxyCPU is the CPU time of the proxy and of the SOCKS5 upstream so far.
func (b *bench) proxyCPU(r *running) (proxy, upstream time.Duration) {
	if r.proxy != nil {
		proxy, _ = cpuTime(r.proxy.pid())
	}
	if r.c.Peer == upstreamIP {
		upstream, _ = cpuTime(b.socks.pid())
	}
	return proxy, upstream
}

// connResult is one wrk run: a new TCP connection per request.
type connResult struct {
	Concurrency int     `json:"concurrency"`
	Requests    int64   `json:"requests"`
	PerSec      float64 `json:"per_sec"`
	P50ms       float64 `json:"p50_ms"`
	P90ms       float64 `json:"p90_ms"`
	P99ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
	Errors      int64   `json:"errors"`
	Captured    int64   `json:"captured_packets"` // REDIRECT/TPROXY rule hits during the run
	ProxyCPUs   float64 `json:"proxy_cpu_s,omitempty"`
	UpstreamCPU float64 `json:"upstream_cpu_s,omitempty"`
}

// The wrk script: close the connection after each request, and print the
// summary as JSON.
const wrkScript = `wrk.headers["Connection"] = "close"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
`

// conns runs wrk with a new connection per request at the given concurrency
// and checks with the capture rules' counters that the connections crossed
// the proxy.
func (b *bench) conns(r *running, concurrency, seconds int) (*connResult, error) {
	script := filepath.Join(b.tmp, "close.lua")
	if err := os.WriteFile(script, []byte(wrkScript), 0o644); err != nil {
		return nil, err
	}
	cap0, err := b.captured()
	if err != nil {
		return nil, err
	}
	url := fmt.Sprintf("http://%s:%d/", serverIP, httpPort)
	cpu0, up0 := b.proxyCPU(r)
	out, err := runCmd(b.ctx, time.Duration(seconds+20)*time.Second, "ip", "netns", "exec", b.topo.C,
		"wrk", "-t", "1", "-c", strconv.Itoa(concurrency), "-d", fmt.Sprintf("%ds", seconds), "--timeout", "2s", "-s", script, url)
	cpu1, up1 := b.proxyCPU(r)
	if err != nil {
		return nil, fmt.Errorf("wrk: %v\n%s", err, truncate(out))
	}
	cap1, err := b.captured()
	if err != nil {
		return nil, err
	}
	_, js, ok := strings.Cut(out, "BENCHJSON ")
	if !ok {
		return nil, fmt.Errorf("wrk printed no summary:\n%s", truncate(out))
	}
	var w struct {
		Requests   int64 `json:"requests"`
		DurationUs int64 `json:"duration_us"`
		P50us      int64 `json:"p50_us"`
		P90us      int64 `json:"p90_us"`
		P99us      int64 `json:"p99_us"`
		MaxUs      int64 `json:"max_us"`
		Errors     int64 `json:"errors"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(js)), &w); err != nil {
		return nil, fmt.Errorf("wrk summary %q: %v", js, err)
	}
	res := &connResult{
		Concurrency: concurrency,
		Requests:    w.Requests,
		P50ms:       float64(w.P50us) / 1000,
		P90ms:       float64(w.P90us) / 1000,
		P99ms:       float64(w.P99us) / 1000,
		MaxMs:       float64(w.MaxUs) / 1000,
		Errors:      w.Errors,
		Captured:    cap1 - cap0,
		ProxyCPUs:   (cpu1 - cpu0).Seconds(),
		UpstreamCPU: (up1 - up0).Seconds(),
	}
	if w.DurationUs > 0 {
		res.PerSec = float64(w.Requests-w.Errors) / (float64(w.DurationUs) / 1e6)
	}
	if w.Requests == 0 {
		return nil, fmt.Errorf("wrk completed no request:\n%s", truncate(out))
	}
	if w.Errors*100 > w.Requests {
		return nil, fmt.Errorf("wrk: %d of %d requests failed", w.Errors, w.Requests)
	}
	// Each proxied connection hits the capture rule at least once (its SYN).
	if r.proxy != nil && res.Captured < w.Requests*9/10 {
		return nil, fmt.Errorf("only %d packets hit the capture rules for %d connections: the traffic did not cross %s", res.Captured, w.Requests, r.c.Name)
	}
	if r.proxy == nil && res.Captured != 0 {
		return nil, fmt.Errorf("%d packets hit capture rules during kernel forwarding", res.Captured)
	}
	return res, nil
}

// holdResult is the cost of idle connections held through a proxy.
type holdResult struct {
	Held       int     `json:"held"`
	RSSBefore  int64   `json:"rss_before_kib"`
	RSSAfter   int64   `json:"rss_after_kib"`
	FDsBefore  int     `json:"fds_before"`
	FDsAfter   int     `json:"fds_after"`
	KiBPerConn float64 `json:"kib_per_conn"`
	FDsPerConn float64 `json:"fds_per_conn"`
	// The bounded attempt to hold MaxTried connections at once.
	MaxTried int    `json:"max_tried,omitempty"`
	MaxHeld  int    `json:"max_held,omitempty"`
	MaxFDs   int    `json:"max_fds,omitempty"`
	MaxRSS   int64  `json:"max_rss_kib,omitempty"`
	MaxNote  string `json:"max_note,omitempty"`
}

// hold opens n idle connections through the proxy, reads its RSS and fds
// before and after, and, when maxTry > n, keeps opening in steps up to
// maxTry until connections fail.
func (b *bench) hold(r *running, n, maxTry int) (*holdResult, error) {
	pid := r.proxy.pid()
	var res holdResult
	var err error
	settle := func() { time.Sleep(500 * time.Millisecond) }
	settle()
	if res.RSSBefore, err = rssKiB(pid); err != nil {
		return nil, err
	}
	if res.FDsBefore, err = fdCount(pid); err != nil {
		return nil, err
	}
	defer b.closeHeld()
	target := fmt.Sprintf("%s:%d", serverIP, holdPort)
	rep, err := b.openHeld(n, target)
	if err != nil {
		return nil, err
	}
	if rep.OK != n {
		return nil, fmt.Errorf("held %d of %d connections through %s (%s)", rep.OK, n, r.c.Name, rep.Err)
	}
	if err := b.checkHeldPeers(n, r.c.Peer); err != nil {
		return nil, err
	}
	settle()
	res.Held = n
	if res.RSSAfter, err = rssKiB(pid); err != nil {
		return nil, err
	}
	if res.FDsAfter, err = fdCount(pid); err != nil {
		return nil, err
	}
	res.KiBPerConn = float64(res.RSSAfter-res.RSSBefore) / float64(n)
	res.FDsPerConn = float64(res.FDsAfter-res.FDsBefore) / float64(n)
	if maxTry <= n {
		return &res, nil
	}
	res.MaxTried, res.MaxHeld = maxTry, n
	const step = 1000
	deadline := time.Now().Add(90 * time.Second)
	for res.MaxHeld < maxTry && time.Now().Before(deadline) && b.ctx.Err() == nil {
		rep, err := b.openHeld(min(step, maxTry-res.MaxHeld), target)
		if err != nil {
			return nil, err
		}
		res.MaxHeld += rep.OK
		if rep.Fail > 0 {
			res.MaxNote = fmt.Sprintf("%d connections failed after %d held: %s", rep.Fail, res.MaxHeld, rep.Err)
			break
		}
		if r.proxy.exited() {
			res.MaxNote = "the proxy exited"
			break
		}
	}
	settle()
	res.MaxFDs, _ = fdCount(pid)
	res.MaxRSS, _ = rssKiB(pid)
	if res.MaxNote == "" {
		// All held end to end: the server must see every one from the peer.
		if err := b.checkHeldPeers(res.MaxHeld, r.c.Peer); err != nil {
			return nil, err
		}
	}
	if logs := countInLog(r.proxy, "too many open files"); logs > 0 {
		res.MaxNote += fmt.Sprintf("; %d log lines say \"too many open files\"", logs)
	}
	return &res, nil
}

func (b *bench) openHeld(n int, target string) (*holdReply, error) {
	line, err := b.holdClient.ask(fmt.Sprintf("open %d %s", n, target), 2*time.Minute)
	if err != nil {
		return nil, err
	}
	var rep holdReply
	if err := json.Unmarshal([]byte(line), &rep); err != nil {
		return nil, fmt.Errorf("holdclient said %q", line)
	}
	return &rep, nil
}

// checkHeldPeers waits until the hold server holds n connections, all
// from peer.
func (b *bench) checkHeldPeers(n int, peer string) error {
	var open map[string]int
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		line, err := b.holdServer.ask("stats", 10*time.Second)
		if err != nil {
			return err
		}
		open = nil
		json.Unmarshal([]byte(line), &open)
		if open[peer] == n && len(open) == 1 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("the hold server holds %v, want %d from %s", open, n, peer)
}

// closeHeld closes the held connections and waits until the server has
// seen them go.
func (b *bench) closeHeld() {
	b.holdClient.ask("close", time.Minute)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		line, err := b.holdServer.ask("stats", 10*time.Second)
		if err != nil || line == "{}" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func countInLog(p *proc, s string) int {
	data, _ := os.ReadFile(p.log)
	return strings.Count(strings.ToLower(string(data)), s)
}

// sniffResult is the TLS latency on a sniffed and an unsniffed port.
type sniffResult struct {
	Setup string              `json:"setup"`
	Ports map[string]tlsStats `json:"ports,omitempty"`
	Error string              `json:"error,omitempty"`
}

// tlsLatency runs the TLS client against the given ports on the server.
// proxied says whether the capture rules' counters must grow.
func (b *bench) tlsLatency(n int, proxied bool, ports ...int) (map[string]tlsStats, error) {
	cap0, err := b.captured()
	if err != nil {
		return nil, err
	}
	var addrs []string
	for _, p := range ports {
		addrs = append(addrs, fmt.Sprintf("%s:%d", serverIP, p))
	}
	out, err := runCmd(b.ctx, 3*time.Minute, "ip", "netns", "exec", b.topo.C, b.self, "helper", "tlsclient",
		"-n", strconv.Itoa(n), "-addrs", strings.Join(addrs, ","), "-limit", "90s")
	if err != nil {
		return nil, fmt.Errorf("tlsclient: %v\n%s", err, truncate(out))
	}
	var raw map[string]tlsStats
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		return nil, fmt.Errorf("tlsclient said %q: %v", truncate(out), err)
	}
	cap1, err := b.captured()
	if err != nil {
		return nil, err
	}
	res := map[string]tlsStats{}
	var done int
	for _, s := range raw {
		done += s.N
	}
	if proxied && cap1-cap0 < int64(done) {
		return nil, fmt.Errorf("only %d packets hit the capture rules for %d TLS connections: the traffic did not cross the proxy", cap1-cap0, done)
	}
	for _, p := range ports {
		s := raw[fmt.Sprintf("%s:%d", serverIP, p)]
		if s.N == 0 || s.Errors*100 > s.N {
			return nil, fmt.Errorf("TLS to port %d: %d done, %d errors (%s)", p, s.N, s.Errors, s.FirstErr)
		}
		res[strconv.Itoa(p)] = s
	}
	return res, nil
}

func truncate(s string) string {
	if len(s) > 3000 {
		return s[:3000] + "…"
	}
	return s
}
