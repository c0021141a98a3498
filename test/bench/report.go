//go:build linux

package main

// The results: raw per repetition (JSON), medians, the table and the
// targets detour is judged on.

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

type results struct {
	Started string         `json:"started"`
	Seconds float64        `json:"seconds"`
	Quick   bool           `json:"quick"`
	Options map[string]any `json:"options"`
	Host    map[string]any `json:"host"`

	Runs     []repResult           `json:"runs"`
	UsedReps []int                 `json:"used_reps"` // the repetitions the medians use
	Medians  map[string]*medianSet `json:"medians"`
	Hold     []holdRun             `json:"hold"`
	Sniff    []sniffResult         `json:"sniff"`
	// ProxyPort compares CONNECT through detour's proxy port, squid and
	// the transparent path.
	ProxyPort []proxyPortResult `json:"proxy_port"`
	// UDP compares detour's UDP path (TPROXY) with kernel forwarding.
	UDP     []udpResult `json:"udp"`
	Targets []target    `json:"targets"`
	Micro   string      `json:"go_microbenchmarks,omitempty"`
}

// repResult is one candidate in one repetition.
type repResult struct {
	Rep       int                    `json:"rep"`
	Candidate string                 `json:"candidate"`
	Bulk      map[string]*bulkResult `json:"bulk"`
	Conn      *connResult            `json:"conn,omitempty"`    // wrk, -concurrency connections
	Lat       *connResult            `json:"latency,omitempty"` // wrk, one connection at a time
	// IdleBefore is the machine's idle CPU share just before the run;
	// ForeignCPU the share of the machine's CPU that processes outside the
	// bench used during it.
	IdleBefore float64 `json:"idle_before"`
	ForeignCPU float64 `json:"foreign_cpu"`
	Used       bool    `json:"used"` // in the medians
	Error      string  `json:"error,omitempty"`
}

type holdRun struct {
	Candidate string      `json:"candidate"`
	Result    *holdResult `json:"result,omitempty"`
	Error     string      `json:"error,omitempty"`
}

// disturbed is how much of the machine other work used during a run
// beyond which the run counts as disturbed.
const disturbed = 0.15

// repNoise is, per repetition, the largest share of the machine that other
// work used during any of its runs.
func (b *bench) repNoise() map[int]float64 {
	noise := map[int]float64{}
	for _, r := range b.res.Runs {
		noise[r.Rep] = max(noise[r.Rep], r.ForeignCPU)
	}
	return noise
}

func (b *bench) cleanReps() int {
	n := 0
	for _, v := range b.repNoise() {
		if v <= disturbed {
			n++
		}
	}
	return n
}

// selectReps marks the runs of the -reps least disturbed repetitions as
// the ones the medians use.
func (b *bench) selectReps() {
	noise := b.repNoise()
	var reps []int
	for rep := range noise {
		reps = append(reps, rep)
	}
	sort.Slice(reps, func(i, j int) bool {
		if noise[reps[i]] != noise[reps[j]] {
			return noise[reps[i]] < noise[reps[j]]
		}
		return reps[i] < reps[j]
	})
	used := map[int]bool{}
	for _, rep := range reps[:min(len(reps), b.opts.reps)] {
		used[rep] = true
	}
	b.res.UsedReps = nil
	for _, rep := range reps {
		if used[rep] {
			b.res.UsedReps = append(b.res.UsedReps, rep)
		}
	}
	sort.Ints(b.res.UsedReps)
	for i := range b.res.Runs {
		b.res.Runs[i].Used = used[b.res.Runs[i].Rep]
	}
}

// medianSet holds the medians over the repetitions that completed.
type medianSet struct {
	Reps        int                `json:"reps"`
	Gbps        map[string]float64 `json:"gbps"`
	CPUPerGB    float64            `json:"proxy_cpu_s_per_gb"`    // the proxy process (detour or redsocks)
	UpCPUPerGB  float64            `json:"upstream_cpu_s_per_gb"` // the bench's SOCKS5 upstream
	ConnPerSec  float64            `json:"conn_per_sec"`
	ConnCPUus   float64            `json:"proxy_cpu_us_per_conn"`    // during the conn/s run
	UpConnCPUus float64            `json:"upstream_cpu_us_per_conn"` // the SOCKS5 upstream's
	ConnP50ms   float64            `json:"conn_p50_ms"`
	ConnP99ms   float64            `json:"conn_p99_ms"`
	LatP50ms    float64            `json:"latency_p50_ms"`
	LatP99ms    float64            `json:"latency_p99_ms"`
	Errors      []string           `json:"errors,omitempty"`
	candidateOK bool
}

type target struct {
	Name   string `json:"name"`
	Value  string `json:"value"`
	Status string `json:"status"` // PASS, MISS or n/a
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (b *bench) medians() map[string]*medianSet {
	out := map[string]*medianSet{}
	type acc struct {
		gbps                                    map[string][]float64
		cpu, upcpu, cps, cp50, cp99, lp50, lp99 []float64
		ccpu, upccpu                            []float64
	}
	accs := map[string]*acc{}
	for _, r := range b.res.Runs {
		if !r.Used {
			continue
		}
		m := out[r.Candidate]
		if m == nil {
			m = &medianSet{Gbps: map[string]float64{}}
			out[r.Candidate] = m
			accs[r.Candidate] = &acc{gbps: map[string][]float64{}}
		}
		if r.Error != "" {
			m.Errors = append(m.Errors, fmt.Sprintf("rep %d: %s", r.Rep, r.Error))
			continue
		}
		a := accs[r.Candidate]
		m.Reps++
		var cpu, upcpu, bytes float64
		for k, v := range r.Bulk {
			a.gbps[k] = append(a.gbps[k], v.Gbps)
			cpu += v.ProxyCPUs
			upcpu += v.UpstreamCPU
			bytes += float64(v.Bytes)
		}
		if bytes > 0 {
			a.cpu = append(a.cpu, cpu/(bytes/1e9))
			a.upcpu = append(a.upcpu, upcpu/(bytes/1e9))
		}
		a.cps = append(a.cps, r.Conn.PerSec)
		if ok := r.Conn.Requests - r.Conn.Errors; ok > 0 {
			a.ccpu = append(a.ccpu, r.Conn.ProxyCPUs*1e6/float64(ok))
			a.upccpu = append(a.upccpu, r.Conn.UpstreamCPU*1e6/float64(ok))
		}
		a.cp50 = append(a.cp50, r.Conn.P50ms)
		a.cp99 = append(a.cp99, r.Conn.P99ms)
		a.lp50 = append(a.lp50, r.Lat.P50ms)
		a.lp99 = append(a.lp99, r.Lat.P99ms)
	}
	for name, m := range out {
		a := accs[name]
		for k, v := range a.gbps {
			m.Gbps[k] = median(v)
		}
		m.CPUPerGB, m.UpCPUPerGB = median(a.cpu), median(a.upcpu)
		m.ConnPerSec, m.ConnP50ms, m.ConnP99ms = median(a.cps), median(a.cp50), median(a.cp99)
		m.ConnCPUus, m.UpConnCPUus = median(a.ccpu), median(a.upccpu)
		m.LatP50ms, m.LatP99ms = median(a.lp50), median(a.lp99)
		m.candidateOK = m.Reps > 0
	}
	return out
}

func (b *bench) report(w io.Writer) {
	b.res.Medians = b.medians()
	med := b.res.Medians
	kernel := med["kernel"]
	ratio := func(v float64, base *medianSet, get func(*medianSet) float64) string {
		if base == nil || !base.candidateOK || get(base) == 0 {
			return ""
		}
		return fmt.Sprintf(" (%.2f)", v/get(base))
	}
	var names []string
	for _, c := range append(allCandidates, extraCandidates...) {
		if med[c.Name] != nil {
			names = append(names, c.Name)
		}
	}

	ran := len(b.repNoise())
	fmt.Fprintf(w, "\ndetour bench: medians of repetitions %v (of %d run), candidates interleaved; (ratio to kernel forwarding)\n", b.res.UsedReps, ran)
	fmt.Fprintf(w, "iperf3 %d s runs, Gbit/s at the receiver; conn/s: wrk, new TCP connection per request, %d at once, %d s;\n",
		b.opts.bulkSeconds, b.opts.concurrency, b.opts.connSeconds)
	fmt.Fprintf(w, "latency: wrk one connection at a time (request written to response read, after connect), %d s;\n", b.opts.latSeconds)
	fmt.Fprintf(w, "CPU: the proxy process's user+system seconds per GB moved, over all iperf3 runs, and µs per connection in the conn/s run\n")
	fmt.Fprintf(w, "(SOCKS5 upstream's in brackets).\n\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "candidate\tup 1\tdown 1\tup 8\tdown 8\tconn/s\tp50 ms\tp99 ms\tp50 ms @1\tp99 ms @1\tCPU s/GB\tCPU µs/conn\treps\t")
	for _, name := range names {
		m := med[name]
		if !m.candidateOK {
			fmt.Fprintf(tw, "%s\t%s\t\t\t\t\t\t\t\t\t\t\t0\t\n", name, "FAILED")
			continue
		}
		row := []string{name}
		for _, t := range bulkTests {
			g := m.Gbps[t.Key]
			row = append(row, fmt.Sprintf("%.2f%s", g, ratio(g, kernel, func(k *medianSet) float64 { return k.Gbps[t.Key] })))
		}
		row = append(row,
			fmt.Sprintf("%.0f%s", m.ConnPerSec, ratio(m.ConnPerSec, kernel, func(k *medianSet) float64 { return k.ConnPerSec })),
			fmt.Sprintf("%.2f", m.ConnP50ms), fmt.Sprintf("%.2f", m.ConnP99ms),
			fmt.Sprintf("%.3f", m.LatP50ms), fmt.Sprintf("%.3f", m.LatP99ms))
		switch {
		case name == "kernel":
			row = append(row, "-", "-")
		case m.UpCPUPerGB > 0:
			row = append(row, fmt.Sprintf("%.2f [%.2f]", m.CPUPerGB, m.UpCPUPerGB), fmt.Sprintf("%.0f [%.0f]", m.ConnCPUus, m.UpConnCPUus))
		default:
			row = append(row, fmt.Sprintf("%.2f", m.CPUPerGB), fmt.Sprintf("%.0f", m.ConnCPUus))
		}
		row = append(row, fmt.Sprint(m.Reps))
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()
	for _, pair := range [][2]string{{"detour-redirect", "haproxy"}, {"detour-tproxy", "haproxy"}, {"detour-socks5-tproxy", "ipt2socks-socks5"}, {"detour-socks5-tproxy", "redsocks-socks5"}} {
		d, o := med[pair[0]], med[pair[1]]
		if d == nil || o == nil || !d.candidateOK || !o.candidateOK || o.ConnPerSec == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s / %s: conn/s %.2f, p50 under load %.2f vs %.2f ms, CPU µs/conn %.0f vs %.0f", pair[0], pair[1],
			d.ConnPerSec/o.ConnPerSec, d.ConnP50ms, o.ConnP50ms, d.ConnCPUus, o.ConnCPUus)
	}
	fmt.Fprintln(w)
	if rs, ds := med["redsocks-socks5"], med["detour-socks5"]; rs != nil && ds != nil && rs.candidateOK && ds.candidateOK {
		fmt.Fprintf(w, "\ndetour-socks5 / redsocks-socks5:")
		for _, t := range bulkTests {
			fmt.Fprintf(w, " %s %.2f", t.Key, ds.Gbps[t.Key]/rs.Gbps[t.Key])
		}
		fmt.Fprintf(w, " conn/s %.2f\n", ds.ConnPerSec/rs.ConnPerSec)
	}
	var busy []string
	for _, r := range b.res.Runs {
		if r.Used && (r.IdleBefore < 0.9 || r.ForeignCPU > disturbed) {
			busy = append(busy, fmt.Sprintf("%s rep %d (%.0f%% idle before, %.0f%% used by others during)",
				r.Candidate, r.Rep, r.IdleBefore*100, r.ForeignCPU*100))
		}
	}
	if len(busy) > 0 {
		fmt.Fprintf(w, "\nWARNING: other work on the machine during runs used in the medians: %s\n", strings.Join(busy, "; "))
	}
	for _, name := range names {
		for _, e := range med[name].Errors {
			fmt.Fprintf(w, "%s FAILED %s\n", name, firstLine(e))
		}
	}

	fmt.Fprintf(w, "\nidle connections held (one byte each way, then idle), open-file limit %d:\n", nofile)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "candidate\theld\tfds/conn\tKiB/conn\tRSS before→after KiB\tmax held\tmax note\t")
	for _, h := range b.res.Hold {
		if h.Error != "" {
			fmt.Fprintf(tw, "%s\tFAILED: %s\t\t\t\t\t\t\n", h.Candidate, firstLine(h.Error))
			continue
		}
		r := h.Result
		maxHeld := "-"
		if r.MaxTried > 0 {
			maxHeld = fmt.Sprintf("%d of %d (%d fds, %d KiB)", r.MaxHeld, r.MaxTried, r.MaxFDs, r.MaxRSS)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f\t%d→%d\t%s\t%s\t\n", h.Candidate, r.Held, r.FDsPerConn, r.KiBPerConn,
			r.RSSBefore, r.RSSAfter, maxHeld, r.MaxNote)
	}
	tw.Flush()

	fmt.Fprintf(w, "\nTLS, sequential new connections (crypto/tls client, full handshake), µs: connect+ClientHello to first response | to handshake done\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "setup\tport\tn\tfirst p50\tfirst p99\thandshake p50\thandshake p99\t")
	for _, s := range b.res.Sniff {
		var ports []string
		for p := range s.Ports {
			ports = append(ports, p)
		}
		sort.Strings(ports)
		if s.Error != "" {
			fmt.Fprintf(w, "%s FAILED: %s\n", s.Setup, firstLine(s.Error))
		}
		for _, p := range ports {
			st := s.Ports[p]
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.0f\t%.0f\t%.0f\t%.0f\t\n", s.Setup, p, st.N, st.FirstP50us, st.FirstP99us, st.HandshakeP50, st.HandshakeP99)
		}
	}
	tw.Flush()

	fmt.Fprintf(w, "\nexplicit proxy port: a new connection per request (CONNECT, then GET with Connection: close; transparent: the GET alone), %d workers; one stream through CONNECT\n", b.opts.concurrency)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "setup\tconn/s\terrors\tstream Gbit/s\t")
	for _, p := range b.res.ProxyPort {
		if p.Error != "" {
			fmt.Fprintf(w, "%s FAILED: %s\n", p.Setup, firstLine(p.Error))
			continue
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%d\t%.2f\t\n", p.Setup, p.Conns.PerSec, p.Conns.Errors, p.Flow.Gbps)
	}
	tw.Flush()

	fmt.Fprintf(w, "\nUDP: iperf3 -u, %d-byte datagrams, client to server, at rising rates (received, loss, proxy CPU per GB); new sessions: one datagram to each of %d ports, as fast as one client sends, for %ds\n",
		udpPayload, udpSilentHi-udpSilentLo+1, udpSessionSeconds)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "setup	target	Mbit/s	datagrams/s	lost %	CPU s/GB	")
	for _, u := range b.res.UDP {
		if u.Error != "" {
			fmt.Fprintf(w, "%s FAILED: %s\n", u.Setup, firstLine(u.Error))
		}
		for _, r := range u.Rates {
			fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%.2f\t%.2f\t\n", u.Setup, r.Target, r.Mbps, r.PerSec, r.LostPct, r.CPUPerGB)
		}
		if u.Sessions != nil {
			fmt.Fprintf(tw, "%s\tnew sessions\t\t%.0f/s\t%.1f\t\t\n", u.Setup, u.Sessions.PerSec,
				100*(1-float64(u.Sessions.Received)/float64(max(u.Sessions.Sent, 1))))
		}
	}
	tw.Flush()

	b.res.Targets = b.targets()
	fmt.Fprintf(w, "\ntargets:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range b.res.Targets {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", t.Status, t.Name, t.Value)
	}
	tw.Flush()

	if b.res.Micro != "" {
		fmt.Fprintf(w, "\nGo microbenchmarks:\n%s", b.res.Micro)
	}
}

// firstLine is the first line of s, at most 160 characters, for the table.
func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	if len(line) > 160 {
		line = line[:160] + "…"
	}
	return line
}

func status(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

// targets are the goals of issues 7 and 16, with where detour stands.
func (b *bench) targets() []target {
	med := b.res.Medians
	ok := func(name string) *medianSet {
		if m := med[name]; m != nil && m.candidateOK {
			return m
		}
		return nil
	}
	var ts []target
	na := func(name string) { ts = append(ts, target{Name: name, Status: "n/a", Value: "not measured"}) }
	kernel := ok("kernel")
	for _, name := range []string{"detour-redirect", "detour-tproxy"} {
		d := ok(name)
		tn := name + ": single stream both ways ≥ 0.85× kernel"
		if d == nil || kernel == nil {
			na(tn)
		} else {
			up, down := d.Gbps["up1"]/kernel.Gbps["up1"], d.Gbps["down1"]/kernel.Gbps["down1"]
			ts = append(ts, target{tn, fmt.Sprintf("up %.2f×, down %.2f×", up, down), status(up >= 0.85 && down >= 0.85)})
		}
		tn = name + ": new conn/s ≥ 0.6× kernel, p50 ≤ 0.5 ms (one at a time)"
		if d == nil || kernel == nil {
			na(tn)
		} else {
			r := d.ConnPerSec / kernel.ConnPerSec
			ts = append(ts, target{tn, fmt.Sprintf("%.2f×, p50 %.3f ms (at %d: %.2f ms)", r, d.LatP50ms, b.opts.concurrency, d.ConnP50ms),
				status(r >= 0.6 && d.LatP50ms <= 0.5)})
		}
	}
	tn := "detour-socks5 ≥ 1.1× redsocks-socks5 (throughput and conn/s)"
	if d, r := ok("detour-socks5"), ok("redsocks-socks5"); d == nil || r == nil {
		na(tn)
	} else {
		var parts []string
		pass := true
		for _, t := range bulkTests {
			x := d.Gbps[t.Key] / r.Gbps[t.Key]
			pass = pass && x >= 1.1
			parts = append(parts, fmt.Sprintf("%s %.2f×", t.Key, x))
		}
		x := d.ConnPerSec / r.ConnPerSec
		pass = pass && x >= 1.1
		parts = append(parts, fmt.Sprintf("conn/s %.2f×", x))
		ts = append(ts, target{tn, strings.Join(parts, ", "), status(pass)})
	}
	haproxy := ok("haproxy")
	for _, name := range []string{"detour-redirect", "detour-tproxy"} {
		tn := name + ": new conn/s ≥ haproxy's, p50 under load ≤ haproxy's"
		d := ok(name)
		if d == nil || haproxy == nil {
			na(tn)
			continue
		}
		r := d.ConnPerSec / haproxy.ConnPerSec
		ts = append(ts, target{tn, fmt.Sprintf("%.2f× (%.0f vs %.0f), p50 %.2f vs %.2f ms", r, d.ConnPerSec, haproxy.ConnPerSec, d.ConnP50ms, haproxy.ConnP50ms),
			status(r >= 1 && d.ConnP50ms <= haproxy.ConnP50ms)})
	}
	// Through SOCKS5 with TPROXY: against ipt2socks when it ran, else
	// redsocks. One upstream round trip is taken as kernel forwarding's
	// one-at-a-time p50 (a request and its response across the gateway).
	if d := ok("detour-socks5-tproxy"); d != nil {
		peer := "ipt2socks-socks5"
		o := ok(peer)
		if o == nil {
			peer = "redsocks-socks5"
			o = ok(peer)
		}
		tn := "detour-socks5-tproxy: new conn/s ≥ 1.1× " + peer
		if o == nil {
			na(tn)
		} else {
			r := d.ConnPerSec / o.ConnPerSec
			ts = append(ts, target{tn, fmt.Sprintf("%.2f× (%.0f vs %.0f)", r, d.ConnPerSec, o.ConnPerSec), status(r >= 1.1)})
		}
		tn = "detour-socks5-tproxy: p50 under load ≤ detour-tproxy's + one round trip (kernel p50 @1)"
		if direct := ok("detour-tproxy"); direct == nil || kernel == nil {
			na(tn)
		} else {
			limit := direct.ConnP50ms + kernel.LatP50ms
			ts = append(ts, target{tn, fmt.Sprintf("%.2f ms (limit %.2f + %.3f)", d.ConnP50ms, direct.ConnP50ms, kernel.LatP50ms), status(d.ConnP50ms <= limit)})
		}
	}
	for _, h := range b.res.Hold {
		if !strings.HasPrefix(h.Candidate, "detour") {
			continue
		}
		tn := h.Candidate + ": held idle connection ≤ 2 fds and ≤ 6 KiB RSS"
		if h.Result == nil {
			na(tn)
			continue
		}
		r := h.Result
		ts = append(ts, target{tn, fmt.Sprintf("%.2f fds, %.2f KiB", r.FDsPerConn, r.KiBPerConn), status(r.FDsPerConn <= 2 && r.KiBPerConn <= 6)})
		if r.MaxTried > 0 {
			ts = append(ts, target{h.Candidate + fmt.Sprintf(": %d held at once at open-file limit %d", r.MaxTried, nofile),
				fmt.Sprintf("%d held (%d fds)", r.MaxHeld, r.MaxFDs), status(r.MaxHeld >= r.MaxTried)})
		}
	}
	tn = "sniffing costs < 50 µs p50 per TLS connection (sniffed port − skipped port, first response)"
	found := false
	for _, s := range b.res.Sniff {
		if !strings.Contains(s.Setup, "--sniff-skip-ports") || len(s.Ports) != 2 {
			continue
		}
		sn, sk := s.Ports[fmt.Sprint(tlsPort)], s.Ports[fmt.Sprint(tlsSkip)]
		d := sn.FirstP50us - sk.FirstP50us
		ts = append(ts, target{tn, fmt.Sprintf("%.0f µs (%.0f vs %.0f; handshake %.0f vs %.0f)", d, sn.FirstP50us, sk.FirstP50us, sn.HandshakeP50, sk.HandshakeP50), status(d < 50)})
		found = true
	}
	if !found {
		na(tn)
	}
	return ts
}
