//go:build linux

package main

// The candidates: what carries the client's connections across the gateway.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

type kind int

const (
	kernelKind kind = iota
	detourKind
	redsocksKind
	gominKind
	haproxyKind
	ipt2socksKind
)

// candidate is one way across the gateway.
type candidate struct {
	Name string
	kind kind
	args []string // detour run flags beyond the common ones
	bin  string   // the detour binary; "" means -detour's
	// Peer is the address the server must see: the client's (kernel
	// forwarding), the gateway's (detour direct) or the upstream's.
	Peer string
}

// nofile is the open-file limit of the proxies under test.
const nofile = 20000

var allCandidates = []candidate{
	{Name: "kernel", kind: kernelKind, Peer: clientIP},
	// go-minimal is the least a Go REDIRECT proxy does (accept,
	// SO_ORIGINAL_DST, marked dial, io.Copy both ways): a reference for
	// what Go itself costs on this machine, next to what detour adds.
	{Name: "go-minimal", kind: gominKind, Peer: gatewayIP},
	{Name: "detour-redirect", kind: detourKind, args: []string{"--mode", "redirect"}, Peer: gatewayIP},
	// TPROXY candidates carry TCP only, as ipt2socks -T and the hand-written
	// TPROXY rules do: with UDP on, detour's rules need connection tracking
	// for every packet the gateway forwards (see README → Performance).
	{Name: "detour-tproxy", kind: detourKind, args: []string{"--mode", "tproxy", "--udp=false"}, Peer: gatewayIP},
	// HAProxy is the direct-path anchor: a C proxy that does the same
	// accept, original destination (server 0.0.0.0:0 reads SO_ORIGINAL_DST),
	// connect and splice, without sniffing.
	{Name: "haproxy", kind: haproxyKind, Peer: gatewayIP},
	{Name: "detour-socks5", kind: detourKind, args: []string{"--mode", "redirect", "--upstream", fmt.Sprintf("socks5://%s:%d", upstreamIP, socksPort)}, Peer: upstreamIP},
	{Name: "detour-socks5-tproxy", kind: detourKind, args: []string{"--mode", "tproxy", "--udp=false", "--upstream", fmt.Sprintf("socks5://%s:%d", upstreamIP, socksPort)}, Peer: upstreamIP},
	{Name: "redsocks-socks5", kind: redsocksKind, Peer: upstreamIP},
	// ipt2socks (C, libev, TPROXY) runs only when -ipt2socks names a
	// binary built by hand: it is not a Debian package.
	{Name: "ipt2socks-socks5", kind: ipt2socksKind, Peer: upstreamIP},
}

// extraCandidates run only when asked for with -candidates.
var extraCandidates []candidate

// running is a started candidate.
type running struct {
	c     candidate
	proxy *proc // nil for kernel forwarding
}

// startCandidate starts c's proxy with its capture rules and checks that a
// request really crosses it: nginx's /peer answers with the address it sees.
func (b *bench) startCandidate(c candidate, extra ...string) (*running, error) {
	if err := b.checkNoRules(); err != nil {
		return nil, err
	}
	if out, err := b.topo.exec(b.ctx, b.topo.G, b.self, "helper", "ctflush"); err != nil {
		return nil, fmt.Errorf("flushing the gateway's conntrack table: %v\n%s", err, out)
	}
	r := &running{c: c}
	var err error
	switch c.kind {
	case detourKind:
		bin := c.bin
		if bin == "" {
			bin = b.detour
		}
		r.proxy, err = b.startDetour(bin, append(append([]string(nil), c.args...), extra...))
	case redsocksKind:
		r.proxy, err = b.startRedsocks()
	case gominKind:
		r.proxy, err = b.startGoMinimal()
	case haproxyKind:
		r.proxy, err = b.startHAProxy()
	case ipt2socksKind:
		r.proxy, err = b.startIpt2socks()
	}
	if err != nil {
		if r.proxy != nil {
			b.stopCandidate(r)
		}
		return nil, fmt.Errorf("%s: %w", c.Name, err)
	}
	if err := b.checkPeer(c); err != nil {
		b.stopCandidate(r)
		return nil, fmt.Errorf("%s: %w", c.Name, err)
	}
	return r, nil
}

func (b *bench) startDetour(bin string, args []string) (*proc, error) {
	argv := append([]string{bin, "run", "--log-format", "json",
		"--listen", fmt.Sprintf(":%d", detourPort), "--grace", "1s",
		"--install-rules", "--bypass", "none", "--interface", "gc", "--rules-recheck", "0"}, args...)
	p, err := b.procs.start("detour", b.topo.G, nofile, false, argv...)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		log, _ := os.ReadFile(p.log)
		if strings.Contains(string(log), `"msg":"listening"`) {
			return p, nil
		}
		if p.exited() || time.Now().After(deadline) {
			p.stop(time.Second)
			return nil, fmt.Errorf("detour did not start listening (%v):\n%s", p.err, p.tail())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// benchChain is the nat chain of the hand-written capture rules (redsocks,
// go-minimal), jumped to for TCP arriving from the client; the upstream's
// subnet and detour's mark are exempt.
const benchChain = "BENCH_REDIRECT"

func benchRules(port int) [][]string {
	return [][]string{
		{"-t", "nat", "-N", benchChain},
		{"-t", "nat", "-A", benchChain, "-d", "198.18.3.0/24", "-j", "RETURN"},
		{"-t", "nat", "-A", benchChain, "-m", "mark", "--mark", minMark, "-j", "RETURN"},
		{"-t", "nat", "-A", benchChain, "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(port)},
		{"-t", "nat", "-A", "PREROUTING", "-i", "gc", "-p", "tcp", "-j", benchChain},
	}
}

func (b *bench) installBenchRules(port int) error {
	for _, rule := range benchRules(port) {
		if out, err := b.topo.exec(b.ctx, b.topo.G, append([]string{"iptables", "-w"}, rule...)...); err != nil {
			return fmt.Errorf("iptables %v: %v\n%s", rule, err, out)
		}
	}
	return nil
}

func (b *bench) removeBenchRules() {
	ctx := context.Background()
	b.topo.exec(ctx, b.topo.G, "iptables", "-w", "-t", "nat", "-D", "PREROUTING", "-i", "gc", "-p", "tcp", "-j", benchChain)
	b.topo.exec(ctx, b.topo.G, "iptables", "-w", "-t", "nat", "-F", benchChain)
	b.topo.exec(ctx, b.topo.G, "iptables", "-w", "-t", "nat", "-X", benchChain)
}

func (b *bench) startGoMinimal() (*proc, error) {
	p, err := b.procs.start("go-minimal", b.topo.G, nofile, true, b.self, "helper", "minproxy", "-listen", fmt.Sprintf("0.0.0.0:%d", minPort))
	if err != nil {
		return nil, err
	}
	return b.redirectTo(p, minPort)
}

// redirectTo waits until p, a proxy in the gateway, listens on port, then
// installs the bench's rules that send the client's connections there.
func (b *bench) redirectTo(p *proc, port int) (*proc, error) {
	if err := b.waitListen(b.topo.G, port, 10*time.Second); err != nil {
		p.stop(time.Second)
		return nil, fmt.Errorf("%s: %w\n%s", p.name, err, p.tail())
	}
	return p, b.installBenchRules(port)
}

func (b *bench) startRedsocks() (*proc, error) {
	splice := "off"
	if b.opts.redsocksSplice {
		splice = "on"
	}
	conf := fmt.Sprintf(`base {
	log_debug = off;
	log_info = off;
	log = stderr;
	daemon = off;
	redirector = iptables;
	rlimit_nofile = %d;
	redsocks_conn_max = %d;
}
redsocks {
	local_ip = 0.0.0.0;
	local_port = %d;
	listenq = 4096;
	splice = %s;
	ip = %s;
	port = %d;
	type = socks5;
}
`, nofile, nofile, redsPort, splice, upstreamIP, socksPort)
	path := filepath.Join(b.tmp, "redsocks.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := b.procs.start("redsocks", b.topo.G, nofile, false, "redsocks", "-c", path)
	if err != nil {
		return nil, err
	}
	return b.redirectTo(p, redsPort)
}

// haproxyConf runs HAProxy as the anchor: 2 threads, TCP mode,
// splice both ways, the original destination as the server (0.0.0.0:0),
// no logging; maxconn 7500 keeps its descriptors (two per connection and
// splice pipes) under the open-file limit of the proxies.
const haproxyConf = `global
	nbthread 2
	maxconn 7500
	stats socket %[1]s/haproxy.sock mode 600 level admin
defaults
	mode tcp
	timeout connect 5s
	timeout client 300s
	timeout server 300s
	option splice-request
	option splice-response
frontend bench
	bind 0.0.0.0:%[2]d backlog 4096
	default_backend original
backend original
	server dst 0.0.0.0:0
`

func (b *bench) startHAProxy() (*proc, error) {
	path := filepath.Join(b.tmp, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(haproxyConf, b.tmp, haproxyPort)), 0o644); err != nil {
		return nil, err
	}
	p, err := b.procs.start("haproxy", b.topo.G, nofile, false, "haproxy", "-db", "-f", path)
	if err != nil {
		return nil, err
	}
	return b.redirectTo(p, haproxyPort)
}

// The TPROXY capture for ipt2socks, as its README sets it up: mark and
// divert TCP from the client to its port, and deliver marked packets
// locally.
const (
	tproxyChain = "BENCH_TPROXY"
	tproxyMark  = "0x1"
	tproxyTable = "100"
)

func tproxyRules(port int) [][]string {
	return [][]string{
		{"-t", "mangle", "-N", tproxyChain},
		{"-t", "mangle", "-A", tproxyChain, "-d", "198.18.3.0/24", "-j", "RETURN"},
		{"-t", "mangle", "-A", tproxyChain, "-p", "tcp", "-j", "TPROXY", "--on-port", strconv.Itoa(port), "--on-ip", "0.0.0.0", "--tproxy-mark", tproxyMark + "/" + tproxyMark},
		{"-t", "mangle", "-A", "PREROUTING", "-i", "gc", "-p", "tcp", "-j", tproxyChain},
	}
}

func (b *bench) startIpt2socks() (*proc, error) {
	if b.opts.ipt2socks == "" {
		return nil, errors.New("no ipt2socks binary (-ipt2socks)")
	}
	p, err := b.procs.start("ipt2socks", b.topo.G, nofile, false, b.opts.ipt2socks,
		"-s", upstreamIP, "-p", strconv.Itoa(socksPort), "-b", "0.0.0.0", "-l", strconv.Itoa(ipt2socksPort),
		"-j", "2", "-T", "-4", "-n", strconv.Itoa(nofile))
	if err != nil {
		return nil, err
	}
	if err := b.waitListen(b.topo.G, ipt2socksPort, 10*time.Second); err != nil {
		p.stop(time.Second)
		return nil, fmt.Errorf("%s: %w\n%s", p.name, err, p.tail())
	}
	for _, args := range [][]string{
		{"ip", "rule", "add", "fwmark", tproxyMark + "/" + tproxyMark, "lookup", tproxyTable},
		{"ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", tproxyTable},
	} {
		if out, err := b.topo.exec(b.ctx, b.topo.G, args...); err != nil {
			return p, fmt.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	for _, rule := range tproxyRules(ipt2socksPort) {
		if out, err := b.topo.exec(b.ctx, b.topo.G, append([]string{"iptables", "-w"}, rule...)...); err != nil {
			return p, fmt.Errorf("iptables %v: %v\n%s", rule, err, out)
		}
	}
	return p, nil
}

func (b *bench) removeTproxyRules() {
	ctx := context.Background()
	g := b.topo.G
	b.topo.exec(ctx, g, "iptables", "-w", "-t", "mangle", "-D", "PREROUTING", "-i", "gc", "-p", "tcp", "-j", tproxyChain)
	b.topo.exec(ctx, g, "iptables", "-w", "-t", "mangle", "-F", tproxyChain)
	b.topo.exec(ctx, g, "iptables", "-w", "-t", "mangle", "-X", tproxyChain)
	b.topo.exec(ctx, g, "ip", "rule", "del", "fwmark", tproxyMark+"/"+tproxyMark, "lookup", tproxyTable)
	b.topo.exec(ctx, g, "ip", "route", "flush", "table", tproxyTable)
}

// stopCandidate stops the proxy and removes its rules; the gateway must be
// back to plain forwarding afterwards.
func (b *bench) stopCandidate(r *running) error {
	if r.proxy == nil {
		return nil
	}
	switch r.c.kind {
	case detourKind:
		r.proxy.stop(5 * time.Second) // SIGTERM: detour removes its rules
		if r.proxy.err != nil {
			// Killed, or it failed: take away whatever it left.
			b.topo.exec(context.Background(), b.topo.G, b.detour, "rules", "remove")
		}
	case ipt2socksKind:
		r.proxy.stop(2 * time.Second)
		b.removeTproxyRules()
	default:
		r.proxy.stop(2 * time.Second)
		b.removeBenchRules()
	}
	b.dropTimeWait()
	return b.checkNoRules()
}

// dropTimeWait removes the gateway's TIME_WAIT sockets left by the proxy
// that just stopped. A transparent (TPROXY) socket in TIME_WAIT keeps its
// 4-tuple for 60 s, and the kernel drops a forwarded packet that early
// demux matches to a local socket: the next kernel-forwarding run would
// lose the SYNs of clients that happen to reuse one of those source ports.
func (b *bench) dropTimeWait() {
	ctx := context.Background()
	b.topo.exec(ctx, b.topo.G, "ss", "-K", "state", "time-wait")
	out, _ := b.topo.exec(ctx, b.topo.G, "ss", "-Htn", "state", "time-wait")
	if n := strings.Count(out, "\n"); n > 0 {
		b.logf("  %d TIME_WAIT sockets left in the gateway (ss -K failed): kernel forwarding may drop colliding connections", n)
	}
}

// checkNoRules makes sure the gateway captures nothing: no REDIRECT or
// TPROXY rule, no jump to detour's or the bench's chains, no policy route.
func (b *bench) checkNoRules() error {
	ctx := context.Background()
	out, err := b.topo.exec(ctx, b.topo.G, "iptables-save")
	if err != nil {
		return fmt.Errorf("iptables-save in the gateway: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "-A") && (strings.Contains(line, "REDIRECT") || strings.Contains(line, "TPROXY") ||
			strings.Contains(line, "-j DETOUR") || strings.Contains(line, benchChain) || strings.Contains(line, tproxyChain)) {
			return fmt.Errorf("capture rules left in the gateway: %s", line)
		}
	}
	out, err = b.topo.exec(ctx, b.topo.G, "ip", "rule")
	if err != nil {
		return fmt.Errorf("ip rule: %v\n%s", err, out)
	}
	if strings.Contains(out, "fwmark") {
		return fmt.Errorf("policy routing left in the gateway:\n%s", out)
	}
	return nil
}

// checkPeer asks nginx, from the client, which address it sees.
func (b *bench) checkPeer(c candidate) error {
	url := fmt.Sprintf("http://%s:%d/peer", serverIP, httpPort)
	out, err := b.topo.exec(b.ctx, b.topo.C, "curl", "-sS", "-m", "5", url)
	if err != nil && b.ctx.Err() == nil {
		b.logf("  curl %s from the client: %v: %s; once more", url, err, strings.TrimSpace(out))
		out, err = b.topo.exec(b.ctx, b.topo.C, "curl", "-sS", "-m", "5", url)
	}
	if err != nil {
		return fmt.Errorf("curl %s from the client: %v\n%s", url, err, out)
	}
	if got := strings.TrimSpace(out); got != c.Peer {
		return fmt.Errorf("traffic did not cross the proxy as expected: the server saw %q, want %s", got, c.Peer)
	}
	return nil
}

// captured is the gateway's count of packets that hit a REDIRECT or
// TPROXY rule (IPv4, nat and mangle): it grows with each proxied
// connection and stays zero for kernel forwarding.
func (b *bench) captured() (int64, error) {
	var total int64
	for _, table := range []string{"nat", "mangle"} {
		out, err := b.topo.exec(b.ctx, b.topo.G, "iptables", "-w", "-t", table, "-L", "-v", "-n", "-x")
		if err != nil {
			return 0, fmt.Errorf("iptables -t %s -L: %v\n%s", table, err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			f := strings.Fields(line)
			if len(f) > 2 && (f[2] == "REDIRECT" || f[2] == "TPROXY") {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				total += n
			}
		}
	}
	return total, nil
}

// waitListen waits until something listens on TCP port in ns.
func (b *bench) waitListen(ns string, port int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		out, _ := b.topo.exec(b.ctx, ns, "ss", "-Hltn", fmt.Sprintf("sport = :%d", port))
		if strings.TrimSpace(out) != "" {
			return nil
		}
		if time.Now().After(deadline) || b.ctx.Err() != nil {
			return fmt.Errorf("nothing listens on port %d in %s after %v", port, ns, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
