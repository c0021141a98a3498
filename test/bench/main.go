//go:build linux

// Command bench measures detour against kernel forwarding, a minimal Go
// proxy and redsocks in a throwaway namespace topology (scripts/netns.sh):
// bulk throughput (iperf3, one and eight streams each way), new connections
// per second and latency with a new TCP connection per request (wrk against
// nginx), CPU seconds per GB, RSS and descriptors per held idle connection,
// the cost of sniffing a TLS ClientHello, and CONNECT through detour's
// explicit proxy port against squid and the transparent path (new
// connections per second, one stream). Candidates run interleaved
// within each repetition (more repetitions run when other work on the
// machine disturbed some); the table shows medians of the least disturbed
// and ratios to kernel forwarding, and the raw numbers go to
// test/bench/out/results-TIMESTAMP.json.
//
// It runs as root (`make bench`), creates its own namespaces dbXXXXXXXX-*,
// sends traffic only inside them, and removes them, its processes and its
// temporary files at the end, also after a failure or Ctrl-C. It does not
// tune detour: it reports where detour stands.
//
// The same binary is also the helpers it runs inside the namespaces
// (`bench helper NAME`, see helpers.go).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type options struct {
	quick          bool
	reps           int
	extraReps      int
	extraBefore    time.Duration
	bulkSeconds    int
	connSeconds    int
	latSeconds     int
	concurrency    int
	hold           int
	maxHold        int
	sniffN         int
	micro          bool
	benchtime      string
	detour         string
	outDir         string
	candidates     string
	redsocksSplice bool
	ipt2socks      string
	detourB        string
	bulk           bool
	timeout        time.Duration
}

// bench is one run: its namespaces, processes and results.
type bench struct {
	ctx    context.Context
	start  time.Time
	opts   options
	topo   *topology
	procs  *procs
	tmp    string
	root   string // the repository
	self   string // this binary, run as the helpers
	detour string

	nginx, iperf, holdServer, tlsServer *proc // server namespace
	socks                               *proc // upstream namespace
	holdClient                          *proc // client namespace

	res results
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "helper" {
		if err := runHelper(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "bench helper:", err)
			os.Exit(1)
		}
		return
	}
	os.Exit(benchMain())
}

func parseFlags() (options, error) {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.BoolVar(&o.quick, "quick", os.Getenv("BENCH_QUICK") == "1", "a ~2 minute run: one repetition, short runs (also BENCH_QUICK=1)")
	fs.IntVar(&o.reps, "reps", 0, "repetitions; the table shows medians (default 3, quick 1)")
	fs.IntVar(&o.extraReps, "extra-reps", -1, "repetitions added when others were disturbed by other work on the machine (default 2, quick 0)")
	fs.DurationVar(&o.extraBefore, "extra-before", 9*time.Minute, "start an added repetition only this long into the run")
	fs.IntVar(&o.bulkSeconds, "bulk-seconds", 0, "length of each iperf3 run (default 4, quick 2)")
	fs.IntVar(&o.connSeconds, "conn-seconds", 0, "length of the wrk run for connections per second (default 4, quick 2)")
	fs.IntVar(&o.latSeconds, "lat-seconds", 0, "length of the one-connection-at-a-time wrk run (default 2, quick 1)")
	fs.IntVar(&o.concurrency, "concurrency", 32, "wrk connections for the connections-per-second run")
	fs.IntVar(&o.hold, "hold", 0, "idle connections held through each proxy for RSS and fds (default 2000, quick 1000)")
	fs.IntVar(&o.maxHold, "max-hold", -1, "try to hold this many at once through detour-redirect (default 9000, quick 0 = skip)")
	fs.IntVar(&o.sniffN, "sniff-n", 0, "sequential TLS connections per port for the sniffing cost (default 2000, quick 300)")
	fs.BoolVar(&o.micro, "micro", true, "also run the Go microbenchmarks of ./sniff and ./tunnel")
	fs.StringVar(&o.benchtime, "benchtime", "", "go test -benchtime for the microbenchmarks (default 1s, quick 100ms)")
	fs.StringVar(&o.detour, "detour", "", "detour binary to measure (default: build ./cmd/detour)")
	fs.StringVar(&o.outDir, "out", "", "directory for the JSON results (default test/bench/out)")
	fs.StringVar(&o.candidates, "candidates", "", "comma-separated candidates from: "+candidateNames()+" (default: all but those only when named)")
	fs.BoolVar(&o.redsocksSplice, "redsocks-splice", true, "run redsocks with its splice = on option (its fastest relay)")
	fs.StringVar(&o.ipt2socks, "ipt2socks", os.Getenv("IPT2SOCKS"), "ipt2socks binary, built by hand outside the repository (also IPT2SOCKS=path); without it the candidate ipt2socks-socks5 is skipped and detour through SOCKS5 is compared with redsocks")
	fs.StringVar(&o.detourB, "detour-b", "", "a second detour binary: each detour candidate also runs with it, as NAME@b, interleaved with the first (an A/B comparison in one run)")
	fs.BoolVar(&o.bulk, "bulk", true, "run the iperf3 throughput tests (false: connections only, for quick comparisons)")
	fs.DurationVar(&o.timeout, "timeout", 0, "stop everything after this long (default 25m, quick 8m)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return o, err
	}
	def := func(v *int, full, quick int) {
		if *v <= 0 {
			*v = full
			if o.quick {
				*v = quick
			}
		}
	}
	def(&o.reps, 3, 1)
	def(&o.bulkSeconds, 4, 2)
	def(&o.connSeconds, 4, 2)
	def(&o.latSeconds, 2, 1)
	def(&o.hold, 2000, 1000)
	def(&o.sniffN, 2000, 300)
	if o.extraReps < 0 {
		o.extraReps = 2
		if o.quick {
			o.extraReps = 0
		}
	}
	if o.maxHold < 0 {
		o.maxHold = 9000
		if o.quick {
			o.maxHold = 0
		}
	}
	if o.benchtime == "" {
		o.benchtime = "1s"
		if o.quick {
			o.benchtime = "100ms"
		}
	}
	if o.timeout <= 0 {
		o.timeout = 25 * time.Minute
		if o.quick {
			o.timeout = 8 * time.Minute
		}
	}
	return o, nil
}

func candidateNames() string {
	var names []string
	for _, c := range allCandidates {
		names = append(names, c.Name)
	}
	for _, c := range extraCandidates {
		names = append(names, c.Name+" (only when named)")
	}
	return strings.Join(names, ", ")
}

func candidateNamed(name string) candidate {
	for _, c := range append(allCandidates, extraCandidates...) {
		if c.Name == name {
			return c
		}
	}
	panic("no candidate " + name)
}

func (o options) chosen() ([]candidate, error) {
	if o.candidates == "" {
		var out []candidate
		for _, c := range allCandidates {
			if c.kind == ipt2socksKind && o.ipt2socks == "" {
				fmt.Fprintln(os.Stderr, "bench: no ipt2socks binary (-ipt2socks or IPT2SOCKS): skipping ipt2socks-socks5; detour through SOCKS5 is judged against redsocks")
				continue
			}
			out = append(out, c)
		}
		return out, nil
	}
	var out []candidate
	for _, name := range strings.Split(o.candidates, ",") {
		found := false
		for _, c := range append(allCandidates, extraCandidates...) {
			if c.Name == name {
				out = append(out, c)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown candidate %q (want one of %s)", name, candidateNames())
		}
		if name == "ipt2socks-socks5" && o.ipt2socks == "" {
			return nil, errors.New("candidate ipt2socks-socks5 needs -ipt2socks PATH (or IPT2SOCKS=PATH): a binary built by hand")
		}
	}
	return out, nil
}

func benchMain() int {
	opts, err := parseFlags()
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	cands, err := opts.chosen()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	if opts.detourB != "" {
		if opts.detourB, err = filepath.Abs(opts.detourB); err != nil {
			fmt.Fprintln(os.Stderr, "bench: -detour-b:", err)
			return 2
		}
		for _, c := range cands {
			if c.kind == detourKind {
				c.Name, c.bin = c.Name+"@b", opts.detourB
				extraCandidates = append(extraCandidates, c)
				cands = append(cands, c)
			}
		}
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: must run as root (network namespaces, iptables): sudo make bench")
		return 2
	}
	if opts.ipt2socks != "" {
		if opts.ipt2socks, err = filepath.Abs(opts.ipt2socks); err == nil {
			_, err = os.Stat(opts.ipt2socks)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: -ipt2socks:", err)
			return 2
		}
	}
	for _, tool := range []string{"ip", "iptables", "iptables-save", "ss", "prlimit", "curl", "iperf3", "wrk", "nginx", "redsocks", "haproxy"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %s not found: install the bench dependencies (scripts/install-deps.sh --bench)\n", tool)
			return 2
		}
	}

	// The first Ctrl-C cancels the run, which then cleans up; a second one
	// cleans up at once and exits.
	ctx, cancel := context.WithTimeout(context.Background(), opts.timeout)
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	b := &bench{ctx: ctx, opts: opts}
	var cleanOnce sync.Once
	cleanup := func() { cleanOnce.Do(b.cleanup) }
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "bench: interrupted; cleaning up (again to force)")
		cancel()
		<-sigs
		cleanup()
		os.Exit(130)
	}()
	defer cleanup()

	b.start = time.Now()
	err = b.run(cands)
	b.res.Seconds = time.Since(b.start).Seconds()
	cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		if ctx.Err() != nil {
			return 130
		}
		return 1
	}
	b.report(os.Stdout)
	path, err := b.writeJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: writing results:", err)
		return 1
	}
	fmt.Printf("\nraw results: %s (%.0f s)\n", path, b.res.Seconds)
	return 0
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// cleanup stops every process, removes the namespaces and the temporary
// directory. It runs once, on every way out.
func (b *bench) cleanup() {
	if b.procs != nil {
		b.procs.killAll()
	}
	if b.topo != nil {
		if err := b.topo.down(); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		for _, ns := range []string{b.topo.C, b.topo.G, b.topo.S, b.topo.U} {
			if _, err := os.Stat("/run/netns/" + ns); err == nil {
				fmt.Fprintf(os.Stderr, "bench: namespace %s is still there\n", ns)
			}
		}
	}
	if b.tmp != "" {
		os.RemoveAll(b.tmp)
	}
}

func (b *bench) run(cands []candidate) error {
	var err error
	if b.root, err = repoRoot(); err != nil {
		return err
	}
	if b.self, err = os.Executable(); err != nil {
		return err
	}
	if b.tmp, err = os.MkdirTemp("", "detour-bench-"); err != nil {
		return err
	}
	os.Chmod(b.tmp, 0o755) // nginx and redsocks may read it as another user
	b.procs = &procs{dir: b.tmp}
	b.res = results{
		Started: time.Now().UTC().Format(time.RFC3339),
		Quick:   b.opts.quick,
		Options: map[string]any{
			"reps": b.opts.reps, "bulk_seconds": b.opts.bulkSeconds, "conn_seconds": b.opts.connSeconds,
			"lat_seconds": b.opts.latSeconds, "concurrency": b.opts.concurrency, "hold": b.opts.hold,
			"max_hold": b.opts.maxHold, "sniff_n": b.opts.sniffN, "redsocks_splice": b.opts.redsocksSplice,
			"ipt2socks": b.opts.ipt2socks, "bulk": b.opts.bulk,
			"proxy_nofile": nofile,
		},
		Host: hostInfo(b.root),
	}

	b.detour = b.opts.detour
	if b.detour == "" {
		b.detour = filepath.Join(b.tmp, "detour")
		b.logf("building detour")
		if out, err := runCmd(b.ctx, 5*time.Minute, "go", "-C", b.root, "build", "-trimpath", "-o", b.detour, "./cmd/detour"); err != nil {
			return fmt.Errorf("building detour: %v\n%s", err, out)
		}
	} else if b.detour, err = filepath.Abs(b.detour); err != nil {
		return err
	}
	if out, err := runCmd(b.ctx, 10*time.Second, b.detour, "version"); err == nil {
		b.res.Host["detour_version"] = strings.TrimSpace(out)
	}

	if b.opts.micro {
		b.logf("Go microbenchmarks (./sniff, ./tunnel/..., -benchtime %s)", b.opts.benchtime)
		out, err := runCmd(b.ctx, 5*time.Minute, "go", "-C", b.root, "test", "-run", "^$", "-bench", ".", "-benchmem",
			"-benchtime", b.opts.benchtime, "./sniff/", "./tunnel/...")
		if err != nil {
			b.res.Micro = "FAILED: " + err.Error() + "\n" + out
		} else {
			b.res.Micro = out
		}
	}

	id, err := newID()
	if err != nil {
		return err
	}
	b.topo = &topology{id: id, C: id + "-c", G: id + "-g", S: id + "-s", U: id + "-u", script: filepath.Join(b.root, "scripts", "netns.sh")}
	b.logf("topology %s: client, gateway, server, upstream", id)
	if err := b.topo.up(b.ctx); err != nil {
		return err
	}
	if err := b.startServers(); err != nil {
		return err
	}

	// Other work on the machine (this one is shared) disturbs a repetition
	// more than drift does: while fewer than -reps repetitions ran
	// undisturbed, up to -extra-reps more run, time allowing, and the
	// medians use the least disturbed ones.
	for rep := 1; rep <= b.opts.reps+b.opts.extraReps; rep++ {
		if rep > b.opts.reps {
			clean := b.cleanReps()
			if clean >= b.opts.reps {
				break
			}
			if time.Since(b.start) > b.opts.extraBefore {
				b.logf("%d of %d repetitions were disturbed by other work; no time left for another", b.opts.reps-clean, rep-1)
				break
			}
			b.logf("%d of %d repetitions were disturbed by other work; one more", rep-1-clean, rep-1)
		}
		// Interleave: every candidate once per repetition, starting with a
		// different one each time, so that drift touches all alike.
		for i := range cands {
			c := cands[(i+rep-1)%len(cands)]
			if err := b.ctx.Err(); err != nil {
				return err
			}
			b.logf("rep %d: %s", rep, c.Name)
			rr := b.measureRep(c, rep)
			if rr.Error != "" {
				b.logf("  %s: %s", c.Name, rr.Error)
			}
			b.res.Runs = append(b.res.Runs, rr)
		}
	}
	b.selectReps()

	for _, c := range cands {
		if c.kind == kernelKind || b.ctx.Err() != nil {
			continue
		}
		maxTry := 0
		if c.Name == "detour-redirect" {
			maxTry = b.opts.maxHold
		}
		b.logf("idle connections: %d through %s (then up to %d)", b.opts.hold, c.Name, maxTry)
		hr := holdRun{Candidate: c.Name}
		r, err := b.startCandidate(c)
		if err == nil {
			var h *holdResult
			h, err = b.hold(r, b.opts.hold, maxTry)
			hr.Result = h
			if serr := b.stopCandidate(r); serr != nil {
				return serr
			}
		}
		if err != nil {
			hr.Error = err.Error()
			b.logf("  %s", err)
		}
		b.res.Hold = append(b.res.Hold, hr)
	}

	if err := b.sniffCost(cands); err != nil {
		return err
	}
	if err := b.proxyPortCost(cands); err != nil {
		return err
	}
	if err := b.udpCost(cands); err != nil {
		return err
	}
	return b.ctx.Err()
}

// measureRep runs every throughput and connection test on one candidate.
func (b *bench) measureRep(c candidate, rep int) (rr repResult) {
	rr = repResult{Rep: rep, Candidate: c.Name, Bulk: map[string]*bulkResult{}}
	rr.IdleBefore = b.waitQuiet()
	fc := newForeignCPU(b.topo)
	snap, start := fc.snapshot(), time.Now()
	defer func() {
		wall := time.Since(start).Seconds() * float64(runtime.NumCPU())
		rr.ForeignCPU = fc.since(snap).Seconds() / wall
	}()
	r, err := b.startCandidate(c)
	if err != nil {
		rr.Error = err.Error()
		return rr
	}
	defer func() {
		if err := b.stopCandidate(r); err != nil && rr.Error == "" {
			rr.Error = err.Error()
		}
	}()
	fail := func(what string, err error) repResult {
		rr.Error = fmt.Sprintf("%s: %v", what, err)
		if r.proxy != nil && r.proxy.exited() {
			rr.Error += fmt.Sprintf("; the proxy exited (%v):\n%s", r.proxy.err, r.proxy.tail())
		}
		return rr
	}
	for _, t := range bulkTests {
		if !b.opts.bulk {
			break
		}
		res, err := b.bulk(r, t.Reverse, t.Streams)
		if err != nil {
			return fail(t.Key, err)
		}
		b.logf("  %-6s %6.2f Gbit/s", t.Key, res.Gbps)
		rr.Bulk[t.Key] = res
	}
	if rr.Conn, err = b.conns(r, b.opts.concurrency, b.opts.connSeconds); err != nil {
		return fail("conn/s", err)
	}
	b.logf("  conn/s %6.0f  p50 %.2f ms  p99 %.2f ms (%d connections)", rr.Conn.PerSec, rr.Conn.P50ms, rr.Conn.P99ms, b.opts.concurrency)
	if rr.Lat, err = b.conns(r, 1, b.opts.latSeconds); err != nil {
		return fail("latency", err)
	}
	b.logf("  one at a time: p50 %.3f ms  p99 %.3f ms", rr.Lat.P50ms, rr.Lat.P99ms)
	return rr
}

// waitQuiet waits (at most 10 s) until the machine is at least 90% idle
// before a measurement, and returns the idle share it saw last: other work
// on the machine shows up in the numbers.
func (b *bench) waitQuiet() float64 {
	deadline := time.Now().Add(10 * time.Second)
	for {
		idle := cpuIdle(500 * time.Millisecond)
		if idle >= 0.9 || time.Now().After(deadline) || b.ctx.Err() != nil {
			if idle < 0.9 {
				b.logf("  the machine is busy (%.0f%% idle): the numbers may be noisy", idle*100)
			}
			return idle
		}
	}
}

// sniffCost measures TLS latency through detour on a sniffed port and on a
// port in --sniff-skip-ports, with --sniff=false, and with kernel
// forwarding for reference.
func (b *bench) sniffCost(cands []candidate) error {
	detourRedirect := candidateNamed("detour-redirect")
	setups := []struct {
		name  string
		c     candidate
		extra []string
		ports []int
	}{
		{"kernel", candidateNamed("kernel"), nil, []int{tlsPort, tlsSkip}},
		{"detour-redirect --sniff-skip-ports 9443", detourRedirect, []string{"--sniff-skip-ports", strconv.Itoa(tlsSkip)}, []int{tlsPort, tlsSkip}},
		{"detour-redirect --sniff=false", detourRedirect, []string{"--sniff=false"}, []int{tlsPort}},
	}
	want := map[string]bool{}
	for _, c := range cands {
		want[c.Name] = true
	}
	for _, s := range setups {
		if !want[s.c.Name] || b.ctx.Err() != nil {
			continue
		}
		b.logf("TLS handshakes: %d per port through %s", b.opts.sniffN, s.name)
		sr := sniffResult{Setup: s.name}
		r, err := b.startCandidate(s.c, s.extra...)
		if err != nil {
			return err
		}
		sr.Ports, err = b.tlsLatency(b.opts.sniffN, r.proxy != nil, s.ports...)
		if serr := b.stopCandidate(r); serr != nil {
			return serr
		}
		if err != nil {
			b.logf("  %v", err)
			b.res.Sniff = append(b.res.Sniff, sniffResult{Setup: s.name, Error: err.Error()})
			continue
		}
		for _, p := range s.ports {
			st := sr.Ports[strconv.Itoa(p)]
			b.logf("  port %d: first response p50 %.0f µs, handshake p50 %.0f µs", p, st.FirstP50us, st.HandshakeP50)
		}
		b.res.Sniff = append(b.res.Sniff, sr)
	}
	return nil
}

// nginxConf serves a tiny response and, at /peer, the address it sees.
const nginxConf = `daemon off;
master_process off;
worker_rlimit_nofile 100000;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events { worker_connections 50000; }
http {
	access_log off;
	default_type text/plain;
	server {
		listen %[2]s:%[3]d backlog=4096;
		location = /peer { return 200 "$remote_addr\n"; }
		location / { return 200 "hello from the bench server\n"; }
	}
}
`

func (b *bench) startServers() error {
	conf := filepath.Join(b.tmp, "nginx.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(nginxConf, b.tmp, serverIP, httpPort)), 0o644); err != nil {
		return err
	}
	var err error
	t := b.topo
	if b.nginx, err = b.procs.start("nginx", t.S, 0, false, "nginx", "-c", conf, "-p", b.tmp); err != nil {
		return err
	}
	if err := b.startIperf(); err != nil {
		return err
	}
	if b.holdServer, err = b.procs.start("holdserver", t.S, 0, true, b.self, "helper", "holdserver", "-listen", fmt.Sprintf("%s:%d", serverIP, holdPort)); err != nil {
		return err
	}
	if b.tlsServer, err = b.procs.start("tlsserver", t.S, 0, true, b.self, "helper", "tlsserver",
		"-listen", fmt.Sprintf("%s:%d,%s:%d", serverIP, tlsPort, serverIP, tlsSkip)); err != nil {
		return err
	}
	if b.socks, err = b.procs.start("socks5", t.U, 0, true, b.self, "helper", "socks5", "-listen", fmt.Sprintf("%s:%d", upstreamIP, socksPort)); err != nil {
		return err
	}
	if b.holdClient, err = b.procs.start("holdclient", t.C, 0, true, b.self, "helper", "holdclient"); err != nil {
		return err
	}
	for _, w := range []struct {
		ns   string
		port int
		p    *proc
	}{{t.S, httpPort, b.nginx}, {t.S, holdPort, b.holdServer}, {t.S, tlsPort, b.tlsServer}, {t.S, tlsSkip, b.tlsServer}, {t.U, socksPort, b.socks}} {
		if err := b.waitListen(w.ns, w.port, 10*time.Second); err != nil {
			return fmt.Errorf("%s: %w\n%s", w.p.name, err, w.p.tail())
		}
	}
	return nil
}

func (b *bench) startIperf() error {
	var err error
	b.iperf, err = b.procs.start("iperf3", b.topo.S, 0, false, "iperf3", "-s", "-J", "-B", serverIP, "-p", strconv.Itoa(iperfPort))
	if err != nil {
		return err
	}
	if err := b.waitListen(b.topo.S, iperfPort, 10*time.Second); err != nil {
		return fmt.Errorf("iperf3: %w\n%s", err, b.iperf.tail())
	}
	return nil
}

func (b *bench) restartIperf() error {
	b.iperf.stop(2 * time.Second)
	return b.startIperf()
}

// repoRoot is the directory above the working directory that holds
// scripts/netns.sh and go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "scripts", "netns.sh")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				return dir, nil
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run the bench inside the detour repository (scripts/netns.sh not found)")
		}
		dir = parent
	}
}

func hostInfo(root string) map[string]any {
	info := map[string]any{"cpus": runtime.NumCPU(), "go": runtime.Version()}
	ctx := context.Background()
	if out, err := runCmd(ctx, 5*time.Second, "uname", "-r"); err == nil {
		info["kernel"] = strings.TrimSpace(out)
	}
	if out, err := runCmd(ctx, 5*time.Second, "git", "-C", root, "describe", "--always", "--dirty"); err == nil {
		info["commit"] = strings.TrimSpace(out)
	}
	for _, tool := range [][]string{{"iperf3", "--version"}, {"wrk", "-v"}, {"nginx", "-v"}, {"redsocks", "-v"}, {"haproxy", "-v"}} {
		out, _ := runCmd(ctx, 5*time.Second, tool[0], tool[1:]...)
		line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
		info[tool[0]] = line
	}
	return info
}

func (b *bench) writeJSON() (string, error) {
	dir := b.opts.outDir
	if dir == "" {
		dir = filepath.Join(b.root, "test", "bench", "out")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, "results-"+time.Now().Format("20060102-150405")+".json")
	data, err := json.MarshalIndent(b.res, "", "  ")
	if err != nil {
		return "", err
	}
	return path, os.WriteFile(path, append(data, '\n'), 0o644)
}
