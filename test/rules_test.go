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
	"strings"
	"syscall"
	"testing"
	"time"
)

// End-to-end tests of the rules detour installs itself: traffic through
// them, exemptions, and a gateway's kernel left exactly as it was.

// operatorFirewall gives the gateway a firewall and policy routing of its
// own that detour must leave alone. (It also makes the nat and mangle
// tables exist before the "before" picture: iptables creates a table on
// first use and never deletes it, with or without detour.)
func (tp *topo) operatorFirewall(t *testing.T) {
	t.Helper()
	tp.settle(t)
	cmds := [][]string{
		{"ip", "rule", "add", "from", "198.19.99.0/24", "lookup", "50", "pref", "1000"},
		{"ip", "route", "add", "unreachable", "198.19.99.0/24", "table", "50"},
		{"ip", "-6", "rule", "add", "from", "fd00:99::/64", "lookup", "50", "pref", "1000"},
		{"ip", "-6", "route", "add", "unreachable", "fd00:99::/64", "table", "50"},
	}
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
	counters = regexp.MustCompile(`\[\d+:\d+\]`)
	comments = regexp.MustCompile(`(?m)^#.*\n`)
)

// kernelState is everything of the gateway's that detour may touch:
// iptables-save and ip6tables-save (without their date lines and packet
// counters), ip rule and ip -6 rule, and every routing table.
func (tp *topo) kernelState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, c := range [][]string{
		{"iptables-save"}, {"ip6tables-save"},
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	} {
		out, err := tp.exec(t, tp.G, c...)
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
		out = counters.ReplaceAllString(comments.ReplaceAllString(out, ""), "[0:0]")
		fmt.Fprintf(&b, "### %s\n%s", strings.Join(c, " "), out)
	}
	return b.String()
}

// sameState fails unless the gateway's kernel is as before.
func (tp *topo) sameState(t *testing.T, before, when string) {
	t.Helper()
	if after := tp.kernelState(t); after != before {
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
	for _, mode := range []string{"redirect", "tproxy"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			tp.operatorFirewall(t)
			before := tp.kernelState(t)
			tp.markCount(t, mark)
			withCounter := tp.kernelState(t)
			startServers(t, tp)
			startUpstreamHTTP(t, tp)
			startGatewayService(t, tp)
			d := startDetour(t, tp, "--mode", mode, "--install-rules", "--output",
				"--bypass", "198.18.3.0/24", "--bypass", "fd00:3::/64")

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
					marked := tp.markedPackets(t)
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
					if tp.markedPackets(t) <= marked {
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
			tp.sameState(t, withCounter, "after SIGTERM")
			tp.exec(t, tp.G, "iptables", "-w", "-t", "mangle", "-D", "OUTPUT", "-m", "mark", "--mark", mark, "-m", "comment", "--comment", "detour-marked")
			tp.exec(t, tp.G, "ip6tables", "-w", "-t", "mangle", "-D", "OUTPUT", "-m", "mark", "--mark", mark, "-m", "comment", "--comment", "detour-marked")
			tp.sameState(t, before, "after SIGTERM (without the test's counter)")
		})
	}
}

// A killed run leaves its rules; the next run replaces them with one set,
// and `detour rules remove` (no options needed) takes everything away.
func TestRulesAfterKill9(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	before := tp.kernelState(t)
	startServers(t, tp)
	args := append([]string{"--mode", "tproxy", "--output", "--table", "123"}, capture...)

	d := startDetour(t, tp, args...)
	d.cmd.Process.Kill()
	<-d.done
	stale := tp.kernelState(t)
	if stale == before || !strings.Contains(stale, "lookup 123 proto 45") {
		t.Fatalf("after kill -9 no rules are left; state:\n%s", stale)
	}

	// A new run with other options replaces the stale set.
	d = startDetour(t, tp, append([]string{"--mode", "redirect"}, capture...)...)
	if recs := d.find("rules installed", map[string]string{"replaced": "true"}); len(recs) != 1 {
		t.Errorf("second run: %v", recs)
	}
	st := tp.kernelState(t)
	if strings.Contains(st, "DETOUR_TPROXY") || strings.Contains(st, "proto 45") || countIn(st, jumpRule) != 2 {
		t.Fatalf("the stale TPROXY set was not replaced by one REDIRECT set per family:\n%s", diffLines(before, st))
	}
	if out := curlFrom(t, tp, tp.C, httpURL(families[0].server)); !strings.HasPrefix(out, "hello from the server namespace") {
		t.Fatalf("curl through the second run = %q", out)
	}
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(families[0].server, "80")})

	d.cmd.Process.Kill()
	<-d.done
	if out, code := tp.detourCmd(t, nil, "rules", "remove"); code != 0 || !strings.Contains(out, "removed") {
		t.Fatalf("detour rules remove = %d:\n%s", code, out)
	}
	tp.sameState(t, before, "after kill -9 and `detour rules remove`")
	// Removing again finds nothing and is not an error.
	if out, code := tp.detourCmd(t, nil, "rules", "remove"); code != 0 {
		t.Fatalf("second detour rules remove = %d:\n%s", code, out)
	}
	if out, _ := tp.detourCmd(t, nil, "rules", "show"); !strings.Contains(out, "none of detour's rules is installed") {
		t.Fatalf("detour rules show after remove:\n%s", out)
	}
}

// `detour rules install` twice is once; with other options it replaces the
// first set cleanly, exactly as a fresh install of those options would.
func TestRulesInstallIdempotentAndReplace(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	before := tp.kernelState(t)
	install := func(args ...string) string {
		t.Helper()
		out, code := tp.detourCmd(t, nil, append([]string{"rules", "install"}, args...)...)
		if code != 0 {
			t.Fatalf("detour rules install %v = %d:\n%s", args, code, out)
		}
		return out
	}
	first := []string{"--mode", "redirect", "--bypass", "none", "--output"}
	install(first...)
	once := tp.kernelState(t)
	if out := install(first...); !strings.Contains(out, "already installed") {
		t.Errorf("second install said:\n%s", out)
	}
	if twice := tp.kernelState(t); twice != once {
		t.Fatalf("installing twice differs from once:\n%s", diffLines(once, twice))
	}
	if n := countIn(once, jumpRule); n != 4 { // PREROUTING and OUTPUT, two families
		t.Errorf("%d jump rules, want 4:\n%s", n, once)
	}

	second := []string{"--mode", "tproxy", "--ports", "80,9000", "--interface", "gc", "--bypass", "198.18.3.0/24",
		"--table", "200", "--tproxy-mark", "0x400", "--ipv6=false", "--listen", ":7000"}
	install(second...)
	replaced := tp.kernelState(t)
	out, _ := tp.detourCmd(t, nil, "rules", "show")
	for _, want := range []string{"-N DETOUR_TPROXY", "--on-port 7000", "-i gc", "--dports 80,9000", "198.18.3.0/24", "lookup 200"} {
		if !strings.Contains(out, want) {
			t.Errorf("detour rules show lacks %q:\n%s", want, out)
		}
	}
	if _, code := tp.detourCmd(t, nil, "rules", "remove"); code != 0 {
		t.Fatal("remove failed")
	}
	tp.sameState(t, before, "after remove")
	install(second...)
	if fresh := tp.kernelState(t); fresh != replaced {
		t.Fatalf("replacing differs from a fresh install:\n%s", diffLines(fresh, replaced))
	}
	if _, code := tp.detourCmd(t, nil, "rules", "remove"); code != 0 {
		t.Fatal("remove failed")
	}
	tp.sameState(t, before, "after the last remove")
}

// A host firewall reload wipes detour's iptables rules; the running detour
// puts them back, on SIGUSR1 or at its next periodic check, and says so.
func TestRulesRestoredAfterFirewallReload(t *testing.T) {
	for _, tc := range []struct {
		mode, recheck string
	}{
		{"redirect", "0"},   // on demand: SIGUSR1
		{"tproxy", "300ms"}, // periodic
	} {
		t.Run(tc.mode, func(t *testing.T) {
			tp := newTopo(t)
			tp.operatorFirewall(t)
			before := tp.kernelState(t)
			saved := map[string]string{}
			for _, ipt := range []string{"iptables", "ip6tables"} {
				out, err := tp.exec(t, tp.G, ipt+"-save")
				if err != nil {
					t.Fatal(err)
				}
				saved[ipt] = out
			}
			startServers(t, tp)
			d := startDetour(t, tp, append([]string{"--mode", tc.mode, "--rules-recheck", tc.recheck}, capture...)...)
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
			if tc.mode == "tproxy" {
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
			waitFor(t, 10*time.Second, "detour's rules back in place", func() bool {
				st := tp.kernelState(t)
				return countIn(st, jumpRule) == 2 && (tc.mode == "redirect" || countIn(st, "lookup 100 proto 45") == 2)
			})
			out := curlFrom(t, tp, tp.C, httpURL(server)+"again")
			if strings.Contains(out, families[0].client) {
				t.Fatalf("after the restore curl = %q; want it through detour", out)
			}
			d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": net.JoinHostPort(server, "80")})
			if tc.mode == "redirect" {
				// Nothing missing now: SIGUSR1 just checks.
				d.cmd.Process.Signal(syscall.SIGUSR1)
				d.waitLog(t, 5*time.Second, "rules checked", nil)
				if n := len(d.find("rules restored", nil)); n != 1 {
					t.Errorf("%d restores, want 1", n)
				}
			}
			d.cmd.Process.Signal(syscall.SIGTERM)
			waitExit(t, d, 10*time.Second)
			tp.sameState(t, before, "after SIGTERM")
		})
	}
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
		{"no iptables", []string{"PATH=/nonexistent"}, []string{"rules", "install", "--bypass", "none"},
			"iptables not found"},
		{"kernel without TPROXY", []string{"PATH=" + fakeIptables(t, "TPROXY") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"rules", "install", "--mode", "tproxy", "--bypass", "none"}, "lacks the TPROXY target (xt_TPROXY)"},
		// The probe passes, then the last step fails: everything done
		// before it is rolled back.
		{"failure half-way", []string{"PATH=" + fakeIptables(t, "-I", "DETOUR_TPROXY_OUT") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"rules", "install", "--mode", "tproxy", "--output", "--bypass", "none"}, "rolled back"},
		{"run --install-rules", []string{"PATH=" + fakeIptables(t, "TPROXY") + ":/usr/sbin:/usr/bin:/sbin:/bin"},
			[]string{"run", "--install-rules", "--mode", "tproxy", "--bypass", "none"}, "TPROXY target"},
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
			"--clear-groups", "--inh-caps=-all", detourBin, "rules", "install", "--bypass", "none").CombinedOutput()
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
		out, code := tp.detourCmd(t, nil, "rules", "install", "--mode", "tproxy", "--bypass", "none")
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
