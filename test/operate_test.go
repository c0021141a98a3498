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
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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

// promSample is one line of the Prometheus text format.
type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

type promMetrics []promSample

// scrape fetches and parses detour's /metrics from inside the gateway.
func scrape(t *testing.T, tp *topo) promMetrics {
	t.Helper()
	c, err := dialIn(t, tp.G, metricsAddr)
	if err != nil {
		t.Fatalf("metrics endpoint http://%s/metrics in the gateway: %v", metricsAddr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", metricsAddr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("GET http://%s/metrics: %v", metricsAddr, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET http://%s/metrics: %s, %v\n%s", metricsAddr, resp.Status, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("GET /metrics: Content-Type %q, want the Prometheus text format (text/plain)", ct)
	}
	m, err := parseProm(string(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return m
}

// parseProm parses the Prometheus text exposition format (comments skipped).
func parseProm(text string) (promMetrics, error) {
	var m promMetrics
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		bad := func(why string) error { return fmt.Errorf("line %d %q: %s", i+1, line, why) }
		s := promSample{labels: map[string]string{}}
		j := strings.IndexAny(line, "{ ")
		if j <= 0 {
			return nil, bad("no value")
		}
		s.name = line[:j]
		rest := line[j:]
		if rest[0] == '{' {
			rest = rest[1:]
		labels:
			for {
				rest = strings.TrimLeft(rest, " ,")
				if strings.HasPrefix(rest, "}") {
					rest = rest[1:]
					break
				}
				eq := strings.Index(rest, `="`)
				if eq <= 0 {
					return nil, bad("malformed labels")
				}
				k := rest[:eq]
				rest = rest[eq+2:]
				var v strings.Builder
				for {
					if rest == "" {
						return nil, bad("unterminated label value")
					}
					c := rest[0]
					rest = rest[1:]
					switch {
					case c == '\\' && rest != "":
						if rest[0] == 'n' {
							v.WriteByte('\n')
						} else {
							v.WriteByte(rest[0])
						}
						rest = rest[1:]
					case c == '"':
						s.labels[k] = v.String()
						continue labels
					default:
						v.WriteByte(c)
					}
				}
			}
		}
		fs := strings.Fields(rest)
		if len(fs) == 0 {
			return nil, bad("no value")
		}
		v, err := strconv.ParseFloat(fs[0], 64)
		if err != nil {
			return nil, bad(err.Error())
		}
		s.value = v
		m = append(m, s)
	}
	return m, nil
}

// sum adds the samples called name whose labels include the pairs in match
// (label, value, label, value…); with every label given, that is one series.
// A series never observed counts 0.
func (m promMetrics) sum(name string, match ...string) float64 {
	total := 0.0
next:
	for _, s := range m {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(match); i += 2 {
			if s.labels[match[i]] != match[i+1] {
				continue next
			}
		}
		total += s.value
	}
	return total
}

func (m promMetrics) has(name string) bool {
	for _, s := range m {
		if s.name == name {
			return true
		}
	}
	return false
}

// series lists the samples called name, for messages.
func (m promMetrics) series(name string) string {
	var out []string
	for _, s := range m {
		if s.name == name {
			var ls []string
			for k, v := range s.labels {
				ls = append(ls, fmt.Sprintf("%s=%q", k, v))
			}
			sort.Strings(ls)
			out = append(out, fmt.Sprintf("%s{%s} %g", s.name, strings.Join(ls, ","), s.value))
		}
	}
	if len(out) == 0 {
		return name + ": no samples"
	}
	return strings.Join(out, "\n")
}

// delta is how much the sum moved between two scrapes.
func delta(before, after promMetrics, name string, match ...string) float64 {
	return after.sum(name, match...) - before.sum(name, match...)
}

// wantDelta checks that a counter moved by exactly want.
func wantDelta(t *testing.T, before, after promMetrics, want float64, name string, match ...string) {
	t.Helper()
	if got := delta(before, after, name, match...); got != want {
		t.Errorf("%s%v moved by %g, want %g; now:\n%s", name, match, got, want, after.series(name))
	}
}

// ---- the process ----

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
			now.mGoroutines <= base.mGoroutines && now.mOpenFDs <= base.mOpenFDs
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

// socks5Server is a minimal SOCKS5 proxy (RFC 1928: no authentication,
// CONNECT only) in the upstream namespace. It resolves every name to the
// server's IPv4 address, passes a FIN on as a FIN and a reset as a reset,
// and counts what it carried. kill makes it vanish as a crashed proxy
// would: its listener closes and every connection it holds is reset.
type socks5Server struct {
	url    string // as detour names it: socks5://198.18.3.2:PORT
	ln     *net.TCPListener
	ns     string // the upstream namespace: outbound dials start there
	served atomic.Int64
	active atomic.Int64

	mu      sync.Mutex
	conns   map[*net.TCPConn]struct{}
	targets []string
	killed  bool
	wg      sync.WaitGroup
}

func startSOCKS5(t *testing.T, tp *topo, port int) *socks5Server {
	t.Helper()
	s := &socks5Server{
		url:   fmt.Sprintf("socks5://%s", net.JoinHostPort(families[0].upstream, strconv.Itoa(port))),
		ln:    listenIn(t, tp.U, net.JoinHostPort(families[0].upstream, strconv.Itoa(port))),
		ns:    tp.U,
		conns: map[*net.TCPConn]struct{}{},
	}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(func() {
		s.kill()
		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("SOCKS5 server %s: connections still open 10s after it was killed", s.url)
		}
	})
	return s
}

func (s *socks5Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptTCP()
		if err != nil {
			return
		}
		if !s.track(c) {
			continue
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// track adds c to the connections kill resets, or resets c at once if the
// server was killed already.
func (s *socks5Server) track(c *net.TCPConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.killed {
		c.SetLinger(0)
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *socks5Server) untrack(c *net.TCPConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// kill closes the listener and resets every connection.
func (s *socks5Server) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killed = true
	s.ln.Close()
	for c := range s.conns {
		c.SetLinger(0)
		c.Close()
	}
}

func (s *socks5Server) requested() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.targets...)
}

func (s *socks5Server) handle(c *net.TCPConn) {
	defer s.wg.Done()
	defer s.untrack(c)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	target, err := socks5Handshake(c)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.targets = append(s.targets, target)
	s.mu.Unlock()
	host, port, _ := net.SplitHostPort(target)
	if net.ParseIP(host) == nil {
		host = families[0].server // every name is the server
	}
	up, err := nsDial(s.ns, net.JoinHostPort(host, port), 5*time.Second)
	if err != nil {
		c.Write([]byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0}) // connection refused
		return
	}
	defer up.Close()
	if !s.track(up) {
		return
	}
	defer s.untrack(up)
	if _, err := c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0}); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	s.served.Add(1)
	s.active.Add(1)
	defer s.active.Add(-1)
	var wg sync.WaitGroup
	pipe := func(dst, src *net.TCPConn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if err != nil {
			// A reset (or a kill) on one side: reset the other.
			dst.SetLinger(0)
			dst.Close()
			src.Close()
			return
		}
		dst.CloseWrite()
	}
	wg.Add(2)
	go pipe(up, c)
	go pipe(c, up)
	wg.Wait()
}

// socks5Handshake answers the greeting (no authentication) and reads a
// CONNECT request; it returns the target as host:port.
func socks5Handshake(c *net.TCPConn) (string, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != 5 {
		return "", fmt.Errorf("greeting: %v", err)
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil || bytes.IndexByte(methods, 0) < 0 {
		c.Write([]byte{5, 0xff})
		return "", errors.New("no acceptable method")
	}
	if _, err := c.Write([]byte{5, 0}); err != nil {
		return "", err
	}
	var req [4]byte
	if _, err := io.ReadFull(c, req[:]); err != nil || req[0] != 5 || req[1] != 1 {
		c.Write([]byte{5, 7, 0, 1, 0, 0, 0, 0, 0, 0})
		return "", fmt.Errorf("request %v: %v", req, err)
	}
	var host string
	switch req[3] {
	case 1, 4:
		ip := make([]byte, map[byte]int{1: 4, 4: 16}[req[3]])
		if _, err := io.ReadFull(c, ip); err != nil {
			return "", err
		}
		host = net.IP(ip).String()
	case 3:
		var n [1]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return "", err
		}
		name := make([]byte, n[0])
		if _, err := io.ReadFull(c, name); err != nil {
			return "", err
		}
		host = string(name)
	default:
		c.Write([]byte{5, 8, 0, 1, 0, 0, 0, 0, 0, 0})
		return "", fmt.Errorf("address type %d", req[3])
	}
	var port [2]byte
	if _, err := io.ReadFull(c, port[:]); err != nil {
		return "", err
	}
	return net.JoinHostPort(host, strconv.Itoa(int(binary.BigEndian.Uint16(port[:])))), nil
}

// ---- the tests ----

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

// TestOperateFaults: an upstream killed mid-transfer ends the client's
// connection at once and the next connections go to the other upstream; a
// server's reset reaches the client as a reset; a client that vanishes
// without a word is freed by the idle timeout.
func TestOperateFaults(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	bulkAddr := net.JoinHostPort(families[0].server, strconv.Itoa(bulkPort))

	t.Run("upstream killed mid-transfer", func(t *testing.T) {
		a, b := startSOCKS5(t, tp, socksPortA), startSOCKS5(t, tp, socksPortB)
		d := startOp(t, tp, "--upstream", a.url, "--upstream", b.url)

		// A download that would never end (1 TiB), read a little.
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		var req [9]byte
		req[0] = 'D'
		binary.BigEndian.PutUint64(req[1:], 1<<40)
		c.Write(req[:])
		if _, err := io.CopyN(io.Discard, c, 8<<20); err != nil {
			t.Fatalf("download through the upstream: %v", err)
		}
		var victim, survivor *socks5Server
		switch {
		case a.active.Load() == 1 && b.active.Load() == 0:
			victim, survivor = a, b
		case b.active.Load() == 1 && a.active.Load() == 0:
			victim, survivor = b, a
		default:
			t.Fatalf("upstreams carry %d and %d connections, want one on one of them", a.active.Load(), b.active.Load())
		}
		m := scrape(t, tp)
		if got := m.sum("detour_upstream_active", "upstream", victim.url); got != 1 {
			t.Errorf("detour_upstream_active of the upstream carrying the download = %g, want 1:\n%s", got, m.series("detour_upstream_active"))
		}
		if got := m.sum("detour_upstream_active", "upstream", survivor.url); got != 0 {
			t.Errorf("detour_upstream_active of the idle upstream = %g, want 0:\n%s", got, m.series("detour_upstream_active"))
		}
		victim.kill()
		killed := time.Now()
		c.SetReadDeadline(killed.Add(10 * time.Second))
		n, err := io.Copy(io.Discard, c)
		took := time.Since(killed)
		t.Logf("%s killed: the client's download ended %v later with %v (after %d more bytes)", victim.url, took.Round(time.Millisecond), err, n)
		if isTimeout(err) || took > 5*time.Second {
			t.Fatalf("the client's connection did not end within 5s of its upstream's death: %v after %v", err, took)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", key)
		if rec["upstream"] != victim.url || rec["error"] == "" {
			t.Errorf("access line of the cut download = %v; want upstream %s and an error", rec, victim.url)
		}

		// The next connections go to the survivor, and the client sees no
		// failure.
		before := survivor.served.Load()
		const next = 10
		for i := range next {
			if _, _, _, err := httpGet(tp, net.JoinHostPort(families[0].server, strconv.Itoa(httpPort)), "after-kill.test"); err != nil {
				t.Errorf("request %d after the kill: %v", i, err)
			}
		}
		if got := survivor.served.Load() - before; got != next {
			t.Errorf("the surviving upstream carried %d of the %d requests after the kill", got, next)
		}
		named := 0
		for _, target := range survivor.requested() {
			if target == net.JoinHostPort("after-kill.test", strconv.Itoa(httpPort)) {
				named++
			}
		}
		if named != next {
			t.Errorf("the surviving upstream was asked %d times for after-kill.test:%d, want %d (the sniffed name); it was asked for %v", named, httpPort, next, survivor.requested())
		}
		// detour logs a connection once both sides are done: wait for all.
		var recs []map[string]any
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			recs = d.find("conn", map[string]string{"host": "after-kill.test"})
			if len(recs) >= next || time.Now().After(deadline) {
				break
			}
		}
		for _, rec := range recs {
			checkAccessFields(t, rec, "upstream")
			if rec["upstream"] != survivor.url || rec["error"] != "" || rec["route"] != "upstream" {
				t.Errorf("access line after the kill = %v; want upstream %s, route upstream, no error", rec, survivor.url)
			}
		}
		if len(recs) != next {
			t.Errorf("%d access lines for after-kill.test, want %d", len(recs), next)
		}
		m = scrape(t, tp)
		if up := m.sum("detour_upstream_up", "upstream", victim.url); up != 0 || !m.has("detour_upstream_up") {
			t.Errorf("detour_upstream_up of the killed upstream = %g, want 0:\n%s", up, m.series("detour_upstream_up"))
		}
		if up := m.sum("detour_upstream_up", "upstream", survivor.url); up != 1 {
			t.Errorf("detour_upstream_up of the surviving upstream = %g, want 1:\n%s", up, m.series("detour_upstream_up"))
		}

		// A reset from the server, through the surviving upstream.
		r := opDial(t, tp, bulkAddr)
		r.Write([]byte("Rx"))
		if _, err := r.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server reset through an upstream: client read %v, want connection reset", err)
		}
	})

	t.Run("server resets, client vanishes", func(t *testing.T) {
		const idleTimeout = 2 * time.Second
		d := startOp(t, tp, "--idle-timeout", idleTimeout.String())

		r := opDial(t, tp, bulkAddr)
		rkey := connKey(r)
		r.Write([]byte("Rx"))
		start := time.Now()
		if _, err := r.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("server reset: client read %v after %v, want connection reset", err, time.Since(start))
		}
		rec := d.waitLog(t, 5*time.Second, "conn", rkey)
		if !strings.Contains(fmt.Sprint(rec["error"]), "reset") {
			t.Errorf("access line of the reset connection = %v; want an error naming the reset", rec)
		}
		base := measureIdle(t, d, tp)

		// A client that vanishes: its packets are dropped from now on, both
		// ways, so detour hears nothing (no FIN, no RST, no ACK).
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		c.Write([]byte("Eping"))
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatalf("echo: %v", err)
		}
		lastTraffic := time.Now() // detour's idle clock started a little before
		port := strconv.Itoa(c.LocalAddr().(*net.TCPAddr).Port)
		for _, rule := range [][]string{{"INPUT", "--dport", port}, {"OUTPUT", "--sport", port}} {
			if out, err := tp.exec(t, tp.C, "iptables", "-w", "-I", rule[0], "-p", "tcp", rule[1], rule[2], "-j", "DROP"); err != nil {
				t.Fatalf("dropping the client's packets: %v\n%s", err, out)
			}
		}
		if active, _, _ := d.stats(t); active != 1 {
			t.Fatalf("detour serves %d connections, want the vanished client's", active)
		}
		rec = d.waitLog(t, idleTimeout+5*time.Second, "conn", key)
		took := time.Since(lastTraffic)
		t.Logf("vanished client freed %v after its last traffic (idle timeout %v): %v", took.Round(time.Millisecond), idleTimeout, rec["error"])
		if rec["error"] != "idle timeout" {
			t.Errorf("access line of the vanished client = %v; want error \"idle timeout\"", rec)
		}
		if took < idleTimeout-100*time.Millisecond || took > idleTimeout+3*time.Second {
			t.Errorf("vanished client freed after %v, want about the idle timeout %v", took, idleTimeout)
		}
		now, _ := backToIdle(t, d, tp, base, 10*time.Second)
		t.Logf("after the vanished client: goroutines %d (idle %d), fds %d (idle %d)", now.goroutines, base.goroutines, now.fds, base.fds)
	})
}

// checkAccessFields checks that an access line has the documented fields.
func checkAccessFields(t *testing.T, rec map[string]any, extra ...string) {
	t.Helper()
	for _, f := range append([]string{"client", "dst", "route", "host", "proto", "sniff", "up", "down", "error"}, extra...) {
		if _, ok := rec[f]; !ok {
			t.Errorf("access line lacks %q: %v", f, rec)
		}
	}
}

// writeFileAtomic replaces path with text at once, as an operator's editor
// or config management would.
func writeFileAtomic(t *testing.T, path, text string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// reloadConfig: connections to the bulk port go through group a (v1) or b
// (v2); everything else goes direct.
func reloadConfig(group string, a, b *socks5Server) string {
	return fmt.Sprintf(`groups:
  - name: a
    upstreams: [%q]
  - name: b
    upstreams: [%q]
rules:
  - port: "%d"
    action: %s
default: direct
`, a.url, b.url, bulkPort, group)
}

// TestOperateReload: SIGHUP with a changed rule moves new connections to the
// new route while a 100 MB download started before it goes on, byte-exact,
// on the old one; a broken configuration changes nothing.
func TestOperateReload(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	a, b := startSOCKS5(t, tp, socksPortA), startSOCKS5(t, tp, socksPortB)
	cfg := filepath.Join(t.TempDir(), "detour.yaml")
	writeFileAtomic(t, cfg, reloadConfig("a", a, b))
	d := startOp(t, tp, "--config", cfg)
	bulkAddr := net.JoinHostPort(families[0].server, strconv.Itoa(bulkPort))
	web := net.JoinHostPort(families[0].server, strconv.Itoa(httpPort))
	m0 := scrape(t, tp)

	// echoVia makes one echo connection to the bulk port and returns its
	// access line.
	echoVia := func(t *testing.T) map[string]any {
		t.Helper()
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		c.Write([]byte("Ereload"))
		c.CloseWrite()
		if got, err := io.ReadAll(c); err != nil || string(got) != "reload" {
			t.Fatalf("echo: %q, %v", got, err)
		}
		c.Close()
		return d.waitLog(t, 5*time.Second, "conn", key)
	}
	wantRoute := func(t *testing.T, rec map[string]any, route string, up *socks5Server) {
		t.Helper()
		if rec["route"] != route || rec["upstream"] != up.url || rec["error"] != "" {
			t.Errorf("access line = %v; want route %s via %s, no error", rec, route, up.url)
		}
	}
	wantRoute(t, echoVia(t), "a", a)

	// The download starts on v1's route and stalls half-way (the client
	// stops reading) while the configuration changes.
	const n = 100 << 20
	dl := opDial(t, tp, bulkAddr)
	dkey := connKey(dl)
	var req [9]byte
	req[0] = 'D'
	binary.BigEndian.PutUint64(req[1:], n)
	dl.Write(req[:])
	h := sha256.New()
	if _, err := io.CopyN(h, dl, n/2); err != nil {
		t.Fatalf("first half of the download: %v", err)
	}
	if a.active.Load() != 1 {
		t.Fatalf("upstream a carries %d connections, want the download", a.active.Load())
	}

	writeFileAtomic(t, cfg, reloadConfig("b", a, b))
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog(t, 5*time.Second, "reloaded", nil)
	for range 3 {
		wantRoute(t, echoVia(t), "b", b)
	}
	// The rest of the traffic keeps its route.
	if _, _, key, err := httpGet(tp, web, "web.test"); err != nil {
		t.Errorf("web request after the reload: %v", err)
	} else if rec := d.waitLog(t, 5*time.Second, "conn", key); rec["route"] != "direct" {
		t.Errorf("web request after the reload: route %v, want direct", rec["route"])
	}

	// Broken configurations: refused, with a reason, and the routes stay.
	for i, broken := range []string{
		"rules: [\n",                  // not YAML
		reloadConfig("nowhere", a, b), // an action naming no group
		strings.Replace(reloadConfig("b", a, b), "socks5://", "gopher://", 1), // a bad upstream
	} {
		writeFileAtomic(t, cfg, broken)
		before := len(d.findPrefix("reload failed"))
		d.cmd.Process.Signal(syscall.SIGHUP)
		deadline := time.Now().Add(5 * time.Second)
		for len(d.findPrefix("reload failed")) <= before && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if len(d.findPrefix("reload failed")) <= before {
			t.Fatalf("broken config %d: no \"reload failed\" line within 5s; log:\n%s", i, d.rawLog())
		}
		rec := d.findPrefix("reload failed")[before]
		if rec["msg"] != "reload failed" {
			// The documented message (README: msg="reload failed"), which
			// operators' alerts match exactly.
			t.Errorf("broken config %d: logged msg %q, want exactly \"reload failed\"", i, rec["msg"])
		}
		if rec["error"] == nil || rec["error"] == "" {
			t.Errorf("broken config %d: reload failed without a reason: %v", i, rec)
		}
		d.alive(t)
		wantRoute(t, echoVia(t), "b", b)
	}
	if n := len(d.find("reloaded", nil)); n != 1 {
		t.Errorf("%d \"reloaded\" lines, want 1 (the broken configurations must not reload)", n)
	}

	// The download started before the reload finishes byte-exact on its
	// route.
	dl.SetReadDeadline(time.Now().Add(60 * time.Second))
	got, err := io.Copy(h, dl)
	if err != nil || got != n-n/2 || hex.EncodeToString(h.Sum(nil)) != streamSum(n) {
		t.Fatalf("download across the reloads: %d+%d bytes (%v), checksum match %v", n/2, got, err, hex.EncodeToString(h.Sum(nil)) == streamSum(n))
	}
	dl.Close()
	rec := d.waitLog(t, 5*time.Second, "conn", dkey)
	wantRoute(t, rec, "a", a)
	if toInt(rec["down"]) != n {
		t.Errorf("access line of the download: down %v, want %d", rec["down"], n)
	}
	if a.served.Load() != 2 || b.served.Load() != 6 {
		t.Errorf("upstream a carried %d connections (want 2: before the reload), b %d (want 6: after)", a.served.Load(), b.served.Load())
	}

	t.Logf("upstream a carried %d connections (before the reload), b %d (after); the download's %d MB arrived whole across 1 reload and 3 refused ones",
		a.served.Load(), b.served.Load(), n>>20)
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, 1, "detour_reloads_total", "result", "ok")
	wantDelta(t, m0, m1, 3, "detour_reloads_total", "result", "error")
	wantDelta(t, m0, m1, 2, "detour_connections_closed_total", "route", "a")
	wantDelta(t, m0, m1, 6, "detour_connections_closed_total", "route", "b")
	if m1.sum("detour_upstream_up", "group", "b", "upstream", b.url) != 1 {
		t.Errorf("no live upstream of group b in the metrics after the reload:\n%s", m1.series("detour_upstream_up"))
	}
}

// TestOperateBadInput: random bytes, a header of 1 MB without an end, half a
// ClientHello then silence. detour stays up, its memory stays bounded, and
// each connection is forwarded by IP or closed, and logged.
func TestOperateBadInput(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	// A sniff timeout well above any delay of this busy test's clients, so
	// that no client is taken for a silent one (whose destination detour
	// would then stop sniffing for a while).
	const sniffTimeout = 2 * time.Second
	d := startOp(t, tp, "--sniff-timeout", sniffTimeout.String())
	pid := d.cmd.Process.Pid
	m0 := scrape(t, tp)
	rss0 := procKB(t, pid, "VmRSS")

	hello, err := os.ReadFile("../sniff/testdata/flights/chromium-https.bin")
	if err != nil {
		t.Fatal(err)
	}
	server := func(port int) string { return net.JoinHostPort(families[0].server, strconv.Itoa(port)) }
	const (
		randoms   = 200
		huge      = 20
		halfHello = 300
	)
	type attempt struct {
		kind string
		key  map[string]string
		err  error
	}
	var (
		mu       sync.Mutex
		attempts []attempt
		wg       sync.WaitGroup
		sem      = make(chan struct{}, 300)
	)
	run := func(kind, addr string, fn func(c *net.TCPConn) error) {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			c, err := clientDial(tp, addr)
			a := attempt{kind: kind, err: err}
			if err == nil {
				a.key = connKey(c)
				c.SetDeadline(time.Now().Add(20 * time.Second))
				a.err = fn(c)
				c.Close()
			}
			mu.Lock()
			attempts = append(attempts, a)
			mu.Unlock()
		})
	}
	// drain reads until the other side ends the connection: any end will
	// do, but it must end.
	drain := func(c *net.TCPConn) error {
		_, err := io.Copy(io.Discard, c)
		if isTimeout(err) {
			return fmt.Errorf("connection not ended: %w", err)
		}
		return nil
	}
	// Peak memory, sampled while it runs.
	stop := make(chan struct{})
	peak := make(chan int, 1)
	go func() {
		top := 0
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
				for _, line := range strings.Split(string(b), "\n") {
					if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
						n, _ := strconv.Atoi(strings.Fields(v)[0])
						top = max(top, n)
					}
				}
			}
			select {
			case <-stop:
				peak <- top
				return
			case <-tick.C:
			}
		}
	}()

	start := time.Now()
	ports := []int{httpPort, httpsPort, sshPort}
	for i := range randoms {
		junk := make([]byte, 1+i*83%16384)
		rand.Read(junk)
		run("random", server(ports[i%len(ports)]), func(c *net.TCPConn) error {
			c.Write(junk)
			c.CloseWrite()
			return drain(c)
		})
	}
	// A request head of 1 MB that never ends: no Host before the cap, no
	// blank line.
	head := append([]byte("GET / HTTP/1.1\r\nX-Filler: "), bytes.Repeat([]byte("a"), 1<<20)...)
	for range huge {
		run("huge", server(httpPort), func(c *net.TCPConn) error {
			go func() {
				c.Write(head)
				c.CloseWrite()
			}()
			return drain(c)
		})
	}
	for range halfHello {
		run("half-hello", server(httpsPort), func(c *net.TCPConn) error {
			c.Write(hello[:100])
			time.Sleep(sniffTimeout + 500*time.Millisecond) // past the sniff timeout, in silence
			return nil
		})
	}
	wg.Wait()
	close(stop)
	top := <-peak
	took := time.Since(start)
	hwm := procKB(t, pid, "VmHWM")
	d.alive(t)
	t.Logf("%d connections of bad input in %v; detour VmRSS %d kB before, peak sampled %d kB, VmHWM %d kB",
		len(attempts), took.Round(time.Millisecond), rss0, top, hwm)
	if grew := max(top, hwm) - rss0; grew > 64<<10 {
		t.Errorf("detour's memory grew by %d kB under bad input, want under 64 MB", grew)
	}

	// Each one logged: forwarded by IP (route direct, no name) or closed
	// with an error.
	count := map[string]int{}
	sniffs := map[string]map[string]int{}
	for _, a := range attempts {
		if a.err != nil {
			t.Errorf("%s connection %v: %v", a.kind, a.key, a.err)
			continue
		}
		rec := d.waitLog(t, 10*time.Second, "conn", a.key)
		count[a.kind]++
		if sniffs[a.kind] == nil {
			sniffs[a.kind] = map[string]int{}
		}
		sniffs[a.kind][fmt.Sprint(rec["sniff"])]++
		checkAccessFields(t, rec)
		if rec["route"] != "direct" || rec["host"] != "" {
			t.Errorf("%s connection: access line %v; want it routed direct by IP", a.kind, rec)
		}
	}
	t.Logf("access lines by kind %v, sniff outcomes %v", count, sniffs)
	if count["random"] != randoms || count["huge"] != huge || count["half-hello"] != halfHello {
		t.Errorf("logged %v, want %d random, %d huge, %d half-hello", count, randoms, huge, halfHello)
	}
	if sniffs["huge"]["too-large"] != huge {
		t.Errorf("sniff outcomes of the 1 MB heads: %v, want too-large for all %d", sniffs["huge"], huge)
	}
	if sniffs["half-hello"]["timeout"] != halfHello {
		t.Errorf("sniff outcomes of the half ClientHellos: %v, want timeout for all %d", sniffs["half-hello"], halfHello)
	}

	// Still serving, and holding nothing.
	if _, _, _, err := httpGet(tp, server(httpPort), "after.test"); err != nil {
		t.Fatalf("a normal request after the bad input: %v", err)
	}
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Errorf("detour still serves %d connections after the bad input", n)
	}
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, randoms+huge+halfHello+1, "detour_connections_accepted_total")
	wantDelta(t, m0, m1, huge, "detour_sniff_total", "outcome", "too-large")
	if got := delta(m0, m1, "detour_bytes_total", "direction", "up"); got < huge<<20 {
		t.Errorf("detour_bytes_total{direction=up} moved by %g, want at least the %d MB of the huge heads", got, huge)
	}
}

// TestOperateMetrics: the counters match what the test did, one kind of
// connection at a time; --max-conns refuses the one too many.
func TestOperateMetrics(t *testing.T) {
	const maxConns = 20
	tp := newTopo(t)
	startServers(t, tp)
	cfg := filepath.Join(t.TempDir(), "detour.yaml")
	writeFileAtomic(t, cfg, "rules:\n  - port: \"6666\"\n    action: reject\ndefault: direct\n")
	d := startOp(t, tp, "--config", cfg, "--max-conns", strconv.Itoa(maxConns))
	server := func(port int) string { return net.JoinHostPort(families[0].server, strconv.Itoa(port)) }
	m0 := scrape(t, tp)
	for _, name := range []string{"detour_connections_accepted_total", "detour_connections_active", "go_goroutines", "process_open_fds"} {
		if !m0.has(name) {
			t.Errorf("no %s before any connection", name)
		}
	}

	var up, down int // bytes the clients sent and received on relayed connections

	// 1. HTTP requests, sniffed, direct.
	const gets = 10
	for range gets {
		sent, reply, key, err := httpGet(tp, server(httpPort), "metrics.test")
		if err != nil {
			t.Fatalf("request: %v", err)
		}
		up += sent
		down += len(reply)
		rec := d.waitLog(t, 5*time.Second, "conn", key)
		checkAccessFields(t, rec)
		want := map[string]string{"route": "direct", "host": "metrics.test", "proto": "http", "sniff": "found",
			"up": fmt.Sprint(sent), "down": fmt.Sprint(len(reply)), "error": "", "dst": server(httpPort)}
		for k, v := range want {
			if fmt.Sprint(rec[k]) != v {
				t.Errorf("access line %s = %v, want %s; line %v", k, rec[k], v, rec)
			}
		}
	}
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, gets, "detour_connections_accepted_total")
	wantDelta(t, m0, m1, gets, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m0, m1, gets, "detour_sniff_total", "proto", "http", "outcome", "found")
	wantDelta(t, m0, m1, gets, "detour_sniff_duration_seconds_count")
	wantDelta(t, m0, m1, gets, "detour_dial_duration_seconds_count", "route", "direct")
	wantDelta(t, m0, m1, float64(up), "detour_bytes_total", "direction", "up")
	wantDelta(t, m0, m1, float64(down), "detour_bytes_total", "direction", "down")
	if c, inf := m1.sum("detour_dial_duration_seconds_count", "route", "direct"), m1.sum("detour_dial_duration_seconds_bucket", "route", "direct", "le", "+Inf"); c != inf {
		t.Errorf("dial histogram: count %g, +Inf bucket %g", c, inf)
	}

	// 2. A rejected connection, a failed dial, a connection that was not
	// redirected.
	expectEnd := func(what, addr string, payload string) {
		t.Helper()
		c := opDial(t, tp, addr)
		if payload != "" {
			io.WriteString(c, payload)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || isTimeout(err) {
			t.Errorf("%s: read %d bytes, %v; want the connection ended", what, n, err)
		}
		c.Close()
	}
	expectEnd("rejected", server(6666), "GET / HTTP/1.1\r\nHost: rejected.test\r\n\r\n")
	expectEnd("closed port", server(1), "GET / HTTP/1.1\r\nHost: closed.test\r\n\r\n")
	expectEnd("not redirected", net.JoinHostPort(families[0].gateway, strconv.Itoa(listenPort)), "GET / HTTP/1.1\r\nHost: self.test\r\n\r\n")
	d.waitLog(t, 5*time.Second, "refused", nil)
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"route": "reject"})
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "closed.test"})
	m2 := scrape(t, tp)
	wantDelta(t, m1, m2, 3, "detour_connections_accepted_total")
	wantDelta(t, m1, m2, 1, "detour_connections_closed_total", "route", "reject")
	wantDelta(t, m1, m2, 1, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m1, m2, 1, "detour_dial_failures_total", "route", "direct")
	wantDelta(t, m1, m2, 1, "detour_connections_refused_total", "reason", "not_redirected")
	wantDelta(t, m1, m2, 0, "detour_bytes_total")

	// 3. --max-conns: the one too many is closed at once and counted.
	held, errs := dialMany(tp, server(bulkPort), maxConns, 4, 20*time.Second, holdIdle)
	t.Cleanup(func() { closeAll(held) })
	if len(errs) > 0 {
		t.Fatalf("holding %d connections: %v", maxConns, errs[0])
	}
	if a := scrape(t, tp).sum("detour_connections_active"); a != maxConns {
		t.Errorf("detour_connections_active = %g with %d held, want %d", a, maxConns, maxConns)
	}
	// The reset may come so soon that connect itself reports it.
	start := time.Now()
	if extra, err := clientDial(tp, server(bulkPort)); err == nil {
		extra.Write([]byte("Ihold"))
		extra.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := extra.Read(make([]byte, 1))
		extra.Close()
		if n != 0 || isTimeout(err) || time.Since(start) > 2*time.Second {
			t.Errorf("connection %d with --max-conns %d: read %d bytes, %v after %v; want it closed at once", maxConns+1, maxConns, n, err, time.Since(start))
		}
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("connection %d with --max-conns %d: dial %v; want a reset", maxConns+1, maxConns, err)
	}
	m3 := scrape(t, tp)
	wantDelta(t, m2, m3, 1, "detour_connections_refused_total", "reason", "limit")
	wantDelta(t, m2, m3, maxConns, "detour_connections_accepted_total")
	closeAll(held)
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Fatalf("detour still serves %d connections", n)
	}
	// Below the limit again: served.
	if _, _, _, err := httpGet(tp, server(httpPort), "again.test"); err != nil {
		t.Errorf("a request once the held connections closed: %v", err)
	}
	// The client has its response before detour has seen both ends close:
	// the counters are final once the connection has left.
	if n := waitActive(t, d, nil, 10*time.Second); n != 0 {
		t.Fatalf("detour still serves %d connections after the last request", n)
	}
	m4 := scrape(t, tp)
	wantDelta(t, m2, m4, maxConns+1, "detour_connections_closed_total", "route", "direct")
	wantDelta(t, m2, m4, 0, "detour_dial_failures_total")
	if m4.sum("detour_connections_active") != 0 {
		t.Errorf("detour_connections_active = %g with nothing open", m4.sum("detour_connections_active"))
	}
	for _, name := range []string{
		"detour_connections_accepted_total", "detour_connections_active", "detour_connections_closed_total",
		"detour_connections_refused_total", "detour_bytes_total", "detour_sniff_total", "detour_sniff_duration_seconds_bucket",
		"detour_dial_duration_seconds_bucket", "detour_dial_failures_total", "go_goroutines", "process_open_fds",
	} {
		if !m4.has(name) {
			t.Errorf("/metrics has no %s", name)
		}
	}
	t.Logf("metrics: accepted %g, closed %g, refused %g, bytes up %g down %g, goroutines %g, open fds %g",
		m4.sum("detour_connections_accepted_total"), m4.sum("detour_connections_closed_total"), m4.sum("detour_connections_refused_total"),
		m4.sum("detour_bytes_total", "direction", "up"), m4.sum("detour_bytes_total", "direction", "down"),
		m4.sum("go_goroutines"), m4.sum("process_open_fds"))
}

// TestOperateDoctor: `detour doctor` prints one line per check: in a ready
// gateway nothing fatal (exit 0), detour's rules reported once a detour runs;
// forwarding off is a warning; iptables missing makes auto choose nftables,
// and is fatal (exit 1) with --firewall iptables.
func TestOperateDoctor(t *testing.T) {
	tp := newTopo(t)
	doctor := func(ns string, env ...string) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		args := []string{"doctor"}
		if len(env) > 0 && strings.HasPrefix(env[len(env)-1], "--") {
			args, env = append(args, env[len(env)-1]), env[:len(env)-1]
		}
		argv := append([]string{"netns", "exec", ns, "env"}, env...)
		out, err := exec.CommandContext(ctx, "ip", append(append(argv, detourBin), args...)...).CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("detour doctor: %v", err)
		}
		t.Logf("detour doctor in %s %v: exit %d\n%s", ns, env, code, out)
		if strings.TrimSpace(string(out)) == "" {
			t.Errorf("detour doctor printed nothing")
		}
		return string(out), code
	}
	// line is the first line of out that mentions every one of subs.
	line := func(out string, subs ...string) string {
	next:
		for _, l := range strings.Split(out, "\n") {
			for _, s := range subs {
				if !strings.Contains(strings.ToLower(l), s) {
					continue next
				}
			}
			return l
		}
		return ""
	}

	// The gateway: forwarding on, iptables there, no rules yet.
	before, code := doctor(tp.G)
	if n := len(strings.Split(strings.TrimSpace(before), "\n")); n < 4 {
		t.Errorf("detour doctor printed %d lines, want one per check (iptables, kernel features, sysctls, rules)", n)
	}
	if code != 0 {
		t.Errorf("detour doctor exit %d in a ready gateway, want 0", code)
	}
	for _, want := range []string{"iptables", "forward", "rules"} {
		if line(before, want) == "" {
			t.Errorf("detour doctor has no line about %s", want)
		}
	}

	// The client namespace forwards nothing: a warning, not fatal.
	client, code := doctor(tp.C)
	if code != 0 || line(client, "ip_forward") == "" {
		t.Errorf("detour doctor where forwarding is off: exit %d, line about ip_forward %q; want exit 0 and a warning", code, line(client, "ip_forward"))
	}

	// No iptables to be found: --firewall auto takes nftables and says why.
	noIpt, code := doctor(tp.G, "PATH=/var/empty")
	if code != 0 || line(noIpt, "firewall: nftables", "no iptables command") == "" {
		t.Errorf("detour doctor without iptables: exit %d, %q; want exit 0 and nftables chosen", code, line(noIpt, "firewall"))
	}
	// Asked for iptables that is not there: fatal, and says what to install.
	missing, code := doctor(tp.G, "PATH=/var/empty", "--firewall=iptables")
	if code != 1 || line(missing, "iptables", "install") == "" {
		t.Errorf("detour doctor --firewall iptables without iptables: exit %d, %q; want exit 1 and a line saying to install iptables", code, line(missing, "iptables", "install"))
	}

	startOp(t, tp)
	after, code := doctor(tp.G)
	if code != 0 {
		t.Errorf("detour doctor exit %d with detour running, want 0", code)
	}
	rules := line(after, "rules")
	if rules == line(before, "rules") {
		t.Errorf("detour doctor's line about the rules is the same with and without them: %q", rules)
	}
	if l := strings.ToLower(rules); !strings.Contains(l, "installed") && !strings.Contains(l, "present") || strings.Contains(l, "not") {
		t.Errorf("with detour's rules installed, doctor says %q; want them reported present", rules)
	}
}
