package test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// End-to-end tests of the rules detour installs itself: traffic through
// them, exemptions, and a gateway's kernel left exactly as it was.

// backend is one rules backend under test: its --firewall value and how
// its traces look in the kernel's listing.
type backend struct {
	name string // --firewall value: iptables or nftables
	// jumps counts detour's hooks into the kernel in a kernelState: jump
	// rules for iptables, base chains for nftables.
	jumps func(state string) int
	// tproxyChain appears in a kernelState while TPROXY rules are in.
	tproxyChain string
	// show lists what `detour rules show` prints for TestRulesInstallIdempotentAndReplace's
	// second set: TPROXY to :7000 from gc, ports 80 and 9000, 198.18.3.0/24 bypassed.
	show []string
}

var backends = []backend{
	{
		name:        "iptables",
		jumps:       func(st string) int { return countIn(st, jumpRule) },
		tproxyChain: "DETOUR_TPROXY",
		show:        []string{"-N DETOUR_TPROXY", "--on-port 7000", "-i gc", "--dports 80,9000", "198.18.3.0/24", "lookup 200"},
	},
	{
		name:        "nftables",
		jumps:       func(st string) int { return countIn(st, "\tchain nat_") + countIn(st, "\tchain mangle_") },
		tproxyChain: "chain mangle_prerouting",
		show: []string{"chain mangle_prerouting", "tproxy ip to :7000", `iifname "gc"`, "th dport 80 ", "th dport 9000 ",
			"elements = { 198.18.3.0/24 }", "ip daddr @bypass4 return", "lookup 200"},
	},
}

func (be backend) firewall() []string { return []string{"--firewall", be.name} }

// nftOperator is the gateway operator's own nftables firewall (as
// nftables.service would load it), which detour must leave alone. A
// reload flushes the ruleset and loads this again.
const nftOperator = `table inet operator {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept comment "operator"
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		udp dport 53 return comment "operator: not detour:jump"
	}
	chain output {
		type filter hook output priority filter; policy accept;
		meta mark 0x0000002d counter comment "detour-marked"
	}
}
`

// nftLoad runs `nft -f -` with script in the gateway.
func (tp *topo) nftLoad(t *testing.T, script string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", tp.G, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s\n%s", err, out, script)
	}
}

// firewallFor gives the gateway the operator's firewall in the backend's
// own kind (iptables rules, or an nftables table with no iptables touched)
// and the policy routing of operatorFirewall; for nftables its table also
// counts packets with detour's mark (nftMarked).
func (tp *topo) firewallFor(t *testing.T, be backend) {
	t.Helper()
	if be.name == "iptables" {
		tp.operatorFirewall(t)
		return
	}
	tp.settle(t)
	tp.operatorRouting(t)
	tp.nftLoad(t, nftOperator)
}

// nftMarked reads the operator table's counter of packets carrying
// detour's socket mark.
func (tp *topo) nftMarked(t *testing.T) int {
	t.Helper()
	out, err := tp.exec(t, tp.G, "nft", "list", "chain", "inet", "operator", "output")
	if err != nil {
		t.Fatalf("nft list chain: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`counter packets (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no counter in\n%s", out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// marked is markedPackets for the backend.
func (tp *topo) marked(t *testing.T, be backend) int {
	if be.name == "nftables" {
		return tp.nftMarked(t)
	}
	return tp.markedPackets(t)
}

func (tp *topo) operatorRouting(t *testing.T) {
	t.Helper()
	for _, c := range [][]string{
		{"ip", "rule", "add", "from", "198.19.99.0/24", "lookup", "50", "pref", "1000"},
		{"ip", "route", "add", "unreachable", "198.19.99.0/24", "table", "50"},
		{"ip", "-6", "rule", "add", "from", "fd00:99::/64", "lookup", "50", "pref", "1000"},
		{"ip", "-6", "route", "add", "unreachable", "fd00:99::/64", "table", "50"},
	} {
		if out, err := tp.exec(t, tp.G, c...); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
}

// operatorFirewall gives the gateway a firewall and policy routing of its
// own that detour must leave alone. (It also makes the nat and mangle
// tables exist before the "before" picture: iptables creates a table on
// first use and never deletes it, with or without detour.)
func (tp *topo) operatorFirewall(t *testing.T) {
	t.Helper()
	tp.settle(t)
	tp.operatorRouting(t)
	var cmds [][]string
	for _, ipt := range []string{"iptables", "ip6tables"} {
		cmds = append(cmds,
			[]string{ipt, "-w", "-t", "nat", "-N", "OPERATOR"},
			[]string{ipt, "-w", "-t", "nat", "-A", "OPERATOR", "-p", "udp", "-j", "RETURN"},
			[]string{ipt, "-w", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "operator", "-j", "OPERATOR"},
			[]string{ipt, "-w", "-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "operator: not detour:jump"},
			[]string{ipt, "-w", "-t", "mangle", "-A", "PREROUTING", "-m", "comment", "--comment", "operator"},
			[]string{ipt, "-w", "-t", "mangle", "-A", "OUTPUT", "-m", "comment", "--comment", "operator"},
			[]string{ipt, "-w", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-m", "comment", "--comment", "operator", "-j", "ACCEPT"},
		)
	}
	for _, c := range cmds {
		if out, err := tp.exec(t, tp.G, c...); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
}

// settle waits until the kernel has given the gateway's links their IPv6
// link-local addresses and routes, which it does on its own a moment after
// they come up, so that a "before" picture is not taken half-way.
func (tp *topo) settle(t *testing.T) {
	t.Helper()
	waitFor(t, 10*time.Second, "link-local addresses on the gateway", func() bool {
		addrs, _ := tp.exec(t, tp.G, "ip", "-6", "addr", "show", "tentative")
		routes, _ := tp.exec(t, tp.G, "ip", "-6", "route", "show", "table", "local")
		for _, dev := range []string{"gc", "gs", "gu"} {
			if !strings.Contains(routes, "local fe80::") || !regexp.MustCompile(`local fe80::\S+ dev `+dev+` `).MatchString(routes) {
				return false
			}
		}
		return strings.TrimSpace(addrs) == ""
	})
}

var (
	counters    = regexp.MustCompile(`\[\d+:\d+\]`)
	nftCounters = regexp.MustCompile(`counter packets \d+ bytes \d+`)
	comments    = regexp.MustCompile(`(?m)^#.*\n`)
)

// kernelState is everything of the gateway's that detour may touch:
// iptables-save and ip6tables-save (without their date lines and packet
// counters), ip rule and ip -6 rule, and every routing table.
func (tp *topo) kernelState(t *testing.T) string {
	t.Helper()
	return tp.stateOf(t, []string{"iptables-save"}, []string{"ip6tables-save"})
}

// stateFor is kernelState for the backend: for nftables the whole nft
// ruleset (every table, also any iptables-nft would have made) instead of
// iptables-save, which is never run in nftables mode.
func (tp *topo) stateFor(t *testing.T, be backend) string {
	t.Helper()
	if be.name == "nftables" {
		return tp.stateOf(t, []string{"nft", "list", "ruleset"})
	}
	return tp.kernelState(t)
}

func (tp *topo) stateOf(t *testing.T, firewall ...[]string) string {
	t.Helper()
	var b strings.Builder
	for _, c := range append(firewall, [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	}...) {
		out, err := tp.exec(t, tp.G, c...)
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
		out = counters.ReplaceAllString(comments.ReplaceAllString(out, ""), "[0:0]")
		out = nftCounters.ReplaceAllString(out, "counter")
		fmt.Fprintf(&b, "### %s\n%s", strings.Join(c, " "), out)
	}
	return b.String()
}

// sameState fails unless the gateway's kernel is as before.
func (tp *topo) sameState(t *testing.T, before, when string) {
	t.Helper()
	tp.sameStateFor(t, backends[0], before, when)
}

// sameStateFor is sameState for the backend.
func (tp *topo) sameStateFor(t *testing.T, be backend, before, when string) {
	t.Helper()
	if after := tp.stateFor(t, be); after != before {
		t.Fatalf("%s the gateway's kernel differs from before detour:\n%s", when, diffLines(before, after))
	}
}

func diffLines(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	in := func(l []string, s string) bool {
		for _, x := range l {
			if x == s {
				return true
			}
		}
		return false
	}
	var out []string
	for _, l := range al {
		if !in(bl, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range bl {
		if !in(al, l) {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// detourCmd runs the detour binary in the gateway with env added to its
// environment, and returns its output and exit status.
func (tp *topo) detourCmd(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	argv := append([]string{"netns", "exec", tp.G, "env"}, env...)
	out, err := exec.CommandContext(ctx, "ip", append(append(argv, detourBin), args...)...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	}
	t.Fatalf("detour %v: %v\n%s", args, err, out)
	return "", 0
}

// jumpRule is how iptables-save shows the comment of detour's jump rules.
const jumpRule = `--comment "detour:jump"`

// countIn counts lines of s holding sub.
func countIn(s, sub string) int {
	n := 0
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			n++
		}
	}
	return n
}

// startUpstreamHTTP serves, in the upstream namespace (198.18.3.2,
// fd00:3::2), an HTTP server on port 80 that tells each client its address.
func startUpstreamHTTP(t *testing.T, tp *topo) {
	t.Helper()
	ln := listenIn(t, tp.U, "[::]:80")
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintf(w, "hello from the bypassed namespace; you are %s\n", host)
	}))
}

// startGatewayService listens on port 22 of the gateway itself, like sshd,
// and greets each client with a banner.
func startGatewayService(t *testing.T, tp *topo) {
	t.Helper()
	ln := listenIn(t, tp.G, "[::]:22")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("SSH-2.0-gateway\r\n"))
			c.Close()
		}
	}()
}

func curlFrom(t *testing.T, tp *topo, ns, url string) string {
	t.Helper()
	out, err := tp.exec(t, ns, "curl", "-sS", "-m", "10", url)
	if err != nil {
		t.Fatalf("curl %s from %s: %v\n%s", url, ns, err, out)
	}
	return out
}

func httpURL(host string) string { return "http://" + net.JoinHostPort(host, "80") + "/" }

// The whole job, per mode: with nothing but `detour run --install-rules`,
// clients reach the server through detour; a bypassed network, the
// gateway's own services and detour's own dials are left alone; and after
// SIGTERM the gateway's kernel is as it was.
func TestInstallRules(t *testing.T) {
	for _, be := range backends {
		for _, mode := range []string{"redirect", "tproxy"} {
			t.Run(be.name+"/"+mode, func(t *testing.T) { testInstallRules(t, be, mode) })
		}
	}
}

func testInstallRules(t *testing.T, be backend, mode string) {
	t.Helper()
	tp := newTopo(t)
	tp.firewallFor(t, be)
	before := tp.stateFor(t, be)
	if be.name == "iptables" {
		tp.markCount(t, mark)
	}
	withCounter := tp.stateFor(t, be)
	startServers(t, tp)
	startUpstreamHTTP(t, tp)
	startGatewayService(t, tp)
	d := startDetour(t, tp, append(be.firewall(), "--mode", mode, "--install-rules", "--output",
		"--bypass", "198.18.3.0/24", "--bypass", "fd00:3::/64")...)
	d.waitLog(t, time.Second, "rules backend", map[string]string{"firewall": be.name})

	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			out := curlFrom(t, tp, tp.C, httpURL(f.server))
			if !strings.HasPrefix(out, "hello from the server namespace") || strings.Contains(out, f.client) {
				t.Fatalf("curl through detour = %q; want the server's greeting to the gateway", out)
			}
			d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(f.server, "80"), "error": ""})

			// A bypassed network: straight through the kernel, the
			// server sees the client itself, detour logs nothing.
			out = curlFrom(t, tp, tp.C, httpURL(f.upstream))
			if !strings.Contains(out, "you are "+f.client+"\n") {
				t.Fatalf("curl to the bypassed %s = %q; want it to see the client %s", f.upstream, out, f.client)
			}

			// The gateway's own service (its address is LOCAL).
			c, err := dialIn(t, tp.C, net.JoinHostPort(f.gateway, "22"))
			if err != nil {
				t.Fatalf("the gateway's own port 22: %v", err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			banner := make([]byte, 64)
			n, _ := c.Read(banner)
			c.Close()
			if !strings.HasPrefix(string(banner[:n]), "SSH-2.0-gateway") {
				t.Fatalf("gateway's port 22 answered %q, want its own banner", banner[:n])
			}

			// The gateway's own processes are captured (--output);
			// detour's dial for them carries the mark and is not
			// captured again: one access line, no loop.
			marked := tp.marked(t, be)
			url := httpURL(f.server) + "own-" + f.name
			if out := curlFrom(t, tp, tp.G, url); !strings.HasPrefix(out, "hello from the server namespace") {
				t.Fatalf("curl from the gateway = %q", out)
			}
			time.Sleep(200 * time.Millisecond) // a loop would show by now
			lines := d.find("conn", map[string]string{"dst": net.JoinHostPort(f.server, "80")})
			own := 0
			for _, l := range lines {
				if !strings.Contains(fmt.Sprint(l["client"]), f.client) {
					own++
				}
			}
			if own != 1 {
				t.Fatalf("%d access lines for the gateway's own curl, want 1 (a loop?); log:\n%s", own, d.rawLog())
			}
			if tp.marked(t, be) <= marked {
				t.Fatal("detour's dial for the gateway's own curl was not marked")
			}
		})
	}
	if t.Failed() {
		return
	}
	for _, f := range families {
		for _, dst := range []string{net.JoinHostPort(f.upstream, "80"), net.JoinHostPort(f.gateway, "22")} {
			if recs := d.find("conn", map[string]string{"dst": dst}); len(recs) > 0 {
				t.Errorf("detour handled a connection to %s, which it must not capture: %v", dst, recs)
			}
		}
		if recs := d.find("refused", nil); len(recs) > 0 {
			t.Errorf("detour saw connections not meant for it: %v", recs)
		}
	}

	d.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, d, 10*time.Second)
	d.waitLog(t, time.Second, "rules removed", nil)
	tp.sameStateFor(t, be, withCounter, "after SIGTERM")
	if be.name == "iptables" {
		tp.exec(t, tp.G, "iptables", "-w", "-t", "mangle", "-D", "OUTPUT", "-m", "mark", "--mark", mark, "-m", "comment", "--comment", "detour-marked")
		tp.exec(t, tp.G, "ip6tables", "-w", "-t", "mangle", "-D", "OUTPUT", "-m", "mark", "--mark", mark, "-m", "comment", "--comment", "detour-marked")
		tp.sameState(t, before, "after SIGTERM (without the test's counter)")
	}
}

// A killed run leaves its rules; the next run replaces them with one set,
// and `detour rules remove` (no options needed) takes everything away.
func TestRulesAfterKill9(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) { testRulesAfterKill9(t, be) })
	}
}

func testRulesAfterKill9(t *testing.T, be backend) {
	tp := newTopo(t)
	tp.firewallFor(t, be)
	before := tp.stateFor(t, be)
	startServers(t, tp)
	args := append(append([]string{"--mode", "tproxy", "--output", "--table", "123"}, be.firewall()...), capture...)

	d := startDetour(t, tp, args...)
	d.cmd.Process.Kill()
	<-d.done
	stale := tp.stateFor(t, be)
	if stale == before || !strings.Contains(stale, "lookup 123 proto 45") {
		t.Fatalf("after kill -9 no rules are left; state:\n%s", stale)
	}

	// A new run with other options replaces the stale set.
	d = startDetour(t, tp, append(append([]string{"--mode", "redirect"}, be.firewall()...), capture...)...)
	if recs := d.find("rules installed", map[string]string{"replaced": "true"}); len(recs) != 1 {
		t.Errorf("second run: %v", recs)
	}
	st := tp.stateFor(t, be)
	wantJumps := 2 // PREROUTING of each family
	if be.name == "nftables" {
		wantJumps = 1 // one inet chain
	}
	if strings.Contains(st, be.tproxyChain) || strings.Contains(st, "proto 45") || be.jumps(st) != wantJumps {
		t.Fatalf("the stale TPROXY set was not replaced by one REDIRECT set per family:\n%s", diffLines(before, st))
	}
	if out := curlFrom(t, tp, tp.C, httpURL(families[0].server)); !strings.HasPrefix(out, "hello from the server namespace") {
		t.Fatalf("curl through the second run = %q", out)
	}
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(families[0].server, "80")})

	d.cmd.Process.Kill()
	<-d.done
	if out, code := tp.detourCmd(t, nil, append([]string{"rules", "remove"}, be.firewall()...)...); code != 0 || !strings.Contains(out, "removed") {
		t.Fatalf("detour rules remove = %d:\n%s", code, out)
	}
	tp.sameStateFor(t, be, before, "after kill -9 and `detour rules remove`")
	// Removing again finds nothing and is not an error.
	if out, code := tp.detourCmd(t, nil, append([]string{"rules", "remove"}, be.firewall()...)...); code != 0 {
		t.Fatalf("second detour rules remove = %d:\n%s", code, out)
	}
	if out, _ := tp.detourCmd(t, nil, append([]string{"rules", "show"}, be.firewall()...)...); !strings.Contains(out, "none of detour's rules is installed") {
		t.Fatalf("detour rules show after remove:\n%s", out)
	}
}

// `detour rules install` twice is once; with other options it replaces the
// first set cleanly, exactly as a fresh install of those options would.
func TestRulesInstallIdempotentAndReplace(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) { testRulesInstallIdempotentAndReplace(t, be) })
	}
}

func testRulesInstallIdempotentAndReplace(t *testing.T, be backend) {
	tp := newTopo(t)
	tp.firewallFor(t, be)
	before := tp.stateFor(t, be)
	rules := func(verb string, args ...string) (string, int) {
		t.Helper()
		return tp.detourCmd(t, nil, append(append([]string{"rules", verb}, be.firewall()...), args...)...)
	}
	install := func(args ...string) string {
		t.Helper()
		out, code := rules("install", args...)
		if code != 0 {
			t.Fatalf("detour rules install %v = %d:\n%s", args, code, out)
		}
		return out
	}
	first := []string{"--mode", "redirect", "--bypass", "none", "--output"}
	install(first...)
	once := tp.stateFor(t, be)
	if out := install(first...); !strings.Contains(out, "already installed") {
		t.Errorf("second install said:\n%s", out)
	}
	if twice := tp.stateFor(t, be); twice != once {
		t.Fatalf("installing twice differs from once:\n%s", diffLines(once, twice))
	}
	wantJumps := 4 // PREROUTING and OUTPUT, two families
	if be.name == "nftables" {
		wantJumps = 2 // prerouting and output chains of the inet table
	}
	if n := be.jumps(once); n != wantJumps {
		t.Errorf("%d jumps into detour's rules, want %d:\n%s", n, wantJumps, once)
	}

	second := []string{"--mode", "tproxy", "--ports", "80,9000", "--interface", "gc", "--bypass", "198.18.3.0/24",
		"--table", "200", "--tproxy-mark", "0x400", "--ipv6=false", "--listen", ":7000"}
	install(second...)
	replaced := tp.stateFor(t, be)
	out, _ := rules("show")
	for _, want := range be.show {
		if !strings.Contains(out, want) {
			t.Errorf("detour rules show lacks %q:\n%s", want, out)
		}
	}
	if _, code := rules("remove"); code != 0 {
		t.Fatal("remove failed")
	}
	tp.sameStateFor(t, be, before, "after remove")
	install(second...)
	if fresh := tp.stateFor(t, be); fresh != replaced {
		t.Fatalf("replacing differs from a fresh install:\n%s", diffLines(fresh, replaced))
	}
	if _, code := rules("remove"); code != 0 {
		t.Fatal("remove failed")
	}
	tp.sameStateFor(t, be, before, "after the last remove")
}

// A host firewall reload wipes detour's iptables rules; the running detour
// puts them back, on SIGUSR1 or at its next periodic check, and says so.
// For nftables the reload is `nft flush ruleset` and the operator's table
// loaded again, as `systemctl reload nftables` does.
func TestRulesRestoredAfterFirewallReload(t *testing.T) {
	for _, be := range backends {
		for _, tc := range []struct {
			mode, recheck string
		}{
			{"redirect", "0"},   // on demand: SIGUSR1
			{"tproxy", "300ms"}, // periodic
		} {
			t.Run(be.name+"/"+tc.mode, func(t *testing.T) { testRulesRestored(t, be, tc.mode, tc.recheck) })
		}
	}
}

func testRulesRestored(t *testing.T, be backend, mode, recheck string) {
	tp := newTopo(t)
	tp.firewallFor(t, be)
	before := tp.stateFor(t, be)
	saved := map[string]string{}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if be.name != "iptables" {
			break
		}
		out, err := tp.exec(t, tp.G, ipt+"-save")
		if err != nil {
			t.Fatal(err)
		}
		saved[ipt] = out
	}
	startServers(t, tp)
	d := startDetour(t, tp, append(append([]string{"--mode", mode, "--rules-recheck", recheck}, be.firewall()...), capture...)...)
	server := families[0].server

	// The reload: the operator's saved firewall, without detour's
	// rules; for TPROXY the policy rule goes too.
	for ipt, rules := range saved {
		cmd := exec.Command("ip", "netns", "exec", tp.G, ipt+"-restore")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s-restore: %v\n%s", ipt, err, out)
		}
	}
	if be.name == "nftables" {
		tp.nftLoad(t, "flush ruleset\n"+nftOperator)
	}
	if mode == "tproxy" {
		tp.exec(t, tp.G, "ip", "rule", "del", "fwmark", "0x100/0x100", "lookup", "100")
	} else {
		// Nothing captures now: the client reaches the server itself.
		if out := curlFrom(t, tp, tp.C, httpURL(server)); !strings.Contains(out, "you are "+families[0].client+"\n") {
			t.Fatalf("after the reload curl = %q; want it straight to the server", out)
		}
		d.cmd.Process.Signal(syscall.SIGUSR1)
	}
	d.waitLog(t, 10*time.Second, "rules restored", nil)
	// A periodic check may have come between the two wipes: wait
	// for the last restore.
	wantJumps := 2
	if be.name == "nftables" {
		wantJumps = 1
	}
	waitFor(t, 10*time.Second, "detour's rules back in place", func() bool {
		st := tp.stateFor(t, be)
		return be.jumps(st) == wantJumps && (mode == "redirect" || countIn(st, "lookup 100 proto 45") == 2)
	})
	out := curlFrom(t, tp, tp.C, httpURL(server)+"again")
	if strings.Contains(out, families[0].client) {
		t.Fatalf("after the restore curl = %q; want it through detour", out)
	}
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(server, "80")})
	if mode == "redirect" {
		// Nothing missing now: SIGUSR1 just checks.
		d.cmd.Process.Signal(syscall.SIGUSR1)
		d.waitLog(t, 5*time.Second, "rules checked", nil)
		if n := len(d.find("rules restored", nil)); n != 1 {
			t.Errorf("%d restores, want 1", n)
		}
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, d, 10*time.Second)
	tp.sameStateFor(t, be, before, "after SIGTERM")
}

// waitFor polls cond until it holds, for at most within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// fakeIptables writes iptables and ip6tables wrappers into a directory
// that run the real ones, except that any call whose arguments hold all of
// fail fails the way iptables does without the kernel support.
func fakeIptables(t *testing.T, fail ...string) string {
	t.Helper()
	dir := t.TempDir()
	conds := ""
	for _, f := range fail {
		conds += fmt.Sprintf(` && case " $* " in *" %s "*) true;; *) false;; esac`, f)
	}
	script := `#!/bin/sh
if true` + conds + `; then
	echo "$(basename "$0") v1.8.9 (nf_tables): Couldn't load target TPROXY:No such file or directory" >&2
	exit 2
fi
exec /usr/sbin/$(basename "$0") "$@"
`
	for _, name := range []string{"iptables", "ip6tables"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// Whatever keeps the rules from going in, detour says what and leaves the
// kernel as it was.
func TestRulesErrorsLeaveNothing(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	before := tp.kernelState(t)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"no iptables", []string{"PATH=/nonexistent"}, []string{"rules", "install", "--firewall", "iptables", "--bypass", "none"},
			"iptables not found"},
		{"kernel without TPROXY", []string{"PATH=" + fakeIptables(t, "TPROXY") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"rules", "install", "--firewall", "iptables", "--mode", "tproxy", "--bypass", "none"}, "lacks the TPROXY target (xt_TPROXY)"},
		// The probe passes, then the last step fails: everything done
		// before it is rolled back.
		{"failure half-way", []string{"PATH=" + fakeIptables(t, "-I", "DETOUR_TPROXY_OUT") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"rules", "install", "--firewall", "iptables", "--mode", "tproxy", "--output", "--bypass", "none"}, "rolled back"},
		{"run --install-rules", []string{"PATH=" + fakeIptables(t, "TPROXY") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"run", "--install-rules", "--firewall", "iptables", "--mode", "tproxy", "--bypass", "none"}, "TPROXY target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := tp.detourCmd(t, tc.env, tc.args...)
			if code != 1 || !strings.Contains(out, tc.want) {
				t.Fatalf("detour %v = %d, want 1 and %q:\n%s", tc.args, code, tc.want, out)
			}
			tp.sameState(t, before, "after the failure")
		})
	}

	t.Run("table that cannot be written", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		b, err := exec.CommandContext(ctx, "ip", "netns", "exec", tp.G, "setpriv", "--reuid=65534", "--regid=65534",
			"--clear-groups", "--inh-caps=-all", detourBin, "rules", "install", "--firewall", "iptables", "--bypass", "none").CombinedOutput()
		if err == nil || !strings.Contains(string(b), "cannot write the nat table") {
			t.Fatalf("unprivileged install = %v:\n%s", err, b)
		}
		tp.sameState(t, before, "after the failure")
	})

	t.Run("table used by someone else", func(t *testing.T) {
		if out, err := tp.exec(t, tp.G, "ip", "route", "add", "local", "default", "dev", "lo", "table", "100"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		defer tp.exec(t, tp.G, "ip", "route", "del", "local", "default", "dev", "lo", "table", "100")
		used := tp.kernelState(t)
		out, code := tp.detourCmd(t, nil, "rules", "install", "--firewall", "iptables", "--mode", "tproxy", "--bypass", "none")
		if code != 1 || !strings.Contains(out, "table 100 is already used by someone else") || !strings.Contains(out, "--table") {
			t.Fatalf("install with table 100 in use = %d:\n%s", code, out)
		}
		tp.sameState(t, used, "after the refusal")
	})
}

// `detour rules check` names the sysctls and tables that would defeat the
// rules; warnings alone exit 0.
func TestRulesCheck(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	for _, c := range [][]string{
		{"sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.gc.rp_filter=1",
			"net.ipv4.conf.gs.rp_filter=0", "net.ipv4.conf.gu.rp_filter=2"},
	} {
		if out, err := tp.exec(t, tp.G, c...); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	}
	before := tp.kernelState(t)
	out, code := tp.detourCmd(t, nil, "rules", "check", "--mode", "tproxy", "--bypass", "none")
	if code != 0 || !strings.Contains(out, "warning: net.ipv4.ip_forward is 0") ||
		!strings.Contains(out, "warning: rp_filter is strict (1) on gc") || strings.Contains(out, "on gs") ||
		strings.Contains(out, "forwarding is 0") {
		t.Fatalf("detour rules check = %d:\n%s", code, out)
	}
	tp.sameState(t, before, "after the check") // the probe chain is gone

	tp.exec(t, tp.G, "ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100")
	defer tp.exec(t, tp.G, "ip", "-6", "rule", "del", "fwmark", "1", "lookup", "100")
	out, code = tp.detourCmd(t, nil, "rules", "check", "--mode", "tproxy", "--bypass", "none")
	if code != 1 || !strings.Contains(out, "error: policy-routing table 100 is already used") {
		t.Fatalf("detour rules check with table 100 used = %d:\n%s", code, out)
	}
	out, code = tp.detourCmd(t, nil, "rules", "check", "--mode", "tproxy", "--bypass", "none", "--table", "101")
	if code != 0 {
		t.Fatalf("detour rules check --table 101 = %d:\n%s", code, out)
	}
}

// On a gateway with no iptables command reachable, --firewall auto (the
// default) picks nftables: rules go in and out over netlink, traffic flows
// through detour, doctor says which backend and why, and the nftables
// ruleset (where iptables-nft would have left tables) is as before.
func TestFirewallAutoWithoutIptables(t *testing.T) {
	be := backends[1]
	tp := newTopo(t)
	tp.firewallFor(t, be)
	before := tp.stateFor(t, be)
	noIptables := []string{"PATH=/nonexistent"}
	startServers(t, tp)

	out, code := tp.detourCmd(t, noIptables, "rules", "install", "--mode", "tproxy", "--bypass", "none")
	if code != 0 || !strings.Contains(out, "firewall nftables: no iptables command") {
		t.Fatalf("detour rules install without iptables = %d:\n%s", code, out)
	}
	out, _ = tp.detourCmd(t, noIptables, "rules", "show")
	if !strings.Contains(out, "table inet detour {") || !strings.Contains(out, "tproxy ip6 to :7777") {
		t.Fatalf("detour rules show without iptables:\n%s", out)
	}
	d := startDetour(t, tp, "--mode", "tproxy")
	for _, f := range families {
		out := curlFrom(t, tp, tp.C, httpURL(f.server))
		if !strings.HasPrefix(out, "hello from the server namespace") || strings.Contains(out, f.client) {
			t.Fatalf("curl %s through detour = %q; want the server's greeting to the gateway", f.server, out)
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(f.server, "80"), "error": ""})
	}
	out, _ = tp.detourCmd(t, noIptables, "doctor")
	if !strings.Contains(out, "ok    firewall: nftables (no iptables command") || !strings.Contains(out, "tproxy mode: the kernel has every match and target detour uses (nftables)") ||
		!strings.Contains(out, "detour's rules are installed") {
		t.Fatalf("detour doctor without iptables:\n%s", out)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, d, 10*time.Second)
	if out, code := tp.detourCmd(t, noIptables, "rules", "remove"); code != 0 || !strings.Contains(out, "removed (firewall nftables)") {
		t.Fatalf("detour rules remove without iptables = %d:\n%s", code, out)
	}
	tp.sameStateFor(t, be, before, "after remove")

	// With iptables there, auto still chooses nftables here (detour's own
	// table, and the operator's nftables-native one), so `rules remove`
	// finds detour's table.
	if out, code := tp.detourCmd(t, noIptables, "rules", "install", "--mode", "redirect", "--bypass", "none"); code != 0 {
		t.Fatalf("install: %d\n%s", code, out)
	}
	if out, code := tp.detourCmd(t, nil, "rules", "remove"); code != 0 || !strings.Contains(out, "removed (firewall nftables)") {
		t.Fatalf("detour rules remove with iptables on PATH = %d:\n%s", code, out)
	}
	tp.sameStateFor(t, be, before, "after the second remove")
}

// A killed run of one backend leaves rules that would capture beside the
// other's: an iptables run removes a stale nftables table of detour's, and
// an nftables check (which runs no iptables command) warns about stale
// iptables chains, read over netlink.
func TestRulesStaleOtherBackend(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	state := func() string {
		return tp.stateOf(t, []string{"iptables-save"}, []string{"ip6tables-save"}, []string{"nft", "list", "ruleset"})
	}
	before := state()
	startServers(t, tp)

	d := startDetour(t, tp, append([]string{"--firewall", "nftables", "--mode", "tproxy"}, capture...)...)
	d.cmd.Process.Kill()
	<-d.done
	if out, err := tp.exec(t, tp.G, "nft", "list", "table", "inet", "detour"); err != nil {
		t.Fatalf("no stale table after kill -9: %v\n%s", err, out)
	}
	d = startDetour(t, tp, append([]string{"--firewall", "iptables", "--mode", "redirect"}, capture...)...)
	if out, err := tp.exec(t, tp.G, "nft", "list", "table", "inet", "detour"); err == nil {
		t.Fatalf("the stale nftables table is still there beside the iptables rules:\n%s", out)
	}
	if st := state(); strings.Contains(st, "proto 45") || countIn(st, jumpRule) != 2 {
		t.Fatalf("after the iptables run started:\n%s", diffLines(before, st))
	}
	if out := curlFrom(t, tp, tp.C, httpURL(families[0].server)); strings.Contains(out, families[0].client) {
		t.Fatalf("curl = %q; want it through detour", out)
	}
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(families[0].server, "80")})

	d.cmd.Process.Kill()
	<-d.done
	out, code := tp.detourCmd(t, nil, "rules", "check", "--firewall", "nftables", "--bypass", "none")
	if code != 0 || !strings.Contains(out, "detour's iptables rules are installed too (ip nat DETOUR") ||
		!strings.Contains(out, "detour rules remove --firewall iptables") {
		t.Fatalf("detour rules check --firewall nftables with stale iptables rules = %d:\n%s", code, out)
	}
	if out, code := tp.detourCmd(t, nil, "rules", "remove", "--firewall", "iptables"); code != 0 {
		t.Fatalf("rules remove: %d\n%s", code, out)
	}
	if after := state(); after != before {
		t.Fatalf("after rules remove the gateway's kernel differs from before:\n%s", diffLines(before, after))
	}
}
