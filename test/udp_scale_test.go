package test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
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

// sendEach sends one datagram from conn to every address, pacing itself
// so as not to outrun the gateway's receive buffer.
func sendEach(t *testing.T, conn *net.UDPConn, addrs []netip.AddrPort) {
	t.Helper()
	for i, a := range addrs {
		if _, err := conn.WriteToUDPAddrPort([]byte("x"), a); err != nil {
			t.Fatalf("sending to %s: %v", a, err)
		}
		if i%200 == 199 {
			time.Sleep(5 * time.Millisecond)
		}
	}
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
	_, _, idleFDs := d.udpStats(t)
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
	// Datagrams can be lost on the way (the gateway's receive buffer in a
	// burst): a round re-sends to every destination, which only refreshes
	// the sessions already there, in the same order.
	start := time.Now()
	for round := 0; round < 5; round++ {
		for _, f := range families {
			sendEach(t, conns[f.name], dsts(f, silentLo, perFamily))
		}
		if d.waitSessions(t, 2*time.Second, func(n int) bool { return n == cap }) == cap {
			break
		}
	}
	if n, _, _ := d.udpStats(t); n != cap {
		out, _ := tp.exec(t, tp.G, "grep", "-A1", "^Udp:", "/proc/net/snmp")
		t.Fatalf("%d UDP sessions held, want %d; gateway's UDP counters:\n%s", n, cap, out)
	}
	setup := time.Since(start)
	if out, err := tp.exec(t, tp.G, "grep", "-A1", "^Udp:", "/proc/net/snmp"); err == nil {
		t.Logf("gateway's UDP counters:\n%s", out)
	}
	_, _, heldFDs := d.udpStats(t)
	heldRSS := procKB(t, d.cmd.Process.Pid, "VmRSS")
	perFD := float64(heldFDs-idleFDs) / cap
	t.Logf("%d sessions set up in %v; descriptors %d → %d (%.3f per session), RSS %d → %d KiB (%.2f KiB per session)",
		cap, setup.Round(time.Millisecond), idleFDs, heldFDs, perFD, idleRSS, heldRSS, float64(heldRSS-idleRSS)/cap)
	if heldFDs-idleFDs < cap || heldFDs-idleFDs > cap+64 {
		t.Errorf("%d sessions hold %d descriptors, want one each", cap, heldFDs-idleFDs)
	}

	// A last round, slow enough that no datagram is dropped (checked by
	// the gateway's RcvbufErrors), puts the sessions in a known order: a
	// session whose datagram of a round was dropped would stay older than
	// the rest.
	for try := 0; ; try++ {
		before := rcvbufErrors(t, tp)
		for _, f := range families {
			sendPaced(t, conns[f.name], dsts(f, silentLo, perFamily))
		}
		if rcvbufErrors(t, tp) == before {
			break
		}
		if try == 3 {
			t.Fatal("the gateway drops datagrams even at a slow pace")
		}
	}

	// Past the cap: the oldest (the first IPv4 ports) go, one for each
	// new session.
	sendEach(t, conns["ipv4"], dsts(families[0], silentLo+perFamily, extra))
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
func TestUDPSpoofedFlood(t *testing.T) {
	const cap, flood = 2000, 30000
	tp := newTopo(t)
	silentPorts(t, tp)
	startDNS(t, tp)
	d := startChecked(t, tp, udpFlags("--max-udp-sessions", strconv.Itoa(cap))...)
	idleRSS := procKB(t, d.cmd.Process.Pid, "VmRSS")
	server := netip.MustParseAddrPort(net.JoinHostPort(families[0].server, strconv.Itoa(silentLo)))

	// Spoofing: a transparent socket in the client namespace may send
	// from any address of the client's network. While the flood runs, a
	// real client asks for a name (three tries, as a stub resolver would)
	// and the sessions and RSS are sampled.
	var err error
	maxSeen := 0
	rss := []int{}
	flooding := make(chan struct{})
	go func() {
		defer close(flooding)
		inNS(t, tp.C, func() {
			for i := range flood {
				src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(3 + rand.IntN(250))}), uint16(1024+rand.IntN(60000)))
				if err = sendSpoofed(src, server); err != nil {
					return
				}
				if i%1000 == 999 {
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}()
	digged := make(chan string, 1)
	go func() {
		time.Sleep(200 * time.Millisecond)
		out, derr := tp.exec(t, tp.C, "dig", "@"+families[0].server, "during-flood.site.test", "A", "+tries=3", "+time=2", "+short")
		digged <- fmt.Sprintf("%s%v", strings.TrimSpace(out), errString(derr))
	}()
	for done := false; !done; {
		select {
		case <-flooding:
			done = true
		case <-time.After(200 * time.Millisecond):
		}
		n, _, _ := d.udpStats(t)
		maxSeen = max(maxSeen, n)
		rss = append(rss, procKB(t, d.cmd.Process.Pid, "VmRSS"))
	}
	if err != nil {
		t.Fatalf("spoofing: %v", err)
	}
	if got := <-digged; got != families[0].server {
		t.Errorf("dig during the flood = %q, want %s", got, families[0].server)
	}
	m := scrape(t, tp)
	started := m.sum("detour_udp_sessions_total")
	t.Logf("flood of %d: %g sessions started, %g evicted, at most %d at once; RSS idle %d KiB, during %v KiB",
		flood, started, m.sum("detour_udp_sessions_closed_total", "end", "evicted"), maxSeen, idleRSS, rss)
	if maxSeen > cap {
		t.Errorf("%d sessions at once, above the cap %d", maxSeen, cap)
	}
	// Some of the flood is dropped by the gateway's receive buffer (that
	// is the point of a flood); what came through must still be many
	// times the cap.
	if started < 4*cap {
		t.Errorf("only %g of %d spoofed sessions reached detour: the flood did not happen", started, flood)
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

// sendPaced is sendEach at a tenth of the pace.
func sendPaced(t *testing.T, conn *net.UDPConn, addrs []netip.AddrPort) {
	t.Helper()
	for i := 0; i < len(addrs); i += 100 {
		sendEach(t, conn, addrs[i:min(i+100, len(addrs))])
		time.Sleep(10 * time.Millisecond)
	}
}

// rcvbufErrors is the gateway's count of UDP datagrams dropped for a full
// receive buffer.
func rcvbufErrors(t *testing.T, tp *topo) int {
	t.Helper()
	out, err := tp.exec(t, tp.G, "cat", "/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, n := range names {
			if n == "RcvbufErrors" && i < len(f) {
				v, _ := strconv.Atoi(f[i])
				return v
			}
		}
	}
	t.Fatalf("no Udp RcvbufErrors in the gateway's /proc/net/snmp:\n%s", out)
	return 0
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return " (" + err.Error() + ")"
}
