package test

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// UDP end to end: TPROXY hands UDP datagrams to detour, which carries each
// (client, destination) session direct or through a SOCKS5 UDP association
// and sends the replies back from the original destination's address.

const dnsPort = 53

// udpFlags are detour's flags in the UDP tests: TPROXY (UDP is on by
// default there), its own rules capturing only what arrives from the
// client side, metrics, short timeouts so that sessions end (and write
// their access lines) quickly.
func udpFlags(extra ...string) []string {
	return append([]string{"--mode", "tproxy", "--listen", fmt.Sprintf(":%d", listenPort), "--install-rules", "--bypass", "none",
		"--interface", "gc", "--metrics", metricsAddr, "--grace", "2s",
		"--udp-dns-timeout", "500ms", "--udp-quic-timeout", "2s", "--udp-idle-timeout", "2s"}, extra...)
}

// dnsServer is a tiny authoritative DNS server in the server namespace: it
// answers every A query with the server's IPv4 address and every AAAA
// query with its IPv6 address, and remembers who asked for what.
type dnsServer struct {
	mu   sync.Mutex
	seen []dnsAsked
}

type dnsAsked struct {
	name string
	from netip.Addr
}

func startDNS(t *testing.T, tp *topo) *dnsServer { return startDNSOn(t, tp, dnsPort) }

// startDNSOn is startDNS on another port.
func startDNSOn(t *testing.T, tp *topo, port int) *dnsServer {
	t.Helper()
	var pc net.PacketConn
	var err error
	inNS(t, tp.S, func() { pc, err = net.ListenPacket("udp", fmt.Sprintf("[::]:%d", port)) })
	if err != nil {
		t.Fatalf("DNS server in %s: %v", tp.S, err)
	}
	t.Cleanup(func() { pc.Close() })
	s := &dnsServer{}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			name, reply := dnsAnswer(buf[:n])
			if reply == nil {
				continue
			}
			ap := from.(*net.UDPAddr).AddrPort()
			s.mu.Lock()
			s.seen = append(s.seen, dnsAsked{name, ap.Addr().Unmap()})
			s.mu.Unlock()
			pc.WriteTo(reply, from)
		}
	}()
	return s
}

// askedBy returns the addresses that asked for name.
func (s *dnsServer) askedBy(name string) []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []netip.Addr
	for _, a := range s.seen {
		if a.name == name {
			out = append(out, a.from)
		}
	}
	return out
}

// dnsAnswer parses a query (one question) and builds the answer.
func dnsAnswer(q []byte) (string, []byte) {
	if len(q) < 12 || binary.BigEndian.Uint16(q[4:]) != 1 {
		return "", nil
	}
	off := 12
	var labels []string
	for off < len(q) && q[off] != 0 {
		l := int(q[off])
		if l > 63 || off+1+l > len(q) {
			return "", nil
		}
		labels = append(labels, string(q[off+1:off+1+l]))
		off += 1 + l
	}
	if off+5 > len(q) {
		return "", nil
	}
	qtype := binary.BigEndian.Uint16(q[off+1:])
	question := q[12 : off+5]
	r := []byte{q[0], q[1], 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0}
	r = append(r, question...)
	var rdata []byte
	switch qtype {
	case 1:
		a := netip.MustParseAddr(families[0].server).As4()
		rdata = a[:]
	case 28:
		a := netip.MustParseAddr(families[1].server).As16()
		rdata = a[:]
	}
	if rdata != nil {
		r[7] = 1
		r = append(r, 0xc0, 12, byte(qtype>>8), byte(qtype), 0, 1, 0, 0, 0, 60, 0, byte(len(rdata)))
		r = append(r, rdata...)
	}
	return strings.ToLower(strings.Join(labels, ".")), r
}

// dig asks the DNS server at server (an IP) for name from the client
// namespace and returns its short answer.
func dig(t *testing.T, tp *topo, server, name string) (string, error) {
	return digPort(t, tp, server, dnsPort, name, 5)
}

func digPort(t *testing.T, tp *topo, server string, port int, name string, wait int) (string, error) {
	t.Helper()
	out, err := tp.exec(t, tp.C, "dig", "@"+server, "-p", fmt.Sprint(port), name, "A", "+tries=1", fmt.Sprintf("+time=%d", wait), "+short")
	return strings.TrimSpace(out), err
}

// danteUDP starts a second danted in the upstream namespace, on port
// udpDantePort, that allows UDP ASSOCIATE (and CONNECT) and logs each
// request; it sends from dante's external addresses (.11), which
// startProxies added.
const udpDantePort = 1082

func danteUDP(t *testing.T, tp *topo) *proxyProc {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	p := startDante(t, tp, "danted-udp", dir, udpDantePort, "udpassociate udpreply connect", "connect disconnect error iooperation")
	waitListening(t, tp, p, udpDantePort)
	return p
}

// startUDPVia starts detour with the UDP tests' flags, sending sessions
// direct, or with via "socks5" through the UDP dante (danteUDP).
func startUDPVia(t *testing.T, tp *topo, via string) *detourProc {
	t.Helper()
	var args []string
	if via == "socks5" {
		args = append(args, "--upstream", proxyURL("socks5", "", families[0], udpDantePort))
	}
	return startChecked(t, tp, udpFlags(args...)...)
}

// TestUDPDNS: dig through detour to a DNS server in the server namespace,
// direct and through dante's UDP ASSOCIATE, IPv4 and IPv6; the server sees
// the query come from the gateway (direct) or dante's external address,
// the access line names the QNAME and counts one datagram each way, and a
// datagram to detour's own port is dropped and counted.
func TestUDPDNS(t *testing.T) {
	tp := newTopo(t)
	dns := startDNS(t, tp)
	startProxies(t, tp, map[string]string{"site.test": families[0].server})
	dante := danteUDP(t, tp)

	for _, via := range []string{"direct", "socks5"} {
		t.Run(via, func(t *testing.T) {
			d := startUDPVia(t, tp, via)
			for _, f := range families {
				t.Run(f.name, func(t *testing.T) {
					name := fmt.Sprintf("%s-%s.site.test", via, f.name)
					got, err := dig(t, tp, f.server, name)
					if err != nil || got != families[0].server {
						t.Fatalf("dig @%s %s = %q (%v), want %s", f.server, name, got, err, families[0].server)
					}
					from := dns.askedBy(name)
					wantFrom := map[string]map[string]string{"direct": {"ipv4": "198.18.2.1", "ipv6": "fd00:2::1"},
						"socks5": {"ipv4": "198.18.3.11", "ipv6": "fd00:3::11"}}[via][f.name]
					if len(from) != 1 || from[0].String() != wantFrom {
						t.Fatalf("the DNS server saw %s asked by %v, want once by %s", name, from, wantFrom)
					}
					dst := net.JoinHostPort(f.server, fmt.Sprint(dnsPort))
					rec := d.waitLog(t, 10*time.Second, "udp", map[string]string{"dst": dst, "host": name})
					want := map[string]string{"proto": "dns", "sniff": "found", "dgrams_up": "1", "dgrams_down": "1", "end": "idle", "error": ""}
					if via == "direct" {
						want["route"] = "direct"
					} else {
						want["route"] = "upstream"
						want["target"] = dst // a DNS query goes to the resolver the client chose, never to its QNAME
					}
					wantFields(t, rec, want)
					if c := fmt.Sprint(rec["client"]); !strings.Contains(c, f.client) {
						t.Errorf("access line client = %s, want %s", c, f.client)
					}
				})
			}
			if via == "socks5" {
				if n := dante.lines("udpassociate"); n == 0 {
					t.Errorf("dante logged no UDP ASSOCIATE:\n%s", lastLines(dante.logText(), 30))
				}
			}
			if via == "direct" {
				// Something on the gateway holds 0.0.0.0:5300 without
				// SO_REUSEADDR: replies from 198.18.2.2:5300 cannot be
				// sent; that is counted and stops nothing else.
				startDNSOn(t, tp, 5300)
				var holder net.PacketConn
				var err error
				inNS(t, tp.G, func() { holder, err = net.ListenPacket("udp4", "0.0.0.0:5300") })
				if err != nil {
					t.Fatal(err)
				}
				defer holder.Close()
				m0 := scrape(t, tp)
				if got, err := digPort(t, tp, families[0].server, 5300, "held.site.test", 2); err == nil && got != "" {
					t.Errorf("dig to a destination whose address the gateway holds got %q", got)
				}
				if got, err := dig(t, tp, families[0].server, "beside-held.site.test"); err != nil || got != families[0].server {
					t.Errorf("dig beside a held address = %q (%v)", got, err)
				}
				if n := delta(m0, scrape(t, tp), "detour_udp_dropped_total", "reason", "reply_addr_in_use"); n < 1 {
					t.Errorf("detour_udp_dropped_total{reason=reply_addr_in_use} moved by %g, want at least 1", n)
				}
				// Bytes that are neither QUIC nor DNS go by IP.
				sendUDP(t, tp.C, net.JoinHostPort(families[0].server, "443"), []byte("\xc0garbage that looks like a long header"))
				rec := d.waitLog(t, 10*time.Second, "udp", map[string]string{"dst": net.JoinHostPort(families[0].server, "443")})
				if rec["proto"] != "unknown" || rec["sniff"] != "none" || rec["route"] != "direct" {
					t.Errorf("garbage to port 443: access line %v, want proto unknown, sniff none, route direct", rec)
				}
			}
			// A datagram to detour's own port is not a session.
			m0 := scrape(t, tp)
			sendUDP(t, tp.C, net.JoinHostPort(families[0].gateway, fmt.Sprint(listenPort)), []byte("hello detour"))
			waitFor(t, 5*time.Second, "a datagram to detour's own port counted as dropped", func() bool {
				return delta(m0, scrape(t, tp), "detour_udp_dropped_total", "reason", "own_port") == 1
			})
			m := scrape(t, tp)
			if m.sum("detour_udp_sniff_total", "proto", "dns", "outcome", "found") < 2 || m.sum("detour_udp_sessions_total") < 2 {
				t.Errorf("metrics: udp sniff dns found %g, sessions %g; want at least 2 and 2", m.sum("detour_udp_sniff_total", "proto", "dns", "outcome", "found"), m.sum("detour_udp_sessions_total"))
			}
		})
	}
}

// sendUDP sends one datagram from namespace ns.
func sendUDP(t *testing.T, ns, addr string, b []byte) {
	t.Helper()
	var err error
	inNS(t, ns, func() {
		var c net.Conn
		if c, err = net.Dial("udp", addr); err == nil {
			_, err = c.Write(b)
			c.Close()
		}
	})
	if err != nil {
		t.Fatalf("sending a datagram to %s from %s: %v", addr, ns, err)
	}
}

// TestUDPQUIC: headless Chromium loads a page over HTTP/3 from the quic-go
// server in the server namespace through detour, direct and through dante's
// UDP ASSOCIATE, over IPv4 and IPv6; detour reads the SNI from the QUIC
// Initial packets, names it in the access line and asks dante for it (the
// upstream's log shows site.test); ngtcp2's client too where installed.
func TestUDPQUIC(t *testing.T) {
	tp := newTopo(t)
	h3 := startH3Server(t, tp.S, "[::]:443", "site.test,ngtcp2.site.test")
	startProxies(t, tp, map[string]string{"site.test": families[0].server, "ngtcp2.site.test": families[0].server})
	dante := danteUDP(t, tp)

	for _, via := range []string{"direct", "socks5"} {
		t.Run(via, func(t *testing.T) {
			d := startUDPVia(t, tp, via)
			for _, f := range families {
				t.Run(f.name, func(t *testing.T) {
					ip := f.server
					if f.name == "ipv6" {
						ip = "[" + ip + "]"
					}
					before := len(h3.Requests())
					dom, err := chromiumQUIC(t, tp.C, "site.test", ip, "443", h3.SPKI)
					if err != nil || !strings.Contains(dom, "hello over h3 via HTTP/3.0") {
						t.Fatalf("chromium over QUIC: %v\n%s", err, dom)
					}
					// The server saw the gateway (direct) or dante's external
					// address: the QUIC connection crossed detour.
					wantFrom := map[string]map[string]string{"direct": {"ipv4": "198.18.2.1", "ipv6": "fd00:2::1"},
						"socks5": {"ipv4": "198.18.3.11", "ipv6": "198.18.3.11"}}[via][f.name]
					reqs := h3.Requests()[before:]
					if len(reqs) == 0 || !strings.Contains(reqs[0], "proto=HTTP/3.0") || !strings.Contains(reqs[0], "remote="+wantFrom) &&
						!strings.Contains(reqs[0], "remote=["+wantFrom+"]") {
						t.Fatalf("h3server requests %q, want HTTP/3.0 from %s", reqs, wantFrom)
					}
					dst := net.JoinHostPort(f.server, "443")
					rec := d.waitLog(t, 15*time.Second, "udp", map[string]string{"dst": dst, "host": "site.test"})
					want := map[string]string{"proto": "quic", "sniff": "found", "route": map[string]string{"direct": "direct", "socks5": "upstream"}[via]}
					if via == "socks5" {
						want["target"] = "site.test:443"
					}
					wantFields(t, rec, want)
					if toInt(rec["dgrams_up"]) < 3 || toInt(rec["dgrams_down"]) < 3 {
						t.Errorf("access line counts %v up, %v down: a page load is more", rec["dgrams_up"], rec["dgrams_down"])
					}
				})
			}
			if via == "socks5" {
				if n := dante.lines("site.test"); n == 0 {
					t.Errorf("dante's log never names site.test:\n%s", lastLines(dante.logText(), 40))
				}
			}
			t.Run("ngtcp2", func(t *testing.T) {
				if _, err := exec.LookPath("gtlsclient"); err != nil {
					t.Skip("gtlsclient is not installed (ngtcp2-client; scripts/install-deps.sh installs it)")
				}
				// Given an IP, gtlsclient sends the SNI "localhost": it is
				// given the name, from the client namespace's /etc/hosts.
				writeHosts(t, tp.C, map[string]string{"ngtcp2.site.test": "198.18.2.2"})
				out, err := tp.exec(t, tp.C, "timeout", "20", "gtlsclient", "-q", "--exit-on-first-stream-close",
					"ngtcp2.site.test", "443", "https://ngtcp2.site.test:443/ngtcp2")
				if err != nil {
					t.Fatalf("gtlsclient: %v\n%s", err, out)
				}
				h3.waitRequest(t, 5*time.Second, "proto=HTTP/3.0", "path=/ngtcp2")
				d.waitLog(t, 15*time.Second, "udp", map[string]string{"host": "ngtcp2.site.test", "proto": "quic", "sniff": "found"})
			})
			m := scrape(t, tp)
			if m.sum("detour_udp_sniff_total", "proto", "quic", "outcome", "found") < 2 {
				t.Errorf("detour_udp_sniff_total{proto=quic,outcome=found} = %g, want at least 2", m.sum("detour_udp_sniff_total", "proto", "quic", "outcome", "found"))
			}
		})
	}
}

// TestUDPUpgrade: SIGUSR2 hands the transparent UDP socket to the new
// binary with the TCP listener; DNS through detour works before, and after
// the old process left, from the new one, which used the socket it
// inherited.
func TestUDPUpgrade(t *testing.T) {
	newBin := buildVersion(t, "udp-upgrade-test")
	tp := newTopo(t)
	startDNS(t, tp)
	bin := filepath.Join(t.TempDir(), "detour")
	copyBinary(t, detourBin, bin)
	d := startUpgradable(t, tp, bin, udpFlags("--grace", "1s")...)
	oldPID := d.cmd.Process.Pid
	if got, err := dig(t, tp, families[0].server, "before.site.test"); err != nil || got != families[0].server {
		t.Fatalf("dig before the upgrade = %q (%v)", got, err)
	}
	copyBinary(t, newBin, bin)
	d.cmd.Process.Signal(syscall.SIGUSR2)
	d.waitLog(t, 45*time.Second, "upgrade: handed over", nil)
	d.waitLog(t, 5*time.Second, "listening", map[string]string{"version": "udp-upgrade-test", "inherited": "true", "udp": "true"})
	deadline := time.Now().Add(20 * time.Second)
	for !gone(oldPID) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !gone(oldPID) {
		t.Fatalf("the old detour (pid %d) still runs", oldPID)
	}
	for _, f := range families {
		if got, err := dig(t, tp, f.server, "after-"+f.name+".site.test"); err != nil || got != families[0].server {
			t.Fatalf("dig @%s after the upgrade = %q (%v)", f.server, got, err)
		}
	}
	if recs := d.find("upgrade: not using the inherited UDP socket; listening anew", nil); len(recs) > 0 {
		t.Fatalf("the new process did not use the UDP socket it inherited: %v", recs[0])
	}
	// The old process is gone, so waitLog (which watches it) cannot wait.
	waitFor(t, 10*time.Second, "the new process's access line for the last query", func() bool {
		return len(d.find("udp", map[string]string{"host": "after-ipv6.site.test", "proto": "dns"})) == 1
	})
}
