//go:build linux

package main

// UDP through detour (TPROXY) against kernel forwarding in the same run:
// throughput and loss with iperf3 -u at rising rates, the proxy's CPU per
// GB, and new sessions per second (one datagram to each of many
// destination ports, which the server drops silently).

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"
)

// udpRates are the iperf3 -u target rates, rising.
var udpRates = []string{"100M", "300M", "1G", "3G"}

const (
	udpPayload        = 1200 // bytes per datagram, a QUIC-sized one
	udpSilentLo       = 20000
	udpSilentHi       = 59999
	udpSessionSeconds = 3
)

// udpResult is one setup in the UDP comparison.
type udpResult struct {
	Setup    string           `json:"setup"`
	Rates    []udpRateResult  `json:"rates"`
	Sessions *udpSessionsStat `json:"sessions,omitempty"`
	Error    string           `json:"error,omitempty"`
}

type udpRateResult struct {
	Target     string  `json:"target"`
	Mbps       float64 `json:"received_mbps"`
	Datagrams  int64   `json:"datagrams"`
	PerSec     float64 `json:"datagrams_per_sec"`
	LostPct    float64 `json:"lost_percent"`
	ProxyCPUs  float64 `json:"proxy_cpu_s"`
	CPUPerGB   float64 `json:"proxy_cpu_s_per_gb"`
	RemoteHost string  `json:"server_saw"`
}

type udpSessionsStat struct {
	Sent     int64   `json:"sent"`
	Received int64   `json:"received"`
	PerSec   float64 `json:"per_sec"`
}

// udpCost runs the UDP comparison when detour-tproxy is a candidate.
func (b *bench) udpCost(cands []candidate) error {
	want := false
	for _, c := range cands {
		want = want || c.Name == "detour-tproxy"
	}
	if !want {
		return nil
	}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		if out, err := b.topo.exec(b.ctx, b.topo.S, ipt, "-w", "-A", "INPUT", "-p", "udp", "--dport",
			fmt.Sprintf("%d:%d", udpSilentLo, udpSilentHi), "-j", "DROP"); err != nil {
			return fmt.Errorf("%s in the server namespace: %v\n%s", ipt, err, out)
		}
	}
	seconds := b.opts.bulkSeconds
	for _, name := range []string{"kernel", "detour-tproxy"} {
		if b.ctx.Err() != nil {
			return b.ctx.Err()
		}
		c := candidateNamed(name)
		b.logf("udp: %s", name)
		res := udpResult{Setup: name}
		r, err := b.startCandidate(c, "--udp=true", "--max-udp-sessions", "16384", "--udp-idle-timeout", "5s") // the candidate is TCP only
		if err == nil {
			for _, rate := range udpRates {
				var rr *udpRateResult
				if rr, err = b.udpRate(r, rate, seconds); err != nil {
					break
				}
				b.logf("  %s: %.0f Mbit/s received, %.0f datagrams/s, %.2f%% lost, proxy CPU %.2f s/GB", rate, rr.Mbps, rr.PerSec, rr.LostPct, rr.CPUPerGB)
				res.Rates = append(res.Rates, *rr)
			}
			if err == nil {
				res.Sessions, err = b.udpSessions()
				if err == nil {
					b.logf("  new sessions: %.0f/s (%d sent, %d reached the server)", res.Sessions.PerSec, res.Sessions.Sent, res.Sessions.Received)
				}
			}
			if serr := b.stopCandidate(r); serr != nil && err == nil {
				err = serr
			}
		}
		if err != nil {
			res.Error = err.Error()
			b.logf("  %v", err)
		}
		b.res.UDP = append(b.res.UDP, res)
	}
	return nil
}

type iperfUDPJSON struct {
	Error string `json:"error"`
	End   struct {
		// The receiver's report, as the server sent it back.
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Packets       int64   `json:"packets"`
			LostPackets   int64   `json:"lost_packets"`
			LostPercent   float64 `json:"lost_percent"`
			Seconds       float64 `json:"seconds"`
		} `json:"sum_received"`
	} `json:"end"`
	ServerOutput struct {
		Start struct {
			Connected []struct {
				RemoteHost string `json:"remote_host"`
			} `json:"connected"`
		} `json:"start"`
	} `json:"server_output_json"`
}

// udpRate runs iperf3 -u at rate from the client to the server.
func (b *bench) udpRate(r *running, rate string, seconds int) (*udpRateResult, error) {
	args := []string{"iperf3", "-u", "-c", serverIP, "-p", strconv.Itoa(iperfPort), "-b", rate, "-l", strconv.Itoa(udpPayload), "-w", "4M",
		"-t", strconv.Itoa(seconds), "-J", "--get-server-output", "--connect-timeout", "3000"}
	cpu0, _ := b.proxyCPU(r)
	out, err := runCmd(b.ctx, time.Duration(seconds+20)*time.Second, "ip", append([]string{"netns", "exec", b.topo.C}, args...)...)
	cpu1, _ := b.proxyCPU(r)
	var j iperfUDPJSON
	if jerr := json.Unmarshal([]byte(out), &j); jerr != nil {
		b.restartIperf()
		return nil, fmt.Errorf("iperf3 -u -b %s: %v (%v)\n%s", rate, err, jerr, truncate(out))
	}
	if j.Error != "" || err != nil {
		b.restartIperf()
		return nil, fmt.Errorf("iperf3 -u -b %s: %v %s", rate, err, j.Error)
	}
	s := j.End.SumReceived
	res := &udpRateResult{Target: rate, Mbps: s.BitsPerSecond / 1e6, LostPct: s.LostPercent,
		Datagrams: s.Packets - s.LostPackets, ProxyCPUs: (cpu1 - cpu0).Seconds()}
	if len(j.ServerOutput.Start.Connected) > 0 {
		res.RemoteHost = j.ServerOutput.Start.Connected[0].RemoteHost
	}
	// iperf3 -u's data flows on its own UDP socket; the peer the server
	// names is its control connection's (TCP), which crosses the same way.
	if res.RemoteHost != r.c.Peer {
		return nil, fmt.Errorf("the iperf3 server saw %s, want %s: the traffic did not cross %s", res.RemoteHost, r.c.Peer, r.c.Name)
	}
	if s.Seconds > 0 {
		res.PerSec = float64(res.Datagrams) / s.Seconds
	}
	if s.Bytes > 0 {
		res.CPUPerGB = res.ProxyCPUs / (s.Bytes / 1e9)
	}
	return res, nil
}

// udpSessions sends one datagram to each of many destination ports as fast
// as the client can for a few seconds and counts what reached the server.
func (b *bench) udpSessions() (*udpSessionsStat, error) {
	before, err := b.silentDrops()
	if err != nil {
		return nil, err
	}
	out, err := runCmd(b.ctx, time.Minute, "ip", "netns", "exec", b.topo.C, b.self, "helper", "udpsessions",
		"-server", serverIP, "-lo", strconv.Itoa(udpSilentLo), "-hi", strconv.Itoa(udpSilentHi), "-seconds", strconv.Itoa(udpSessionSeconds))
	if err != nil {
		return nil, fmt.Errorf("udpsessions: %v\n%s", err, truncate(out))
	}
	time.Sleep(500 * time.Millisecond) // the last ones in flight
	after, err := b.silentDrops()
	if err != nil {
		return nil, err
	}
	var st udpSessionsStat
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("udpsessions said %q: %v", truncate(out), err)
	}
	st.Received = after - before
	st.PerSec = float64(st.Received) / udpSessionSeconds
	return &st, nil
}

// silentDrops is the server's count of datagrams to the silent ports.
func (b *bench) silentDrops() (int64, error) {
	out, err := b.topo.exec(b.ctx, b.topo.S, "iptables", "-w", "-L", "INPUT", "-v", "-n", "-x")
	if err != nil {
		return 0, fmt.Errorf("iptables -L INPUT in the server: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "DROP") && strings.Contains(line, fmt.Sprintf("dpts:%d:%d", udpSilentLo, udpSilentHi)) {
			n, _ := strconv.ParseInt(strings.Fields(line)[0], 10, 64)
			return n, nil
		}
	}
	return 0, fmt.Errorf("no DROP rule for the silent ports in:\n%s", out)
}

// udpSessionsMain (helper udpsessions) sends one small datagram to each
// port from lo to hi in turn, as fast as it can, for some seconds, and
// prints how many it sent.
func udpSessionsMain(args []string) error {
	fs := flag.NewFlagSet("udpsessions", flag.ContinueOnError)
	server := fs.String("server", "", "server IP")
	lo := fs.Int("lo", 0, "first port")
	hi := fs.Int("hi", 0, "last port")
	seconds := fs.Int("seconds", 3, "how long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ip, err := netip.ParseAddr(*server)
	if err != nil {
		return err
	}
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		return err
	}
	defer c.Close()
	payload := []byte("x")
	var sent int64
	end := time.Now().Add(time.Duration(*seconds) * time.Second)
	port := *lo
	for time.Now().Before(end) {
		for range 64 {
			if _, err := c.WriteToUDPAddrPort(payload, netip.AddrPortFrom(ip, uint16(port))); err == nil {
				sent++
			}
			if port++; port > *hi {
				port = *lo
			}
		}
	}
	return json.NewEncoder(os.Stdout).Encode(udpSessionsStat{Sent: sent})
}
