package test

import (
	"context"
	"net"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
)

// TestQUICSniffLive feeds the datagrams real QUIC clients send to a
// loopback UDP socket into sniff.QUICAssembler as they arrive, the way the
// UDP path does, and checks each flow's answer: Chromium (its post-quantum
// ClientHello over two or more Initial packets), quic-go over v1 and v2,
// and ngtcp2's client. Nothing answers the clients. It logs how long after
// the first datagram the answer came.
func TestQUICSniffLive(t *testing.T) {
	clients := []struct {
		name, host string
		ech        bool
		run        func(ctx context.Context, port string) *exec.Cmd
	}{
		{"chromium", "site.test", true, func(ctx context.Context, port string) *exec.Cmd {
			bin, err := exec.LookPath("chromium")
			if err != nil {
				return nil
			}
			return exec.CommandContext(ctx, bin, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
				"--disable-background-networking", "--disable-component-update", "--disable-sync",
				"--user-data-dir="+t.TempDir(), "--enable-quic", "--origin-to-force-quic-on=site.test:"+port,
				"--host-resolver-rules=MAP site.test 127.0.0.1, MAP * ~NOTFOUND", "--dump-dom", "https://site.test:"+port+"/")
		}},
		{"quic-go v1", "v1.quic-go.test", false, func(ctx context.Context, port string) *exec.Cmd {
			return exec.CommandContext(ctx, h3ServerBin(t), "-client", "https://v1.quic-go.test:"+port+"/",
				"-connect", "127.0.0.1:"+port, "-quic-version", "1", "-timeout", "5s")
		}},
		{"quic-go v2", "v2.quic-go.test", false, func(ctx context.Context, port string) *exec.Cmd {
			return exec.CommandContext(ctx, h3ServerBin(t), "-client", "https://v2.quic-go.test:"+port+"/",
				"-connect", "127.0.0.1:"+port, "-quic-version", "2", "-timeout", "5s")
		}},
		{"ngtcp2", "localhost", false, func(ctx context.Context, port string) *exec.Cmd {
			if _, err := exec.LookPath("gtlsclient"); err != nil {
				return nil
			}
			return exec.CommandContext(ctx, "gtlsclient", "-q", "--timeout=5s", "127.0.0.1", port, "https://localhost/")
		}},
	}
	for _, c := range clients {
		t.Run(c.name, func(t *testing.T) {
			pc, err := net.ListenPacket("udp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			port := strconv.Itoa(pc.LocalAddr().(*net.UDPAddr).Port)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := c.run(ctx, port)
			if cmd == nil {
				t.Skipf("%s is not installed (scripts/install-deps.sh installs it)", c.name)
			}
			// Its own process group, killed whole: the client never gets an
			// answer, and Chromium's helpers must not outlive the test.
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { cancel(); cmd.Wait() }()

			a := sniff.NewQUICAssembler(sniff.QUICLimits{})
			buf := make([]byte, 65535)
			var from net.Addr
			var first time.Time
			pc.SetReadDeadline(time.Now().Add(30 * time.Second))
			for {
				n, addr, err := pc.ReadFrom(buf)
				if err != nil {
					t.Fatalf("after %d datagrams: %v", a.Datagrams(), err)
				}
				if from == nil {
					from, first = addr, time.Now()
				} else if addr.String() != from.String() {
					continue // another flow
				}
				r, st := a.Add(buf[:n])
				if st == sniff.QUICNeedMore {
					continue
				}
				if st != sniff.QUICDone || r.Proto != sniff.QUIC || r.Host != c.host || !r.OffersALPN("h3") || r.ECH != c.ech {
					t.Fatalf("%v (%s) %+v alpn %q, want done %s h3 ech=%v", st, a.Reason(), r, r.ALPN(), c.host, c.ech)
				}
				t.Logf("%s: %s after %d datagrams, %v after the first", c.name, r.Host, a.Datagrams(), time.Since(first))
				return
			}
		})
	}
}
