package test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Ports on the server where UDP goes into a silent drop (no ICMP), so
// sessions stay open until their idle timeout.
const silentLo, silentHi = 20000, 39999

// silentPorts makes the server namespace drop UDP to silentLo-silentHi
// without answering (a closed port would answer with ICMP unreachable,
// which ends a direct session at once).
func silentPorts(t *testing.T, tp *topo) {
	t.Helper()
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if out, err := tp.exec(t, tp.S, ipt, "-w", "-A", "INPUT", "-p", "udp", "--dport", fmt.Sprintf("%d:%d", silentLo, silentHi), "-j", "DROP"); err != nil {
			t.Fatalf("%s in the server namespace: %v\n%s", ipt, err, out)
		}
	}
}

// udpStats is SIGUSR1's stats line with the UDP session count.
func (d *detourProc) udpStats(t *testing.T) (sessions, goroutines, fds int) {
	t.Helper()
	_, g, fds := d.stats(t)
	recs := d.find("stats", nil)
	return toInt(recs[len(recs)-1]["udp_sessions"]), g, fds
}

// waitSessions polls the UDP session count until ok accepts it (at most
// within) and returns it.
func (d *detourProc) waitSessions(t *testing.T, within time.Duration, ok func(int) bool) int {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		n, _, _ := d.udpStats(t)
		if ok(n) || time.Now().After(deadline) {
			return n
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// udpBurst is how many datagrams a pacer lets go before it waits.
const udpBurst = 250

// pacer sends datagrams at detour's pace: after each burst it waits until
// the gateway's sockets have read (or dropped for a full receive buffer) as
// many as were sent. Faster, a loaded machine's detour falls behind, and
// the kernel drops the rest at its listener's receive buffer.
type pacer struct {
	t          *testing.T
	tp         *topo
	base, sent int // read+dropped in the gateway when the pacer started; datagrams sent since
	baseDrops  int
}

func newPacer(t *testing.T, tp *topo) *pacer {
	read, dropped := gatewayUDP(t, tp)
	return &pacer{t: t, tp: tp, base: read + dropped, baseDrops: dropped}
}

// add counts n more datagrams sent, and waits for them at the end of each
// burst.
func (p *pacer) add(n int) {
	if p.sent/udpBurst != (p.sent+n)/udpBurst {
		p.sent += n
		p.wait()
		return
	}
	p.sent += n
}

// wait waits until the gateway has read or dropped every datagram sent
// (at most 5 s: one lost on the way is not waited for), and returns how
// many it dropped for a full buffer since the pacer started.
func (p *pacer) wait() (dropped int) {
	p.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		read, dr := gatewayUDP(p.t, p.tp)
		if read+dr-p.base >= p.sent || time.Now().After(deadline) {
			return dr - p.baseDrops
		}
		time.Sleep(time.Millisecond)
	}
}

// sendPaced sends one datagram from conn to every address, at detour's
// pace, and returns how many the gateway dropped for a full buffer.
func sendPaced(t *testing.T, tp *topo, conn *net.UDPConn, addrs []netip.AddrPort) (dropped int) {
	t.Helper()
	p := newPacer(t, tp)
	for _, a := range addrs {
		if _, err := conn.WriteToUDPAddrPort([]byte("x"), a); err != nil {
			t.Fatalf("sending to %s: %v", a, err)
		}
		p.add(1)
	}
	return p.wait()
}

// TestUDPScale: 10,000 UDP sessions (5,000 IPv4 and 5,000 IPv6) held at
// once, one descriptor each; past --max-udp-sessions the sessions idle
// longest are evicted; once idle they end and detour's descriptors and
// goroutines are back to where they were.
func TestUDPScale(t *testing.T) {
	const perFamily, cap, extra = 5000, 10000, 100
	raiseNoFile(t, 2*cap)
	tp := newTopo(t)
	silentPorts(t, tp)
	d := startChecked(t, tp, udpFlags("--max-udp-sessions", strconv.Itoa(cap), "--udp-idle-timeout", "10s")...)
	base := measureIdle(t, d, tp)
	// detour's descriptors, the fewest of a few readings of /proc/PID/fd
	// over 200 ms: what it holds for good, without those only passing
	// through (the rules check that a SIGUSR1 for a stats line also
	// starts, a metrics connection still closing).
	openFDs := func() int {
		least := -1
		for i := range 5 {
			if i > 0 {
				time.Sleep(50 * time.Millisecond)
			}
			ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid))
			if err != nil {
				t.Fatalf("detour's descriptors: %v", err)
			}
			if least < 0 || len(ents) < least {
				least = len(ents)
			}
		}
		return least
	}
	idleFDs := openFDs()
	idleRSS := procKB(t, d.cmd.Process.Pid, "VmRSS")

	conns := map[string]*net.UDPConn{}
	for _, f := range families {
		var c net.PacketConn
		var err error
		inNS(t, tp.C, func() { c, err = net.ListenPacket("udp", net.JoinHostPort(f.client, "0")) })
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[f.name] = c.(*net.UDPConn)
	}
	dsts := func(f family, lo, n int) []netip.AddrPort {
		out := make([]netip.AddrPort, n)
		for i := range out {
			out[i] = netip.AddrPortFrom(netip.MustParseAddr(f.server), uint16(lo+i))
		}
		return out
	}
	// Neighbour discovery first: datagrams sent while the gateway's
	// address is being resolved are dropped but for a few.
	for _, f := range families {
		tp.exec(t, tp.C, "ping", "-c", "1", "-W", "2", f.server)
	}
	// A round sends to every destination in the same order (a session
	// there already is only refreshed). Datagrams may still be lost on the
	// way; a round in which the gateway dropped none for a full buffer
	// leaves every session there, and in a known order: the first IPv4
	// ports idle longest (a session whose datagram was dropped would stay
	// older than the rest).
	start := time.Now()
	var setup time.Duration
	for round := 0; ; round++ {
		again := 0
		for _, f := range families {
			again += sendPaced(t, tp, conns[f.name], dsts(f, silentLo, perFamily))
		}
		n := d.waitSessions(t, 2*time.Second, func(n int) bool { return n == cap })
		if setup == 0 && n == cap {
			setup = time.Since(start)
		}
		if n == cap && again == 0 {
			break
		}
		t.Logf("round %d: %d sessions, %d datagrams dropped by the gateway", round, n, again)
		if round == 4 {
			out, _ := tp.exec(t, tp.G, "grep", "-A1", "^Udp:", "/proc/net/snmp")
			t.Fatalf("%d UDP sessions held, want %d, %d datagrams dropped in the last round; gateway's UDP counters:\n%s", n, cap, again, out)
		}
	}
	heldFDs := openFDs()
	heldRSS := procKB(t, d.cmd.Process.Pid, "VmRSS")
	perFD := float64(heldFDs-idleFDs) / cap
	t.Logf("%d sessions set up in %v; descriptors %d → %d (%.3f per session), RSS %d → %d KiB (%.2f KiB per session)",
		cap, setup.Round(time.Millisecond), idleFDs, heldFDs, perFD, idleRSS, heldRSS, float64(heldRSS-idleRSS)/cap)
	if heldFDs-idleFDs < cap || heldFDs-idleFDs > cap+64 {
		t.Errorf("%d sessions hold %d descriptors, want one each", cap, heldFDs-idleFDs)
	}

	// Past the cap: the oldest (the first IPv4 ports) go, one for each
	// new session.
	sendPaced(t, tp, conns["ipv4"], dsts(families[0], silentLo+perFamily, extra))
	evicted := map[string]bool{}
	waitFor(t, 10*time.Second, fmt.Sprintf("%d sessions evicted", extra), func() bool {
		for _, r := range d.find("udp", map[string]string{"end": "evicted"}) {
			evicted[fmt.Sprint(r["dst"])] = true
		}
		return len(evicted) >= extra
	})
	for _, a := range dsts(families[0], silentLo, extra) {
		if !evicted[a.String()] {
			var some []string
			for k := range evicted {
				if some = append(some, k); len(some) == 5 {
					break
				}
			}
			t.Errorf("session to %s (among the %d oldest) was not evicted; evicted %d, among them %v", a, extra, len(evicted), some)
			break
		}
	}
	if len(evicted) != extra {
		t.Errorf("%d sessions evicted, want %d", len(evicted), extra)
	}
	if n, _, _ := d.udpStats(t); n != cap {
		t.Errorf("%d sessions after %d more past the cap, want %d", n, extra, cap)
	}

	// Idle: all end, and detour holds what it held before.
	if n := d.waitSessions(t, 30*time.Second, func(n int) bool { return n == 0 }); n != 0 {
		t.Fatalf("%d UDP sessions left after their idle timeout", n)
	}
	backToIdle(t, d, tp, base, 10*time.Second)
	m := scrape(t, tp)
	if got := m.sum("detour_udp_sessions_closed_total", "end", "evicted"); got != extra {
		t.Errorf("detour_udp_sessions_closed_total{end=evicted} = %g, want %d", got, extra)
	}
}

// TestUDPSpoofedFlood: one-datagram sessions from 30,000 spoofed client
// addresses stay within --max-udp-sessions, and detour's memory does not
// grow with the flood; a real client's DNS query during the flood is
// answered.
//
// The flood goes as fast as detour reads it: a burst, then the next once
// detour has read it (see pacer). Faster, the kernel drops the rest
// at the gateway's receive buffer (a slow machine keeps only a few
// thousand), and the test would measure the buffer, not detour.
func TestUDPSpoofedFlood(t *testing.T) {
	const cap, flood, burst = 2000, 30000, udpBurst
	tp := newTopo(t)
	silentPorts(t, tp)
	startDNS(t, tp)
	d := startChecked(t, tp, udpFlags("--max-udp-sessions", strconv.Itoa(cap))...)
	idleRSS := procKB(t, d.cmd.Process.Pid, "VmRSS")
	server := netip.MustParseAddrPort(net.JoinHostPort(families[0].server, strconv.Itoa(silentLo)))
	m0 := scrape(t, tp)

	// While the flood runs, a real client asks for a name (three tries, as
	// a stub resolver would).
	digged := make(chan string, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		out, derr := tp.exec(t, tp.C, "dig", "@"+families[0].server, "during-flood.site.test", "A", "+tries=3", "+time=2", "+short")
		digged <- fmt.Sprintf("%s%v", strings.TrimSpace(out), errString(derr))
	}()
	// Spoofing: a transparent socket in the client namespace may send from
	// any address of the client's network; each datagram from a source
	// address and port of its own (250 addresses), so each is a new
	// session. The sessions and RSS are sampled as it goes.
	maxSeen, rss := 0, []int{}
	sample := func() {
		n, _, _ := d.udpStats(t)
		maxSeen = max(maxSeen, n)
		rss = append(rss, procKB(t, d.cmd.Process.Pid, "VmRSS"))
	}
	start := time.Now()
	p := newPacer(t, tp)
	for sent := 0; sent < flood; sent += burst {
		var err error
		inNS(t, tp.C, func() {
			for i := sent; i < min(sent+burst, flood) && err == nil; i++ {
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(3 + i%250)}), uint16(1024+i/250))
				err = sendSpoofed(src, server)
			}
		})
		if err != nil {
			t.Fatalf("spoofing: %v", err)
		}
		p.add(min(burst, flood-sent))
		if sent/burst%8 == 0 {
			sample()
		}
	}
	drops := p.wait()
	took := time.Since(start)
	sample()
	if got := <-digged; got != families[0].server {
		t.Errorf("dig during the flood = %q, want %s", got, families[0].server)
	}
	m := scrape(t, tp)
	started := delta(m0, m, "detour_udp_sessions_total")
	t.Logf("flood of %d in %v (%.0f/s): %g sessions started, %g evicted, %d dropped by the kernel, at most %d at once; RSS idle %d KiB, during %v KiB",
		flood, took.Round(time.Millisecond), flood/took.Seconds(), started, m.sum("detour_udp_sessions_closed_total", "end", "evicted"), drops, maxSeen, idleRSS, rss)
	if maxSeen > cap {
		t.Errorf("%d sessions at once, above the cap %d", maxSeen, cap)
	}
	// Every spoofed datagram is a session of its own: each started one in
	// detour, unless the kernel dropped it; and at detour's pace nearly
	// all get through.
	if started+float64(drops) < flood || started < 0.9*flood {
		t.Errorf("%g of %d spoofed sessions started in detour (%d datagrams dropped by the kernel), want all", started, flood, drops)
	}
	// Bounded: the cap's worth of sessions, not the flood's.
	if grow := rss[len(rss)-1] - idleRSS; grow > 48<<10 {
		t.Errorf("RSS grew by %d KiB during a flood capped at %d sessions", grow, cap)
	}
}

// sendSpoofed sends one datagram to dst from src, an address that is not
// the sender's, through a transparent socket (called inside the client
// namespace).
func sendSpoofed(src, dst netip.AddrPort) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); err != nil {
		return err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(src.Port()), Addr: src.Addr().As4()}); err != nil {
		if err == syscall.EADDRINUSE {
			return nil
		}
		return err
	}
	return unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()})
}

// gatewayUDP reads the gateway's UDP counters, IPv4 and IPv6 together:
// datagrams read from a socket there (InDatagrams: the kernel counts them
// when the reader takes them, here detour's listener) and dropped for a
// full receive buffer (RcvbufErrors).
func gatewayUDP(t *testing.T, tp *topo) (read, dropped int) {
	t.Helper()
	var snmp, snmp6 []byte
	var err error
	inNS(t, tp.G, func() {
		if snmp, err = os.ReadFile("/proc/thread-self/net/snmp"); err == nil {
			snmp6, err = os.ReadFile("/proc/thread-self/net/snmp6")
		}
	})
	if err != nil {
		t.Fatalf("the gateway's UDP counters: %v", err)
	}
	found := 0
	count := func(name, v string) {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("the gateway's UDP counter %s = %q", name, v)
		}
		switch name {
		case "InDatagrams", "Udp6InDatagrams":
			read += n
		case "RcvbufErrors", "Udp6RcvbufErrors":
			dropped += n
		default:
			return
		}
		found++
	}
	var names []string
	for _, line := range strings.Split(string(snmp), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(names) && i < len(f); i++ {
			count(names[i], f[i])
		}
	}
	for _, line := range strings.Split(string(snmp6), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			count(f[0], f[1])
		}
	}
	if found != 4 {
		t.Fatalf("no UDP InDatagrams and RcvbufErrors in the gateway's /proc/net/snmp and snmp6:\n%s\n%s", snmp, snmp6)
	}
	return read, dropped
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}
