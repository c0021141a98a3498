package test

// End-to-end tests of running detour as a service (issue 6): the Prometheus
// endpoint (--metrics), the connection and sniffing limits (--max-conns,
// --max-sniffing), reloading routes on SIGHUP, faults of upstreams, servers
// and clients, hostile first bytes, and `detour doctor`. Where it can, a
// test counts what happened three ways: what its clients and servers saw,
// detour's access lines, and detour's metrics.
//
// The upstream proxies here are small SOCKS5 servers in this process
// (socks5Server), listening in the upstream namespace, so a test can kill
// one mid-transfer and count what each carried.

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// metricsAddr is where detour serves /metrics in these tests: loopback of
// the gateway namespace.
const metricsAddr = "127.0.0.1:9464"

// Ports of the in-process SOCKS5 upstreams on 198.18.3.2.
const (
	socksPortA = 11080
	socksPortB = 11081
)

// opFlags are detour's flags in these tests: its own rules, capturing only
// what arrives from the client side (the SOCKS5 upstreams' connections to
// the server cross the gateway too and must go straight on), metrics on,
// and a short grace so that cleanup is quick even after a failure.
func opFlags() []string {
	return []string{"--listen", fmt.Sprintf(":%d", listenPort), "--install-rules", "--bypass", "none",
		"--interface", "gc", "--metrics", metricsAddr, "--grace", "2s"}
}

// startOp starts detour with opFlags and ARGS, checked at the end (see
// startChecked).
func startOp(t *testing.T, tp *topo, args ...string) *detourProc {
	t.Helper()
	return startChecked(t, tp, append(opFlags(), args...)...)
}

// alive fails the test if detour has exited.
func (d *detourProc) alive(t *testing.T) {
	t.Helper()
	select {
	case <-d.done:
		t.Fatalf("detour exited (%v); log:\n%s", d.err, d.rawLog())
	default:
	}
}

// findPrefix is find for records whose message starts with prefix.
func (d *detourProc) findPrefix(prefix string) []map[string]any {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []map[string]any
	for _, rec := range d.logs {
		if msg, _ := rec["msg"].(string); strings.HasPrefix(msg, prefix) {
			out = append(out, rec)
		}
	}
	return out
}

// ---- namespaces without a *testing.T (for any goroutine) ----

// nsDo runs fn on an OS thread switched into namespace ns, like inNS, but
// returns an error instead of failing a test, so any goroutine may call it.
func nsDo(ns string, fn func()) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	h, err := netns.GetFromName(ns)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("netns %s: %w", ns, err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering netns %s: %w", ns, err)
	}
	defer func() {
		// A thread that cannot go back dies with its goroutine.
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	fn()
	return nil
}

// nsDial connects from namespace ns.
func nsDial(ns, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	var err error
	if nerr := nsDo(ns, func() { c, err = net.DialTimeout("tcp", addr, timeout) }); nerr != nil {
		return nil, nerr
	}
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// clientPort hands out the client's source ports in a topology, each port
// once, below the kernel's ephemeral range (32768-60999). Left to the kernel,
// a port is reused for another destination; REDIRECT's NAT then finds two
// connections with the same reply tuple (client:port ↔ gateway:7777) and
// gives the second another client port, so detour's access line names a port
// the client never had. With each port used once, the client's address
// finds its access line.
func (tp *topo) clientPort() (int, error) {
	const first, last = 10000, 32000
	p := int(tp.lastPort.Add(1)) + first - 1
	if p > last {
		return 0, fmt.Errorf("the test used all %d client ports of its topology", last-first+1)
	}
	return p, nil
}

// clientDialer dials from the next clientPort; it must be used on a thread
// in the client namespace.
func (tp *topo) clientDialer(timeout time.Duration) (*net.Dialer, error) {
	port, err := tp.clientPort()
	if err != nil {
		return nil, err
	}
	return &net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{Port: port}}, nil
}

// clientDial connects from the client namespace, from the next clientPort.
func clientDial(tp *topo, addr string) (*net.TCPConn, error) {
	dl, err := tp.clientDialer(10 * time.Second)
	if err != nil {
		return nil, err
	}
	var c net.Conn
	if nerr := nsDo(tp.C, func() { c, err = dl.Dial("tcp", addr) }); nerr != nil {
		return nil, nerr
	}
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// opDial is clientDial for the test goroutine: it fails the test, closes
// the connection at the end and bounds it with a deadline.
func opDial(t *testing.T, tp *topo, addr string) *net.TCPConn {
	t.Helper()
	c, err := clientDial(tp, addr)
	if err != nil {
		t.Fatalf("client dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	return c
}

// dialMany opens n connections from the client namespace to addr, workers at
// a time (each worker's thread stays in the namespace), and runs prep on each
// (say, a request and its reply) under the deadline. It returns the
// connections that worked, which the caller closes, and the failures; what
// is not made by the deadline is a failure.
func dialMany(tp *topo, addr string, n, workers int, within time.Duration, prep func(*net.TCPConn) error) ([]*net.TCPConn, []error) {
	deadline := time.Now().Add(within)
	var (
		mu    sync.Mutex
		conns []*net.TCPConn
		errs  []error
		next  atomic.Int64
		wg    sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	for range workers {
		wg.Go(func() {
			err := nsDo(tp.C, func() {
				for {
					i := next.Add(1)
					if i > int64(n) {
						return
					}
					if time.Now().After(deadline) {
						fail(fmt.Errorf("connection %d not made within %v", i, within))
						continue
					}
					dl, err := tp.clientDialer(10 * time.Second)
					var nc net.Conn
					if err == nil {
						nc, err = dl.Dial("tcp", addr)
					}
					if err != nil {
						fail(fmt.Errorf("connection %d: %w", i, err))
						continue
					}
					c := nc.(*net.TCPConn)
					c.SetDeadline(deadline)
					if prep != nil {
						err = prep(c)
					}
					c.SetDeadline(time.Time{})
					if err != nil {
						c.Close()
						fail(fmt.Errorf("connection %d: %w", i, err))
						continue
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
			})
			if err != nil {
				fail(err)
			}
		})
	}
	wg.Wait()
	return conns, errs
}

// holdIdle is dialMany's prep for an idle connection to the bulk server:
// op I, and its one-byte answer proves the connection goes through.
func holdIdle(c *net.TCPConn) error {
	if _, err := c.Write([]byte("Ihold")); err != nil {
		return err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'I' {
		return fmt.Errorf("idle hold: read %q, %v", b[:], err)
	}
	return nil
}

func closeAll(conns []*net.TCPConn) {
	for _, c := range conns {
		c.Close()
	}
}

// connKey picks c's access line out of detour's log: its client address
// and destination. c must come from clientPort (see there).
func connKey(c *net.TCPConn) map[string]string {
	return map[string]string{"client": c.LocalAddr().String(), "dst": c.RemoteAddr().String()}
}

// httpGet sends one HTTP/1.1 request for host to addr from the client
// namespace and returns the bytes sent, the whole reply, and connKey.
func httpGet(tp *topo, addr, host string) (sent int, reply []byte, key map[string]string, err error) {
	c, err := clientDial(tp, addr)
	if err != nil {
		return 0, nil, nil, err
	}
	defer c.Close()
	key = connKey(c)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	req := fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: detour-test\r\nConnection: close\r\n\r\n", host)
	if _, err := io.WriteString(c, req); err != nil {
		return 0, nil, key, err
	}
	reply, err = io.ReadAll(c)
	if err == nil && !bytes.Contains(reply, []byte("hello from the server namespace")) {
		err = fmt.Errorf("no greeting from the server in %q", reply)
	}
	return len(req), reply, key, err
}

// ---- metrics ----

// procKB reads a "VmRSS"-like field (kB) of /proc/PID/status.
func procKB(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("reading detour's status: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			fs := strings.Fields(v)
			if len(fs) > 0 {
				n, _ := strconv.Atoi(fs[0])
				return n
			}
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// waitActive polls detour's count of connections served (SIGUSR1) until
// ok accepts it (nil: until it is 0), for at most within, and returns it.
func waitActive(t *testing.T, d *detourProc, ok func(int) bool, within time.Duration) int {
	t.Helper()
	if ok == nil {
		ok = func(a int) bool { return a == 0 }
	}
	deadline := time.Now().Add(within)
	for {
		a, _, _ := d.stats(t)
		if ok(a) || time.Now().After(deadline) {
			return a
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// idle is what detour holds when it serves nothing.
type idle struct {
	goroutines, fds       int // from SIGUSR1's stats line (after a GC)
	mGoroutines, mOpenFDs int // from /metrics: go_goroutines, process_open_fds
}

// measureIdle waits (at most 10s) until detour serves nothing and returns
// what it holds.
func measureIdle(t *testing.T, d *detourProc, tp *topo) idle {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		active, g, fds := d.stats(t)
		m := scrape(t, tp)
		if active == 0 && m.sum("detour_connections_active") == 0 {
			return idle{g, fds, int(m.sum("go_goroutines")), int(m.sum("process_open_fds"))}
		}
		if time.Now().After(deadline) {
			t.Fatalf("detour still serves %d connections (metric %g) with none open", active, m.sum("detour_connections_active"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// gatherWorkers is how many more goroutines than at an idle scrape
// go_goroutines may count with nothing leaked: the registry's Gather starts
// collector workers as it goes (one more whenever the others are busy, up to
// one per collector) while the Go collector counts, so a scrape with more
// series to write (a new error label, say) counts a worker or two more. The
// stats line, counted after the fact with no scrape running, is exact.
const gatherWorkers = 3

// backToIdle waits (at most within) until detour holds no more goroutines
// and fds than at base, by its stats line and by its metrics, and fails the
// test with both otherwise.
func backToIdle(t *testing.T, d *detourProc, tp *topo, base idle, within time.Duration) (idle, promMetrics) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		active, g, fds := d.stats(t)
		m := scrape(t, tp)
		now := idle{g, fds, int(m.sum("go_goroutines")), int(m.sum("process_open_fds"))}
		ok := active == 0 && m.sum("detour_connections_active") == 0 &&
			now.goroutines <= base.goroutines && now.fds <= base.fds &&
			now.mGoroutines <= base.mGoroutines+gatherWorkers && now.mOpenFDs <= base.mOpenFDs
		if ok {
			return now, m
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after the connections closed, detour still holds: active %d (metric %g), goroutines %d (idle %d), fds %d (idle %d); "+
				"metrics go_goroutines %d (idle %d), process_open_fds %d (idle %d)",
				within, active, m.sum("detour_connections_active"), g, base.goroutines, fds, base.fds,
				now.mGoroutines, base.mGoroutines, now.mOpenFDs, base.mOpenFDs)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// raiseNoFile makes sure this process (and detour, its child, which inherits
// it) may open need files: the soft limit goes to the hard one, and the hard
// one up to need if it is lower (root may). The old limit comes back after
// the test.
func raiseNoFile(t *testing.T, need uint64) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Max = max(lim.Max, need)
	lim.Cur = lim.Max
	// syscall.Setrlimit also stops os/exec from restoring the limit Go
	// started with in children: detour gets this one.
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("open-file limit soft %d hard %d; raising it to %d: %v (this test holds %d sockets)", old.Cur, old.Max, lim.Max, err, need)
	}
	t.Logf("open-file limit: soft %d hard %d → soft %d hard %d", old.Cur, old.Max, lim.Cur, lim.Max)
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// ---- SOCKS5 upstreams ----

// checkAccessFields checks that an access line has the documented fields.
func checkAccessFields(t *testing.T, rec map[string]any, extra ...string) {
	t.Helper()
	for _, f := range append([]string{"client", "dst", "route", "host", "proto", "sniff", "up", "down", "error"}, extra...) {
		if _, ok := rec[f]; !ok {
			t.Errorf("access line lacks %q: %v", f, rec)
		}
	}
}
