package test

// End-to-end tests of upstream proxies: real squid (HTTP CONNECT, with and
// without Basic auth), dante (SOCKS5 without auth) and microsocks (SOCKS5
// with user and password) run in the upstream namespace; detour in the
// gateway sends the client's connections through them.
//
// Each proxy leaves the upstream namespace from an address of its own, so
// the server's greeting ("you are ADDR") names the proxy that carried a
// connection: that is the server's own count, checked against the proxies'
// logs and detour's access lines.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Ports of the proxies in the upstream namespace (198.18.3.2, fd00:3::2),
// each listening on both families.
const (
	squidPort     = 3128 // HTTP CONNECT, no auth
	squidAuthPort = 3129 // HTTP CONNECT, Basic auth checked by basic_ncsa_auth
	dantePort     = 1080 // SOCKS5, no auth
	microPort     = 1081 // SOCKS5, user and password
	deadPort      = 1999 // nothing listens here (until a test starts something)

	proxyUser = "user"
	proxyPass = "s3cret"
	wrongPass = "wr0ngpass"
)

// Who carried a connection, by the source address the server saw.
const (
	bySquid  = "squid"
	byDante  = "dante"
	byMicro  = "microsocks"
	byDirect = "direct"
)

// carriers maps each source address the server can see to the proxy that
// has it as its outbound address: squid (tcp_outgoing_address) .10,
// dante (external) .11, microsocks the namespace's primary address; a
// direct connection comes from the gateway.
var carriers = map[string]string{
	"198.18.3.10": bySquid, "fd00:3::10": bySquid,
	"198.18.3.11": byDante, "fd00:3::11": byDante,
	"198.18.3.2": byMicro, "fd00:3::2": byMicro,
	"198.18.2.1": byDirect, "fd00:2::1": byDirect,
}

// captureClients are the rule flags of these tests: only connections
// arriving from the client side (gc) are captured. The proxies' own
// connections to the server cross the gateway too and must go straight on.
var captureClients = []string{"--listen", fmt.Sprintf(":%d", listenPort), "--install-rules", "--bypass", "none", "--interface", "gc"}

// proxyURL is the --upstream URL of a proxy in the upstream namespace.
func proxyURL(scheme, userinfo string, f family, port int) string {
	if userinfo != "" {
		userinfo += "@"
	}
	return scheme + "://" + userinfo + net.JoinHostPort(f.upstream, strconv.Itoa(port))
}

// proxyProc is one proxy server process started in the upstream namespace.
type proxyProc struct {
	name string
	cmd  *exec.Cmd
	log  string // the file its log goes to
	done chan struct{}
}

// logText is what the proxy logged so far.
func (p *proxyProc) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// lines counts the lines of p's log that hold every one of subs.
func (p *proxyProc) lines(subs ...string) int {
	n := 0
next:
	for _, l := range strings.Split(p.logText(), "\n") {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		n++
	}
	return n
}

// kill sends SIGKILL to the proxy (no goodbye to anyone) and waits until
// it is gone, listener included.
func (p *proxyProc) kill(t *testing.T) {
	t.Helper()
	p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s still running 5s after SIGKILL", p.name)
	}
}

// startProc runs argv in the upstream namespace in a process group of its
// own, output to out. Cleanup sends SIGTERM (so it reaps its own children)
// and, after 3s, SIGKILL to the whole group.
func startProc(t *testing.T, tp *topo, name, log, out string, argv ...string) *proxyProc {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// `ip netns exec` execs argv itself: the PID is the proxy's.
	cmd := exec.Command("ip", append([]string{"netns", "exec", tp.U}, argv...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &proxyProc{name: name, cmd: cmd, log: log, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(3 * time.Second):
		}
		select {
		case <-p.done:
		default:
			// Still there (and not reaped, so its group is its own):
			// SIGKILL the whole group, children included.
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				t.Errorf("%s (pid %d) did not exit after SIGKILL", name, cmd.Process.Pid)
			}
		}
		if t.Failed() {
			text := p.logText()
			if out != log {
				b, _ := os.ReadFile(out)
				text = string(b) + text
			}
			t.Logf("%s output (last lines):\n%s", name, lastLines(text, 30))
		}
	})
	return p
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// startDante starts danted in the upstream namespace as name: SOCKS5
// without authentication on port, for commands (its "command:" line),
// sending from the external addresses (.11) startProxies adds, logging what
// socksLog says (its "log:" line; debug level logs each request as
// received) into dir/NAME.log. Its files are NAME.* in dir.
func startDante(t *testing.T, tp *topo, name, dir string, port int, commands, socksLog string) *proxyProc {
	t.Helper()
	file := func(ext string) string { return filepath.Join(dir, name+ext) }
	conf := strings.NewReplacer("LOG", file(".log"), "PORT", strconv.Itoa(port),
		"COMMANDS", commands, "SOCKSLOG", socksLog).Replace(`# detour end-to-end test: SOCKS5 without authentication.
logoutput: LOG
debug: 1
internal: 0.0.0.0 port = PORT
internal: :: port = PORT
external: 198.18.3.11
external: fd00:3::11
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
	from: 0/0 to: 0/0
	log: error
}
socks pass {
	from: 0/0 to: 0/0
	command: COMMANDS
	log: SOCKSLOG
}
`)
	if err := os.WriteFile(file(".conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return startProc(t, tp, name, file(".log"), file(".stderr"), "danted", "-f", file(".conf"), "-p", file(".pid"))
}

// waitListening polls `ss -Hltn` in the upstream namespace until every
// port has an IPv4 and an IPv6 listener (one dual-stack socket, *:PORT,
// counts for both).
func waitListening(t *testing.T, tp *topo, p *proxyProc, ports ...int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, _ := tp.exec(t, tp.U, "ss", "-Hltn")
		ok := true
		for _, port := range ports {
			v4, v6 := false, false
			for _, line := range strings.Split(out, "\n") {
				fs := strings.Fields(line)
				if len(fs) < 4 {
					continue
				}
				switch fs[3] {
				case fmt.Sprintf("*:%d", port):
					v4, v6 = true, true
				case fmt.Sprintf("0.0.0.0:%d", port):
					v4 = true
				case fmt.Sprintf("[::]:%d", port):
					v6 = true
				}
			}
			ok = ok && v4 && v6
		}
		if ok {
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited (%v) before listening on %v", p.name, p.cmd.ProcessState, ports)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening on %v (IPv4 and IPv6) within 15s; ss:\n%s", p.name, ports, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// proxies are the upstream proxies of one topology.
type proxies struct {
	squid, dante, micro *proxyProc
}

// byName is the proxy that a carrier name stands for.
func (ps *proxies) byName(name string) *proxyProc {
	return map[string]*proxyProc{bySquid: ps.squid, byDante: ps.dante, byMicro: ps.micro}[name]
}

// requests counts the requests for host:port each proxy logged: squid's
// access.log has one line per tunnel (written when it closes), dante's
// debug log one "request received" line with the name as sent (ATYP 3 is
// a domain name), microsocks one "connected to" line.
func (ps *proxies) requests(host string, port int) map[string]int {
	return map[string]int{
		bySquid: ps.squid.lines("TCP_TUNNEL/200", fmt.Sprintf(" CONNECT %s:%d ", host, port)),
		byDante: ps.dante.lines("dorequest(): command 1 request received", fmt.Sprintf("ATYP: 3 address: %s.%d ", host, port)),
		byMicro: ps.micro.lines(fmt.Sprintf("connected to %s:%d", host, port)),
	}
}

// startProxies writes the upstream namespace's /etc/hosts (name → IP;
// `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts), gives it
// the proxies' outbound addresses, and starts squid (3128 without auth,
// 3129 with Basic auth), danted (1080) and microsocks (1081, user and
// password), each logging into a temporary directory. Everything is
// stopped and removed in cleanup.
func startProxies(t *testing.T, tp *topo, hosts map[string]string) *proxies {
	t.Helper()
	for _, tool := range []string{"squid", "danted", "microsocks", "htpasswd", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("the upstream tests need %s: run scripts/install-deps.sh (squid, dante-server, microsocks, apache2-utils, iproute2)", tool)
		}
	}
	const ncsa = "/usr/lib/squid/basic_ncsa_auth"
	if _, err := os.Stat(ncsa); err != nil {
		t.Fatalf("squid's auth helper: %v", err)
	}

	// /etc/hosts of the upstream namespace.
	writeHosts(t, tp.U, hosts)

	// Outbound addresses. The extra IPv6 ones are deprecated (preferred
	// lifetime 0): the kernel never picks them as a source by itself, so
	// microsocks leaves from fd00:3::2, while a bind to them still works.
	for _, c := range [][]string{
		{"ip", "addr", "add", "198.18.3.10/24", "dev", "u0"},
		{"ip", "addr", "add", "198.18.3.11/24", "dev", "u0"},
		{"ip", "-6", "addr", "add", "fd00:3::10/64", "dev", "u0", "nodad", "preferred_lft", "0"},
		{"ip", "-6", "addr", "add", "fd00:3::11/64", "dev", "u0", "nodad", "preferred_lft", "0"},
	} {
		if out, err := tp.exec(t, tp.U, c...); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}

	dir := t.TempDir()
	// squid drops to its own user: it must reach its directory.
	if err := os.Chmod(filepath.Dir(dir), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ps := &proxies{}

	// squid: CONNECT on 3128 for anyone, on 3129 for user:s3cret only.
	sq := filepath.Join(dir, "squid")
	if err := os.Mkdir(sq, 0o755); err != nil {
		t.Fatal(err)
	}
	passwd := filepath.Join(sq, "passwd")
	if out, err := exec.Command("htpasswd", "-bc", passwd, proxyUser, proxyPass).CombinedOutput(); err != nil {
		t.Fatalf("htpasswd: %v\n%s", err, out)
	}
	conf := strings.NewReplacer("DIR", sq, "NCSA", ncsa).Replace(`# detour end-to-end test: an HTTP CONNECT proxy, nothing cached.
http_port 3128
http_port 3129 name=auth
visible_hostname detour-test-upstream
cache_effective_user proxy
pid_filename DIR/squid.pid
access_log stdio:DIR/access.log
cache_log DIR/cache.log
cache_store_log none
netdb_filename none
coredump_dir DIR
cache deny all
pinger_enable off
shutdown_lifetime 0 seconds
# Names come from the namespace's /etc/hosts; no DNS server is asked.
hosts_file /etc/hosts
dns_nameservers 127.0.0.1
auth_param basic program NCSA DIR/passwd
auth_param basic children 2
auth_param basic realm detour-test
acl authport myportname auth
acl authed proxy_auth REQUIRED
http_access allow authport authed
http_access deny authport
http_access allow all
tcp_outgoing_address 198.18.3.10
tcp_outgoing_address fd00:3::10
`)
	if err := os.WriteFile(filepath.Join(sq, "squid.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	pu, err := user.Lookup("proxy")
	if err != nil {
		t.Fatalf("squid's user: %v", err)
	}
	uid, _ := strconv.Atoi(pu.Uid)
	gid, _ := strconv.Atoi(pu.Gid)
	for _, p := range []string{sq, passwd, filepath.Join(sq, "squid.conf")} {
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	// -n: a service name of our own, so squid's shared-memory segments
	// (/dev/shm/NAME-*) do not meet another squid's.
	service := tp.id
	t.Cleanup(func() {
		left, _ := filepath.Glob(filepath.Join("/dev/shm", service+"-*"))
		for _, f := range left {
			os.Remove(f)
		}
	})
	ps.squid = startProc(t, tp, bySquid, filepath.Join(sq, "access.log"), filepath.Join(sq, "stderr"),
		"squid", "-N", "-n", service, "-f", filepath.Join(sq, "squid.conf"))

	// danted: SOCKS5 without auth. Its connect lines name only the
	// resolved IP; debug level logs each request as received.
	ps.dante = startDante(t, tp, byDante, dir, dantePort, "connect", "connect error")

	// microsocks: SOCKS5 with user and password; it logs each CONNECT.
	mlog := filepath.Join(dir, "microsocks.log")
	ps.micro = startProc(t, tp, byMicro, mlog, mlog,
		"microsocks", "-i", "::", "-p", strconv.Itoa(microPort), "-u", proxyUser, "-P", proxyPass)

	waitListening(t, tp, ps.squid, squidPort, squidAuthPort)
	waitListening(t, tp, ps.dante, dantePort)
	waitListening(t, tp, ps.micro, microPort)
	// Until the kernel has finished duplicate address detection of the
	// links' IPv6 link-local addresses, neighbour discovery goes
	// unanswered and a first IPv6 connection waits for a SYN resend (1s).
	waitFor(t, 10*time.Second, "IPv6 link-local addresses out of their tentative state", func() bool {
		for _, ns := range []string{tp.C, tp.G, tp.S, tp.U} {
			if out, err := tp.exec(t, ns, "ip", "-6", "addr", "show", "tentative"); err != nil || strings.TrimSpace(out) != "" {
				return false
			}
		}
		return true
	})
	return ps
}

// startDetourUp starts detour with the rule flags of these tests and ARGS,
// checked at the end (see startChecked).
func startDetourUp(t *testing.T, tp *topo, args ...string) *detourProc {
	t.Helper()
	return startChecked(t, tp, append(slices.Clone(captureClients), args...)...)
}

// fetch sends one HTTP/1.1 request for host to addr from the client
// namespace, as a Go client would, and returns who carried it (by the
// address the server saw).
func fetch(t *testing.T, tp *topo, addr, host string) (string, error) {
	c, err := dialIn(t, tp.C, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host); err != nil {
		return "", err
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		return "", err
	}
	return carrierOf(string(reply))
}

// carrierOf reads the server's greeting in reply.
func carrierOf(reply string) (string, error) {
	_, rest, ok := strings.Cut(reply, "hello from the server namespace; you are ")
	if !ok {
		return "", fmt.Errorf("no greeting from the server in %q", reply)
	}
	addr, _, _ := strings.Cut(rest, "\n")
	if who, ok := carriers[addr]; ok {
		return who, nil
	}
	return "", fmt.Errorf("the server saw %s, which is no proxy's address", addr)
}

// curlVia fetches scheme://host/ with curl in the client namespace, host
// resolved (--resolve) to the server's address of family f, and returns
// who carried it.
func curlVia(t *testing.T, tp *topo, f family, scheme, host string) (string, error) {
	t.Helper()
	port := httpPort
	if scheme == "https" {
		port = httpsPort
	}
	ip := f.server
	if strings.Contains(ip, ":") {
		ip = "[" + ip + "]"
	}
	url := fmt.Sprintf("%s://%s/", scheme, host)
	out, err := tp.exec(t, tp.C, "curl", "-sS", "-k", "-m", "10", "--resolve", fmt.Sprintf("%s:%d:%s", host, port, ip), url)
	if err != nil {
		return "", fmt.Errorf("curl %s: %v: %s", url, err, out)
	}
	return carrierOf(out)
}

// waitCount polls count until it reaches want, for at most within, and
// returns its last value.
func waitCount(within time.Duration, want int, count func() int) int {
	deadline := time.Now().Add(within)
	for {
		n := count()
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// failsCleanly checks that a connection from the client to addr asking for
// host is ended by detour at once, with a reset or EOF and no reply.
func failsCleanly(t *testing.T, tp *topo, addr, host string) {
	t.Helper()
	c, err := dialIn(t, tp.C, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	start := time.Now()
	c.SetDeadline(start.Add(10 * time.Second))
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
	reply, err := io.ReadAll(c)
	took := time.Since(start)
	if len(reply) > 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("connection for %s: read %q, %v; want a reset or EOF and nothing else", host, reply, err)
	}
	if took > 2*time.Second {
		t.Fatalf("connection for %s ended after %v; want at once", host, took)
	}
}

// TestUpstreamBasic: for each proxy kind, over IPv4 and IPv6, curl's https
// and http requests reach the server through that proxy, and the proxy's
// own log shows the name detour sniffed, not the IP.
func TestUpstreamBasic(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	kinds := []struct {
		name, carrier string
		url           func(family) string
		logName       func(family) string // the upstream as detour's access line names it
	}{
		{"squid", bySquid,
			func(f family) string { return proxyURL("http", "", f, squidPort) },
			func(f family) string { return proxyURL("http", "", f, squidPort) }},
		{"squid-auth", bySquid,
			func(f family) string { return proxyURL("http", proxyUser+":"+proxyPass, f, squidAuthPort) },
			func(f family) string { return proxyURL("http", proxyUser, f, squidAuthPort) }},
		{"dante", byDante,
			func(f family) string { return proxyURL("socks5", "", f, dantePort) },
			func(f family) string { return proxyURL("socks5", "", f, dantePort) }},
		{"microsocks", byMicro,
			func(f family) string { return proxyURL("socks5", proxyUser+":"+proxyPass, f, microPort) },
			func(f family) string { return proxyURL("socks5", proxyUser, f, microPort) }},
	}
	// Each case has its own name, resolved by the proxies to the server's
	// address of the case's family.
	hosts := map[string]string{}
	for _, f := range families {
		for _, k := range kinds {
			hosts[k.name+"."+f.name+".test"] = f.server
		}
	}
	ps := startProxies(t, tp, hosts)

	for _, f := range families {
		for _, k := range kinds {
			t.Run(f.name+"/"+k.name, func(t *testing.T) {
				d := startDetourUp(t, tp, "--upstream", k.url(f))
				host := k.name + "." + f.name + ".test"
				p := ps.byName(k.carrier)
				for _, tc := range []struct {
					scheme, proto string
					port          int
				}{{"https", "tls", httpsPort}, {"http", "http", httpPort}} {
					who, err := curlVia(t, tp, f, tc.scheme, host)
					if err != nil || who != k.carrier {
						t.Fatalf("%s://%s/: carried by %q (%v); want %s", tc.scheme, host, who, err, k.carrier)
					}
					rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": host, "proto": tc.proto})
					want := map[string]string{
						"dst": net.JoinHostPort(f.server, strconv.Itoa(tc.port)), "route": "upstream",
						"upstream": k.logName(f), "target": net.JoinHostPort(host, strconv.Itoa(tc.port)), "error": "",
					}
					for field, v := range want {
						if fmt.Sprint(rec[field]) != v {
							t.Errorf("access line %s = %v, want %q; line: %v", field, rec[field], v, rec)
						}
					}
					// squid logs a tunnel when it closes: wait for it.
					got := waitCount(5*time.Second, 1, func() int { return ps.requests(host, tc.port)[k.carrier] })
					if got != 1 {
						t.Errorf("%s logged %d requests for %s:%d, want 1; log:\n%s", p.name, got, host, tc.port, lastLines(p.logText(), 20))
					}
				}
				// The name, never the IP: nothing in the proxy's log asks
				// for the server's address.
				for _, ip := range [][]string{
					{" CONNECT " + net.JoinHostPort(f.server, "")},
					{"dorequest(): command 1 request received", "ATYP: 1 "},
					{"dorequest(): command 1 request received", "ATYP: 4 "},
					{"connected to " + f.server + ":"},
				} {
					if n := p.lines(ip...); n > 0 {
						t.Errorf("%s's log has %d lines with %q: it was asked for an IP", p.name, n, ip)
					}
				}
				if k.name == "squid-auth" && ps.squid.lines(" CONNECT "+host+":443 "+proxyUser+" HIER_DIRECT") != 1 {
					t.Errorf("squid's access.log does not show %s:443 for user %s:\n%s", host, proxyUser, lastLines(ps.squid.logText(), 10))
				}
			})
		}
	}
}

// runMany makes n connections asking for host, workers at a time, each a
// short HTTP request from the client namespace, and returns who carried
// each (empty for a failure) and the failures.
func runMany(t *testing.T, tp *topo, n, workers int, addr, host string) ([]string, []error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	who := make([]string, n)
	errs := make([]error, n)
	next := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range next {
				who[i], errs[i] = fetch(t, tp, addr, host)
			}
		})
	}
feed:
	for i := range n {
		select {
		case next <- i:
		case <-ctx.Done():
			for j := i; j < n; j++ {
				errs[j] = fmt.Errorf("connection %d not made: %w", j, ctx.Err())
			}
			break feed
		}
	}
	close(next)
	wg.Wait()
	var failed []error
	for i, err := range errs {
		if err != nil {
			failed = append(failed, fmt.Errorf("connection %d: %w", i, err))
		}
	}
	return who, failed
}

func tally(who []string) map[string]int {
	m := map[string]int{}
	for _, w := range who {
		m[w]++
	}
	return m
}

// accessTally counts detour's access lines for host by upstream.
func accessTally(d *detourProc, host string) map[string]int {
	m := map[string]int{}
	for _, rec := range d.find("conn", map[string]string{"host": host}) {
		m[fmt.Sprint(rec["upstream"])]++
	}
	return m
}

// TestUpstreamWeighted: 600 connections over squid, dante and microsocks
// with weights 3:2:1 split 300:200:100 within ±5%, counted three ways: by
// the server (source addresses), by the proxies' own logs, and by detour's
// access lines.
func TestUpstreamWeighted(t *testing.T) {
	const host, n = "weighted.test", 600
	f := families[0]
	tp := newTopo(t)
	startServers(t, tp)
	ps := startProxies(t, tp, map[string]string{host: f.server})
	squid := proxyURL("http", "", f, squidPort)
	dante := proxyURL("socks5", "", f, dantePort)
	micro := proxyURL("socks5", proxyUser+":"+proxyPass, f, microPort)
	d := startDetourUp(t, tp, "--strategy", "weighted",
		"--upstream", squid+"?weight=3", "--upstream", dante+"?weight=2", "--upstream", micro+"?weight=1")

	start := time.Now()
	who, failed := runMany(t, tp, n, 20, net.JoinHostPort(f.server, "80"), host)
	t.Logf("%d connections, 20 at a time, in %v", n, time.Since(start).Round(time.Millisecond))
	for _, err := range failed[:min(len(failed), 10)] {
		t.Error(err)
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d connections failed", len(failed), n)
	}

	byServer := tally(who)
	var byLog map[string]int
	waitCount(10*time.Second, n, func() int {
		byLog = ps.requests(host, 80)
		return byLog[bySquid] + byLog[byDante] + byLog[byMicro]
	})
	waitCount(10*time.Second, n, func() int { return len(d.find("conn", map[string]string{"host": host})) })
	byDetour := accessTally(d, host)
	t.Logf("split seen by the server: squid %d, dante %d, microsocks %d", byServer[bySquid], byServer[byDante], byServer[byMicro])
	t.Logf("split in the proxies' logs: squid %d, dante %d, microsocks %d", byLog[bySquid], byLog[byDante], byLog[byMicro])
	t.Logf("split in detour's access lines: %v", byDetour)

	for _, c := range []struct {
		carrier, upstream string
		weight            int
	}{{bySquid, squid, 3}, {byDante, dante, 2}, {byMicro, proxyURL("socks5", proxyUser, f, microPort), 1}} {
		want := n * c.weight / 6
		for what, got := range map[string]int{"server": byServer[c.carrier], "log": byLog[c.carrier], "access lines": byDetour[c.upstream]} {
			if diff := got - want; diff*20 > want || -diff*20 > want {
				t.Errorf("%s: %s carried %d of %d connections by the %s, want %d ±5%%", c.carrier, c.upstream, got, n, what, want)
			}
		}
		if byServer[c.carrier] != byLog[c.carrier] || byLog[c.carrier] != byDetour[c.upstream] {
			t.Errorf("%s: the server counted %d connections, the proxy's log %d, detour's access lines %d: they must agree",
				c.carrier, byServer[c.carrier], byLog[c.carrier], byDetour[c.upstream])
		}
	}
}

// TestUpstreamConsistentHash: with consistent hashing on the host name, 20
// names × 5 connections each: every name always lands on the same proxy.
func TestUpstreamConsistentHash(t *testing.T) {
	const names, rounds = 20, 5
	f := families[0]
	tp := newTopo(t)
	startServers(t, tp)
	hosts := map[string]string{}
	for i := range names {
		hosts[fmt.Sprintf("name%d.test", i)] = f.server
	}
	ps := startProxies(t, tp, hosts)
	d := startDetourUp(t, tp, "--strategy", "consistent-hash",
		"--upstream", proxyURL("http", "", f, squidPort),
		"--upstream", proxyURL("socks5", "", f, dantePort),
		"--upstream", proxyURL("socks5", proxyUser+":"+proxyPass, f, microPort))

	// One connection at a time, each finished in detour (its access line
	// written; the upstream is released right after, in the same
	// goroutine) before the next: the strategy's load bound, which counts
	// active connections, then never passes a name on to its second
	// choice.
	seen := map[string]map[string]int{} // name → carrier → connections
	deadline := time.Now().Add(time.Minute)
	for r := range rounds {
		for i := range names {
			if time.Now().After(deadline) {
				t.Fatalf("round %d of %d not done within a minute", r, rounds)
			}
			host := fmt.Sprintf("name%d.test", i)
			who, err := fetch(t, tp, net.JoinHostPort(f.server, "80"), host)
			if err != nil {
				t.Fatalf("round %d, %s: %v", r, host, err)
			}
			if seen[host] == nil {
				seen[host] = map[string]int{}
			}
			seen[host][who]++
			want := r*names + i + 1
			if got := waitCount(5*time.Second, want, func() int { return len(d.find("conn", nil)) }); got < want {
				t.Fatalf("%d access lines after %d connections", got, want)
			}
		}
	}

	perCarrier := map[string]int{}
	for i := range names {
		host := fmt.Sprintf("name%d.test", i)
		if len(seen[host]) != 1 {
			t.Errorf("%s was carried by %v; want one proxy for all %d connections", host, seen[host], rounds)
			continue
		}
		var who string
		for w := range seen[host] {
			who = w
		}
		perCarrier[who]++
		ups := accessTally(d, host)
		if len(ups) != 1 {
			t.Errorf("detour's access lines for %s name upstreams %v; want one", host, ups)
		}
		// The proxies' logs agree: all of the name's requests at one.
		var logs map[string]int
		waitCount(5*time.Second, rounds, func() int { // squid logs at close
			logs = ps.requests(host, 80)
			return logs[bySquid] + logs[byDante] + logs[byMicro]
		})
		if logs[who] != rounds || logs[bySquid]+logs[byDante]+logs[byMicro] != rounds {
			t.Errorf("proxies logged %v for %s; want all %d at %s", logs, host, rounds, who)
		}
	}
	t.Logf("names per proxy: %v", perCarrier)
	if len(perCarrier) < 2 {
		t.Errorf("all %d names hashed to one proxy (%v): the ring is not spreading them", names, perCarrier)
	}
}

// TestUpstreamFailover: 500 connections, one at a time, round-robin over
// the three proxies; after the 250th, microsocks is killed (SIGKILL). Not
// one connection fails: detour notices the refused dial, marks it down and
// takes the next proxy.
//
// The kill falls between two connections: one spliced through the proxy
// when it dies is lost whatever detour does (its bytes are gone), so what
// failover can promise is that no new connection sees the dead proxy.
func TestUpstreamFailover(t *testing.T) {
	const host, n, killAt = "failover.test", 500, 250
	f := families[0]
	tp := newTopo(t)
	startServers(t, tp)
	ps := startProxies(t, tp, map[string]string{host: f.server})
	micro := proxyURL("socks5", proxyUser+":"+proxyPass, f, microPort)
	d := startDetourUp(t, tp, "--strategy", "round-robin",
		"--upstream", proxyURL("http", "", f, squidPort),
		"--upstream", proxyURL("socks5", "", f, dantePort),
		"--upstream", micro)

	addr := net.JoinHostPort(f.server, "80")
	who := make([]string, n)
	start := time.Now()
	for i := range n {
		if time.Since(start) > time.Minute {
			t.Fatalf("only %d of %d connections within a minute", i, n)
		}
		if i == killAt {
			ps.micro.kill(t)
		}
		var err error
		if who[i], err = fetch(t, tp, addr, host); err != nil {
			t.Fatalf("connection %d (microsocks killed before %d): %v", i, killAt, err)
		}
	}
	before, after := tally(who[:killAt]), tally(who[killAt:])
	t.Logf("%d connections in %v; before the kill %v, after %v", n, time.Since(start).Round(time.Millisecond), before, after)
	for _, c := range []string{bySquid, byDante, byMicro} {
		if before[c] < killAt/4 {
			t.Errorf("before the kill %s carried %d of %d connections; round-robin gives each about a third", c, before[c], killAt)
		}
	}
	// Round-robin passes a down upstream's turn to the next one (squid
	// gets microsocks' turns): both share the rest, not necessarily evenly.
	if after[byMicro] != 0 || after[bySquid] < (n-killAt)/4 || after[byDante] < (n-killAt)/4 {
		t.Errorf("after the kill: %v; want microsocks none, squid and dante the rest", after)
	}
	if got := ps.micro.lines("connected to " + host + ":80"); got != before[byMicro] {
		t.Errorf("microsocks logged %d connections, the server saw %d from it", got, before[byMicro])
	}
	d.waitLog(t, 5*time.Second, "upstream down", map[string]string{"upstream": proxyURL("socks5", proxyUser, f, microPort)})
	waitCount(5*time.Second, n, func() int { return len(d.find("conn", map[string]string{"host": host})) })
	if bad := len(d.find("conn", map[string]string{"host": host})) - len(d.find("conn", map[string]string{"host": host, "error": ""})); bad != 0 {
		t.Errorf("%d access lines with an error; want none", bad)
	}
}

// TestUpstreamRouting: a config file's rules, first match wins: a port
// rejected, domain suffixes to two groups (squid over IPv4, dante over
// IPv6), the server's networks direct, anything else rejected.
func TestUpstreamRouting(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	v4, v6 := families[0], families[1]
	ps := startProxies(t, tp, map[string]string{
		"a.viasquid.test": v4.server, "c.viasquid.test": v4.server,
		"b.viasocks.test": v6.server,
	})
	config := fmt.Sprintf(`# rules in order; the first that matches wins
groups:
  - name: viasquid
    upstreams: [%q]
  - name: viasocks
    upstreams:
      - url: %q
rules:
  - port: "%d"
    action: reject
  - domain_suffix: [viasquid.test]
    action: viasquid
  - domain_suffix: viasocks.test
    action: viasocks
  - cidr: [198.18.2.0/24, "fd00:2::/64"]
    action: direct
default: reject
`, proxyURL("http", "", v4, squidPort), proxyURL("socks5", "", v6, dantePort), bulkPort)
	path := filepath.Join(t.TempDir(), "detour.yaml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDetourUp(t, tp, "--config", path)

	t.Run("domain suffix to squid", func(t *testing.T) {
		who, err := fetch(t, tp, net.JoinHostPort(v4.server, "80"), "a.viasquid.test")
		if err != nil || who != bySquid {
			t.Fatalf("a.viasquid.test carried by %q (%v), want squid", who, err)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "a.viasquid.test"})
		if rec["route"] != "viasquid" || rec["upstream"] != proxyURL("http", "", v4, squidPort) || rec["target"] != "a.viasquid.test:80" {
			t.Errorf("access line = %v; want route viasquid through squid to a.viasquid.test:80", rec)
		}
		if waitCount(5*time.Second, 1, func() int { return ps.requests("a.viasquid.test", 80)[bySquid] }) != 1 {
			t.Errorf("squid did not log a.viasquid.test:80")
		}
	})

	t.Run("domain suffix to dante over IPv6", func(t *testing.T) {
		who, err := curlVia(t, tp, v6, "https", "b.viasocks.test")
		if err != nil || who != byDante {
			t.Fatalf("b.viasocks.test carried by %q (%v), want dante", who, err)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "b.viasocks.test"})
		if rec["route"] != "viasocks" || rec["upstream"] != proxyURL("socks5", "", v6, dantePort) || rec["proto"] != "tls" {
			t.Errorf("access line = %v; want route viasocks through dante", rec)
		}
		if ps.requests("b.viasocks.test", 443)[byDante] != 1 {
			t.Errorf("dante did not log b.viasocks.test:443")
		}
	})

	t.Run("cidr direct", func(t *testing.T) {
		for _, f := range families {
			host := "plain-" + f.name + ".test"
			who, err := fetch(t, tp, net.JoinHostPort(f.server, "80"), host)
			if err != nil || who != byDirect {
				t.Fatalf("%s to %s carried by %q (%v), want direct", host, f.server, who, err)
			}
			rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": host})
			if rec["route"] != "direct" || rec["upstream"] != nil {
				t.Errorf("access line = %v; want route direct and no upstream", rec)
			}
			for who, n := range ps.requests(host, 80) {
				if n > 0 {
					t.Errorf("%s logged a direct connection for %s", who, host)
				}
			}
		}
	})

	t.Run("port rejected before the domain rule", func(t *testing.T) {
		for _, f := range families {
			dst := net.JoinHostPort(f.server, strconv.Itoa(bulkPort))
			failsCleanly(t, tp, dst, "c.viasquid.test")
			rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "c.viasquid.test", "dst": dst})
			if rec["route"] != "reject" || rec["error"] != "rejected by route" {
				t.Errorf("access line = %v; want route reject", rec)
			}
		}
		if n := ps.squid.lines("c.viasquid.test"); n > 0 {
			t.Errorf("squid logged %d lines for a rejected connection; nothing may be dialled", n)
		}
	})

	t.Run("default reject", func(t *testing.T) {
		// Not in the rules' networks (the upstream namespace, where
		// nothing listens on 80 anyway): the default takes it.
		dst := net.JoinHostPort(v4.upstream, "80")
		failsCleanly(t, tp, dst, "elsewhere.test")
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": "elsewhere.test"})
		if rec["route"] != "reject" {
			t.Errorf("access line = %v; want route reject", rec)
		}
	})
}

// TestUpstreamBadInput: upstreams that cannot be reached or refuse the
// credentials make clean failures with clear errors, never a crash or a
// hang, and detour goes on serving; bad URLs and config files exit 2.
func TestUpstreamBadInput(t *testing.T) {
	f := families[0]
	tp := newTopo(t)
	startServers(t, tp)
	ps := startProxies(t, tp, map[string]string{
		"dead.test": f.server, "halfdead.test": f.server, "badsocks.test": f.server, "badsquid.test": f.server, "back.test": f.server,
	})
	addr := net.JoinHostPort(f.server, "80")

	t.Run("only upstream unreachable", func(t *testing.T) {
		dead := proxyURL("socks5", "", f, deadPort)
		d := startDetourUp(t, tp, "--upstream", dead)
		for range 3 {
			failsCleanly(t, tp, addr, "dead.test")
		}
		waitCount(5*time.Second, 3, func() int { return len(d.find("conn", map[string]string{"host": "dead.test"})) })
		for _, rec := range d.find("conn", map[string]string{"host": "dead.test"}) {
			if e := fmt.Sprint(rec["error"]); !strings.Contains(e, net.JoinHostPort(f.upstream, strconv.Itoa(deadPort))) || !strings.Contains(e, "connection refused") {
				t.Errorf("access line error = %q; want it to name the upstream and say the connection was refused", e)
			}
		}
		d.waitLog(t, 5*time.Second, "upstream down", map[string]string{"upstream": dead})
		// Something comes to listen there: detour, still serving, uses it.
		log := filepath.Join(t.TempDir(), "microsocks.log")
		back := startProc(t, tp, "microsocks on the dead port", log, log, "microsocks", "-i", "::", "-p", strconv.Itoa(deadPort))
		waitListening(t, tp, back, deadPort)
		if who, err := fetch(t, tp, addr, "back.test"); err != nil || who != byMicro {
			t.Fatalf("after the upstream came back: carried by %q (%v), want the new microsocks", who, err)
		}
		d.waitLog(t, 5*time.Second, "upstream up", map[string]string{"upstream": dead})
	})

	t.Run("bad upstreams in a config", func(t *testing.T) {
		config := fmt.Sprintf(`groups:
  - name: halfdead
    upstreams: [%q, %q]
  - name: badsocks
    upstreams: [%q]
  - name: badsquid
    upstreams: [%q]
rules:
  - domain: halfdead.test
    action: halfdead
  - domain: badsocks.test
    action: badsocks
  - domain: badsquid.test
    action: badsquid
default: direct
`, proxyURL("http", "", f, deadPort), proxyURL("http", "", f, squidPort),
			proxyURL("socks5", proxyUser+":"+wrongPass, f, microPort),
			proxyURL("http", proxyUser+":"+wrongPass, f, squidAuthPort))
		path := filepath.Join(t.TempDir(), "detour.yaml")
		if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
			t.Fatal(err)
		}
		d := startDetourUp(t, tp, "--config", path)

		// A group with a dead upstream and a good one: no client sees
		// the dead one.
		who, failed := runMany(t, tp, 20, 4, addr, "halfdead.test")
		if len(failed) > 0 {
			t.Fatalf("%d of 20 connections through the half-dead group failed: %v", len(failed), failed)
		}
		if c := tally(who); c[bySquid] != 20 {
			t.Errorf("half-dead group: carried by %v, want squid for all", c)
		}
		d.waitLog(t, 5*time.Second, "upstream down", map[string]string{"upstream": proxyURL("http", "", f, deadPort)})

		// Wrong passwords: the client is reset, the access line says why.
		for _, tc := range []struct{ host, want string }{
			{"badsocks.test", "username/password rejected"},
			{"badsquid.test", "407 Proxy Authentication Required"},
		} {
			failsCleanly(t, tp, addr, tc.host)
			rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": tc.host})
			if e := fmt.Sprint(rec["error"]); !strings.Contains(e, tc.want) {
				t.Errorf("access line error for %s = %q; want it to say %q", tc.host, e, tc.want)
			}
		}
		// squid logs the denial once the connection is closed.
		if n := waitCount(5*time.Second, 1, func() int { return ps.squid.lines("TCP_DENIED/407", "CONNECT badsquid.test:80") }); n != 1 {
			t.Errorf("squid logged %d denials for badsquid.test, want 1", n)
		}

		// Still serving, direct and through the group.
		if who, err := fetch(t, tp, addr, "plain.test"); err != nil || who != byDirect {
			t.Fatalf("direct after the failures: %q, %v", who, err)
		}
		if who, err := fetch(t, tp, addr, "halfdead.test"); err != nil || who != bySquid {
			t.Fatalf("half-dead group after the failures: %q, %v", who, err)
		}
		if strings.Contains(d.rawLog(), wrongPass) {
			t.Errorf("detour's log shows a password")
		}
	})

	t.Run("malformed URL and config exit 2", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "bad.yaml")
		if err := os.WriteFile(bad, []byte("groups:\n  - name: g\n    upstreams: [\"socks5://198.18.3.2:99999\"]\ndefault: g\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"--upstream", "socks5://" + proxyUser + ":" + wrongPass + "@198.18.3.2"}, "--upstream"},
			{[]string{"--upstream", "gopher://198.18.3.2:70"}, "--upstream"},
			{[]string{"--config", bad}, "groups[0].upstreams[0] (line 3)"},
		} {
			out, status := tp.detourCmd(t, nil, append([]string{"run"}, tc.args...)...)
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if status != 2 || len(lines) != 1 || !strings.Contains(out, tc.want) {
				t.Errorf("detour run %q: status %d, output %q; want 2 and one line naming %s", tc.args, status, out, tc.want)
			}
			if strings.Contains(out, wrongPass) {
				t.Errorf("detour run %q shows the password: %q", tc.args, out)
			}
		}
	})
}
