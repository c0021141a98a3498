package test

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// loopPort is the server port the tests' misconfigured rules loop; other
// ports go through detour as usual.
const loopPort = bulkPort

// loopSYNs counts, in the gateway, the SYNs detour sends (its mark) to the
// server's loopPort: its dials there, looped or not.
func (tp *topo) loopSYNs(t *testing.T) int {
	t.Helper()
	out, err := tp.exec(t, tp.G, "iptables", "-w", "-t", "mangle", "-L", "OUTPUT", "-v", "-n", "-x")
	if err != nil {
		t.Fatalf("iptables: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "detour-loop-syn") {
			n, _ := strconv.Atoi(strings.Fields(line)[0])
			return n
		}
	}
	t.Fatalf("no detour-loop-syn counter:\n%s", out)
	return 0
}

// gw runs commands in the gateway, failing the test on error.
func (tp *topo) gw(t *testing.T, cmds ...[]string) {
	t.Helper()
	for _, c := range cmds {
		if out, err := tp.exec(t, tp.G, c...); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
}

// checkLoop makes one client connection to the looped port and checks that
// detour saw one routing loop: the client's connection ends (not after a
// dial timeout), detour dialled loopPort at most twice (its own dial and at
// most one more), logged one "routing loop" line naming the cause, and
// counts one loop in detour_loops_total.
func checkLoop(t *testing.T, tp *topo, d *detourProc, cause string) {
	t.Helper()
	before := tp.loopSYNs(t)
	start := time.Now()
	c, err := dialIn(t, tp.C, net.JoinHostPort(families[0].server, fmt.Sprint(loopPort)))
	if err == nil {
		c.SetDeadline(time.Now().Add(8 * time.Second))
		c.Write([]byte("Eping"))
		got, rerr := io.ReadAll(c)
		c.Close()
		if rerr == nil && string(got) == "ping" {
			t.Fatal("the looped connection was served: the test's rules made no loop")
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("the looped connection ended after %v (%v): not refused at once", took, rerr)
		}
	}
	rec := d.waitLog(t, 5*time.Second, "routing loop", nil)
	if c := fmt.Sprint(rec["cause"]); !strings.Contains(c, cause) {
		t.Errorf("routing loop cause %q does not say %q", c, cause)
	}
	time.Sleep(500 * time.Millisecond) // more loops, if any, show by now
	if n := len(d.find("routing loop", nil)); n != 1 {
		t.Errorf("%d routing loop lines, want 1", n)
	}
	if n := tp.loopSYNs(t) - before; n < 1 || n > 2 {
		t.Errorf("detour sent %d SYNs to the looped port, want 1 or 2 (its dial and at most one more)", n)
	}
	if n := scrape(t, tp).sum("detour_loops_total"); n != 1 {
		t.Errorf("detour_loops_total = %g, want 1", n)
	}
}

// A REDIRECT rule in nat OUTPUT that does not exempt detour's mark sends
// detour's own connection to the server's port 9000 back to it: one client
// connection makes one routing loop, refused at its first hop, and
// clients of other ports are served before, during and after.
func TestLoopRedirect(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startOp(t, tp)
	server := families[0].server
	tp.gw(t,
		[]string{"iptables", "-w", "-t", "mangle", "-I", "OUTPUT", "1", "-p", "tcp", "--syn", "-d", server, "--dport", fmt.Sprint(loopPort),
			"-m", "mark", "--mark", mark, "-m", "comment", "--comment", "detour-loop-syn"},
		// The operator's rule, without `-m mark ! --mark 0x2d`.
		[]string{"iptables", "-w", "-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "-d", server, "--dport", fmt.Sprint(loopPort),
			"-j", "REDIRECT", "--to-ports", fmt.Sprint(listenPort)})

	normal := func() {
		if out := curlFrom(t, tp, tp.C, httpURL(server)); !strings.HasPrefix(out, "hello from the server namespace") {
			t.Errorf("a normal client got %q", out)
		}
	}
	normal()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // during
		defer wg.Done()
		for range 5 {
			normal()
		}
	}()
	checkLoop(t, tp, d, "does not exempt detour's socket mark 0x2d")
	wg.Wait()
	normal()
	d.alive(t)
}

// TPROXY with a policy rule `fwmark 0x1/0x1 lookup 200` (table 200: local
// default route), common in guides. It matches detour's default mark 0x2d
// (bit 0): doctor and detour's start name it, and detour's dials fail at
// once (connect: network is unreachable: the kernel routes them to a local
// address it has not got). With a mark the rule does not match (0x2c), the
// guide's other rules, which give the gateway's own connections to the
// server's port 9000 the policy mark and TPROXY them from lo without
// exempting detour's mark, send detour's own dial back to it: one client
// connection makes one routing loop; other ports are served.
func TestLoopTProxy(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	server, port := families[0].server, fmt.Sprint(loopPort)
	tp.gw(t,
		[]string{"ip", "rule", "add", "pref", "100", "fwmark", "0x1/0x1", "lookup", "200"},
		[]string{"ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "200"})

	doctor := func(args ...string) string {
		out, err := tp.exec(t, tp.G, append([]string{detourBin, "doctor"}, args...)...)
		if err != nil {
			t.Fatalf("detour doctor %v: %v\n%s", args, err, out)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "fwmark 0x1/0x1 lookup 200") {
				return l
			}
		}
		return ""
	}
	if l := doctor(); !strings.HasPrefix(l, "warn") || !strings.Contains(l, "0x2d") || !strings.Contains(l, "--mark 0x2c") {
		t.Errorf("doctor's line on the fwmark rule = %q; want a warning naming it, detour's mark and the fix", l)
	}
	if l := doctor("--mark", "0x2c"); l != "" {
		t.Errorf("doctor --mark 0x2c warns about a rule that does not match it: %q", l)
	}

	t.Run("default mark", func(t *testing.T) {
		d := startOp(t, tp, "--mode", "tproxy")
		if w := d.find("ip rule overlaps detour's mark", nil); len(w) == 0 || !strings.Contains(fmt.Sprint(w[0]["problem"]), "fwmark 0x1/0x1 lookup 200") {
			t.Errorf("detour --mode tproxy did not warn about the fwmark rule at start: %v", w)
		}
		c, err := dialIn(t, tp.C, net.JoinHostPort(server, fmt.Sprint(httpPort)))
		if err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.ReadAll(c)
			c.Close()
		}
		d.waitLog(t, 5*time.Second, "conn", map[string]string{"error": "dial tcp " + net.JoinHostPort(server, fmt.Sprint(httpPort)) + ": connect: network is unreachable"})
		d.cmd.Process.Signal(syscall.SIGTERM)
		waitExit(t, d, 10*time.Second)
	})

	t.Run("loop", func(t *testing.T) {
		d := startOp(t, tp, "--mode", "tproxy", "--mark", "0x2c")
		if w := d.find("ip rule overlaps detour's mark", nil); len(w) != 0 {
			t.Errorf("detour --mark 0x2c warns about a rule that does not match it: %v", w)
		}
		tp.gw(t,
			[]string{"iptables", "-w", "-t", "mangle", "-I", "OUTPUT", "1", "-p", "tcp", "--syn", "-d", server, "--dport", port,
				"-m", "mark", "--mark", "0x2c", "-m", "comment", "--comment", "detour-loop-syn"},
			// The guide's: the gateway's own connections to the server's
			// port get the policy mark, and come back through lo into
			// TPROXY; neither exempts detour's mark.
			[]string{"iptables", "-w", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-d", server, "--dport", port,
				"-j", "MARK", "--set-xmark", "0x1/0x1"},
			[]string{"iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "1", "-i", "lo", "-p", "tcp", "--dport", port,
				"-j", "TPROXY", "--on-port", fmt.Sprint(listenPort), "--tproxy-mark", "0x1/0x1"})
		checkLoop(t, tp, d, "does not exempt detour's socket mark 0x2c")
		if out := curlFrom(t, tp, tp.C, httpURL(server)); !strings.HasPrefix(out, "hello from the server namespace") {
			t.Errorf("a normal client got %q", out)
		}
		d.alive(t)
	})
}
