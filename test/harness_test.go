// Package test holds detour's end-to-end tests: the built binary runs in a
// gateway network namespace between a client and a server namespace, with
// real kernel rules, real clients (curl) and real sockets. They need root
// and skip without it.
package test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

var (
	detourBin  string // built once in TestMain
	skipReason string // set when the end-to-end tests cannot run here

	createdMu sync.Mutex
	created   []string // topology IDs made by this run, checked at exit
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		skipReason = "end-to-end tests need root (network namespaces, iptables); run `sudo make test`"
	} else {
		for _, tool := range []string{"ip", "iptables", "ip6tables", "curl"} {
			if _, err := exec.LookPath(tool); err != nil {
				fmt.Fprintf(os.Stderr, "end-to-end tests need %s: install it (see .ci/run)\n", tool)
				return 1
			}
		}
	}
	dir, err := os.MkdirTemp("", "detour-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	detourBin = filepath.Join(dir, "detour")
	build := exec.Command("go", "build", "-o", detourBin, "github.com/detour-proxy/detour/cmd/detour")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building detour: %v\n", err)
		return 1
	}
	code := m.Run()
	if left := leftoverNamespaces(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: namespaces left behind by the tests: %v\n", left)
		return 1
	}
	return code
}

func requireRoot(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

func leftoverNamespaces() []string {
	out, _ := exec.Command("ip", "netns", "list").Output()
	createdMu.Lock()
	defer createdMu.Unlock()
	var left []string
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(line, " ")
		for _, id := range created {
			if strings.HasPrefix(name, id+"-") {
				left = append(left, name)
			}
		}
	}
	return left
}

// topo is one throwaway topology from scripts/netns.sh: client, gateway,
// server and upstream namespaces joined by veth pairs.
type topo struct {
	id         string
	C, G, S, U string

	lastPort atomic.Int32 // the client's last source port from clientPort
}

// Addresses of scripts/netns.sh.
type family struct {
	name            string
	client, gateway string // client's address, gateway's address on the client side
	server          string
	upstream        string
}

var families = []family{
	{"ipv4", "198.18.1.2", "198.18.1.1", "198.18.2.2", "198.18.3.2"},
	{"ipv6", "fd00:1::2", "fd00:1::1", "fd00:2::2", "fd00:3::2"},
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	requireRoot(t)
	b := make([]byte, 4)
	rand.Read(b)
	id := "dt" + hex.EncodeToString(b)
	createdMu.Lock()
	created = append(created, id)
	createdMu.Unlock()
	tp := &topo{id: id, C: id + "-c", G: id + "-g", S: id + "-s", U: id + "-u"}
	t.Cleanup(func() {
		if out, err := script("down", id); err != nil {
			t.Errorf("removing topology %s: %v\n%s", id, err, out)
		}
	})
	if out, err := script("up", id); err != nil {
		t.Fatalf("creating topology %s: %v\n%s", id, err, out)
	}
	return tp
}

func script(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return exec.CommandContext(ctx, "bash", append([]string{"../scripts/netns.sh"}, args...)...).CombinedOutput()
}

// markCount adds the gateway's counter of packets carrying mark (see
// markedPackets); detour installs the capture rules itself.
func (tp *topo) markCount(t *testing.T, mark string) {
	t.Helper()
	if out, err := script("markcount", tp.id, mark); err != nil {
		t.Fatalf("adding the mark counter: %v\n%s", err, out)
	}
}

// exec runs a command in namespace ns and returns its combined output.
func (tp *topo) exec(t *testing.T, ns string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	return string(out), err
}

// inNS runs fn on an OS thread switched into namespace ns. Sockets created
// by fn stay in ns for their whole life, whichever thread uses them later.
func inNS(t *testing.T, ns string, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("current netns: %v", err)
	}
	defer orig.Close()
	h, err := netns.GetFromName(ns)
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("netns %s: %v", ns, err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("entering netns %s: %v", ns, err)
	}
	defer func() {
		// Only a thread back in its own namespace may be reused; if the
		// switch back fails, the locked thread dies with the goroutine.
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		}
	}()
	fn()
}

func listenIn(t *testing.T, ns, addr string) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	var err error
	inNS(t, ns, func() { ln, err = net.Listen("tcp", addr) })
	if err != nil {
		t.Fatalf("listening on %s in %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// dialIn connects from namespace ns; the result must be closed by the caller.
func dialIn(t *testing.T, ns, addr string) (*net.TCPConn, error) {
	t.Helper()
	var c net.Conn
	var err error
	inNS(t, ns, func() { c, err = net.DialTimeout("tcp", addr, 10*time.Second) })
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// capture are the flags with which detour installs its own capture rules
// in the tests. The topology's addresses (198.18.0.0/15, fd00::/8) are in
// detour's default bypass list, so the tests replace that list.
var capture = []string{"--install-rules", "--bypass", "none"}

// detourProc is a running detour binary in the gateway namespace.
type detourProc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	raw  []string
	done chan struct{}
	err  error // exit status, after done
}

// startChecked is startDetour, and once the test is over and detour
// stopped, checks that it exited with status 0 and that nothing panicked.
func startChecked(t *testing.T, tp *topo, args ...string) *detourProc {
	t.Helper()
	var d *detourProc
	// Registered before startDetour's cleanup, so it runs after it.
	t.Cleanup(func() {
		if d == nil {
			return
		}
		select {
		case <-d.done:
			if d.err != nil {
				t.Errorf("detour exited with %v after SIGTERM, want status 0", d.err)
			}
		default:
		}
		if log := d.rawLog(); strings.Contains(strings.ToLower(log), "panic") {
			t.Errorf("detour's log mentions a panic:\n%s", log)
		}
	})
	d = startDetour(t, tp, args...)
	return d
}

// startDetour runs `detour run --log-format json ARGS` in the gateway and
// waits until it listens.
func startDetour(t *testing.T, tp *topo, args ...string) *detourProc {
	t.Helper()
	argv := append([]string{"netns", "exec", tp.G, detourBin, "run", "--log-format", "json"}, args...)
	// `ip netns exec` execs detour itself, so the PID is detour's.
	d := &detourProc{cmd: exec.Command("ip", argv...), done: make(chan struct{})}
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting detour: %v", err)
	}
	go func() {
		d.read(stderr)
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(15 * time.Second):
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("detour log:\n%s", d.rawLog())
		}
	})
	d.waitLog(t, 10*time.Second, "listening", nil)
	return d
}

// read collects the log records of r until it ends.
func (d *detourProc) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var rec map[string]any
		json.Unmarshal([]byte(line), &rec)
		d.mu.Lock()
		d.raw = append(d.raw, line)
		if rec != nil {
			d.logs = append(d.logs, rec)
		}
		d.mu.Unlock()
	}
}

func (d *detourProc) rawLog() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return strings.Join(d.raw, "\n")
}

// find returns the log records with message msg whose fields include want
// (compared as strings).
func (d *detourProc) find(msg string, want map[string]string) []map[string]any {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []map[string]any
next:
	for _, rec := range d.logs {
		if rec["msg"] != msg {
			continue
		}
		for k, v := range want {
			if fmt.Sprint(rec[k]) != v {
				continue next
			}
		}
		out = append(out, rec)
	}
	return out
}

// wantFields fails the test for each field of want (compared as strings)
// the access line rec does not have.
func wantFields(t *testing.T, rec map[string]any, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if fmt.Sprint(rec[k]) != v {
			t.Errorf("access line %s = %v, want %s; %v", k, rec[k], v, rec)
		}
	}
}

// waitLog waits for a record like find's and returns it.
func (d *detourProc) waitLog(t *testing.T, within time.Duration, msg string, want map[string]string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if recs := d.find(msg, want); len(recs) > 0 {
			return recs[len(recs)-1]
		}
		select {
		case <-d.done:
			t.Fatalf("detour exited (%v) before logging %q %v; log:\n%s", d.err, msg, want, d.rawLog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("detour did not log %q %v within %v; log:\n%s", msg, want, within, d.rawLog())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stats asks detour for its counts (SIGUSR1) and returns them.
func (d *detourProc) stats(t *testing.T) (active, goroutines, fds int) {
	t.Helper()
	before := len(d.find("stats", nil))
	d.cmd.Process.Signal(syscall.SIGUSR1)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if recs := d.find("stats", nil); len(recs) > before {
			r := recs[len(recs)-1]
			return toInt(r["active"]), toInt(r["goroutines"]), toInt(r["fds"])
		}
		if time.Now().After(deadline) {
			t.Fatalf("no stats line after SIGUSR1; log:\n%s", d.rawLog())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func toInt(v any) int {
	f, _ := v.(float64)
	return int(f)
}

// markedPackets reads the gateway's counter of packets carrying detour's
// socket mark (markCount's rule) for IPv4 plus IPv6.
func (tp *topo) markedPackets(t *testing.T) int {
	t.Helper()
	total := 0
	for _, ipt := range []string{"iptables", "ip6tables"} {
		out, err := tp.exec(t, tp.G, ipt, "-w", "-t", "mangle", "-L", "OUTPUT", "-v", "-n", "-x")
		if err != nil {
			t.Fatalf("%s: %v\n%s", ipt, err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "detour-marked") {
				n, _ := strconv.Atoi(strings.Fields(line)[0])
				total += n
			}
		}
	}
	return total
}

// netnsEtc gives namespace ns files of its own under /etc (`ip netns exec`
// mounts /etc/netns/NS/* over /etc/*): files maps a name ("hosts",
// "resolv.conf") to its text. They are removed in cleanup, and /etc/netns
// too when it was not there before and is empty.
func netnsEtc(t *testing.T, ns string, files map[string]string) {
	t.Helper()
	_, err := os.Stat("/etc/netns")
	hadNetns := err == nil
	etc := filepath.Join("/etc/netns", ns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.RemoveAll(etc)
		if !hadNetns {
			os.Remove("/etc/netns") // only if empty
		}
	})
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// writeHosts gives namespace ns an /etc/hosts with localhost and hosts
// (name → IP), removed in cleanup.
func writeHosts(t *testing.T, ns string, hosts map[string]string) {
	t.Helper()
	var b strings.Builder
	b.WriteString("127.0.0.1 localhost\n::1 localhost\n")
	names := make([]string, 0, len(hosts))
	for name := range hosts {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(&b, "%s %s\n", hosts[name], name)
	}
	netnsEtc(t, ns, map[string]string{"hosts": b.String()})
}
