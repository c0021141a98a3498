package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	listenPort = 7777
	mark       = "0x2d"
)

func TestRedirect(t *testing.T) { testDataPath(t, "redirect") }
func TestTProxy(t *testing.T)   { testDataPath(t, "tproxy") }

// testDataPath is the data path end to end in one mode: a client in its own
// namespace reaches servers in another through the gateway, whose kernel
// hands the connections to detour.
func testDataPath(t *testing.T, mode string) {
	tp := newTopo(t)
	tp.markCount(t, mark)
	startServers(t, tp)
	// --output: the gateway's own connections are captured too.
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--mode", mode, "--mark", mark, "--output"}, capture...)...)

	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			server := func(port int) string { return net.JoinHostPort(f.server, fmt.Sprint(port)) }

			t.Run("curl by IP", func(t *testing.T) {
				url := fmt.Sprintf("http://%s/", server(httpPort))
				out, err := tp.exec(t, tp.C, "curl", "-sS", "-m", "10", url)
				if err != nil {
					t.Fatalf("curl %s: %v\n%s", url, err, out)
				}
				// The server sees the gateway (detour), not the client: the
				// connection really crossed the proxy.
				if !strings.HasPrefix(out, "hello from the server namespace") || strings.Contains(out, f.client) {
					t.Fatalf("curl %s = %q; want the server's greeting to the gateway", url, out)
				}
				rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": server(httpPort), "mode": mode})
				if c := fmt.Sprint(rec["client"]); !strings.Contains(c, f.client) {
					t.Errorf("access line client = %s, want the client %s", c, f.client)
				}
				if rec["error"] != "" || toInt(rec["down"]) == 0 || toInt(rec["up"]) == 0 {
					t.Errorf("access line = %v; want bytes both ways and no error", rec)
				}
			})

			t.Run("100MB up byte-exact", func(t *testing.T) {
				const n = 100 << 20
				c := dial(t, tp, server(bulkPort))
				go func() {
					c.Write([]byte{'U'})
					io.CopyN(c, stream(n), n)
					c.CloseWrite()
				}()
				got, err := io.ReadAll(c)
				if err != nil || string(got) != streamSum(n) {
					t.Fatalf("server's SHA-256 of the upload = %q (%v), want %s", got, err, streamSum(n))
				}
			})

			t.Run("100MB down byte-exact", func(t *testing.T) {
				const n = 100 << 20
				c := dial(t, tp, server(bulkPort))
				var req [9]byte
				req[0] = 'D'
				binary.BigEndian.PutUint64(req[1:], n)
				c.Write(req[:])
				h := sha256.New()
				got, err := io.Copy(h, c)
				if err != nil || got != n || hex.EncodeToString(h.Sum(nil)) != streamSum(n) {
					t.Fatalf("download: %d bytes (%v), checksum match %v", got, err, hex.EncodeToString(h.Sum(nil)) == streamSum(n))
				}
			})

			t.Run("half-close", func(t *testing.T) {
				c := dial(t, tp, server(bulkPort))
				c.Write([]byte("Hrequest"))
				c.CloseWrite() // the server replies only after this FIN reaches it
				got, err := io.ReadAll(c)
				if err != nil || len(got) != 1<<20 {
					t.Fatalf("reply after half-close: %d bytes (%v), want %d", len(got), err, 1<<20)
				}
				if want, _ := io.ReadAll(io.LimitReader(stream(1<<20), 1<<20)); !bytes.Equal(got, want) {
					t.Fatal("reply after half-close arrived corrupted")
				}
			})

			t.Run("server reset reaches client", func(t *testing.T) {
				c := dial(t, tp, server(bulkPort))
				c.Write([]byte("Rx"))
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				_, err := c.Read(make([]byte, 1))
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("client read = %v, want connection reset", err)
				}
			})

			t.Run("not redirected is refused", func(t *testing.T) {
				before := tp.markedPackets(t)
				self := net.JoinHostPort(f.gateway, fmt.Sprint(listenPort))
				c := dial(t, tp, self)
				c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				n, err := c.Read(make([]byte, 1))
				if n != 0 || err == nil || errors.Is(err, syscall.EAGAIN) || isTimeout(err) {
					t.Fatalf("connection to detour's own address: read %d, %v; want it closed", n, err)
				}
				d.waitLog(t, 5*time.Second, "refused", map[string]string{"dst": self})
				if after := tp.markedPackets(t); after != before {
					t.Fatalf("detour sent %d marked packets for a refused connection; it must not dial", after-before)
				}
			})

			t.Run("outbound carries the mark", func(t *testing.T) {
				before := tp.markedPackets(t)
				c := dial(t, tp, server(bulkPort))
				c.Write([]byte("Eping"))
				c.CloseWrite()
				if got, _ := io.ReadAll(c); string(got) != "ping" {
					t.Fatalf("echo = %q", got)
				}
				if after := tp.markedPackets(t); after <= before {
					t.Fatalf("marked packet counter %d → %d: detour's connection to the server was not marked", before, after)
				}
				// The gateway's own connections are captured too (nat
				// OUTPUT, or mangle OUTPUT and a reroute to lo for TPROXY);
				// only the mark keeps detour's dial from looping.
				url := fmt.Sprintf("http://%s/", server(httpPort))
				out, err := tp.exec(t, tp.G, "curl", "-sS", "-m", "10", url)
				if err != nil || !strings.HasPrefix(out, "hello from the server namespace") {
					t.Fatalf("curl from the gateway itself: %v\n%s", err, out)
				}
				d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": server(httpPort), "error": ""})
			})

			t.Run("idle connections hold two fds each", func(t *testing.T) {
				_, _, fds0 := d.stats(t)
				const conns = 200
				for range conns {
					c := dial(t, tp, server(bulkPort))
					c.Write([]byte("Eping")) // a burst of traffic, then silence
					if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
						t.Fatal(err)
					}
				}
				active, _, fds := d.stats(t)
				if active < conns {
					t.Fatalf("detour holds %d connections, want %d", active, conns)
				}
				// Two sockets per connection; no splice pipes held while idle.
				if per := float64(fds-fds0) / conns; per > 2.1 {
					t.Fatalf("%.2f fds per idle connection (%d → %d), want 2", per, fds0, fds)
				}
			})

			t.Run("200 concurrent then nothing left", func(t *testing.T) {
				_, goroutines0, fds0 := d.stats(t)
				const conns = 200
				var wg sync.WaitGroup
				errs := make(chan error, conns)
				payload := bytes.Repeat([]byte("0123456789abcdef"), 1024)
				for i := range conns {
					wg.Add(1)
					go func() {
						defer wg.Done()
						c, err := dialIn(t, tp.C, server(bulkPort))
						if err != nil {
							errs <- err
							return
						}
						defer c.Close()
						c.SetDeadline(time.Now().Add(30 * time.Second))
						c.Write([]byte{'E'})
						c.Write(payload)
						c.CloseWrite()
						got, err := io.ReadAll(c)
						if err != nil || !bytes.Equal(got, payload) {
							errs <- fmt.Errorf("connection %d: echoed %d bytes (%v)", i, len(got), err)
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Error(err)
				}
				var active, goroutines, fds int
				deadline := time.Now().Add(10 * time.Second)
				for {
					active, goroutines, fds = d.stats(t)
					if (active == 0 && goroutines <= goroutines0 && fds <= fds0) || time.Now().After(deadline) {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				t.Logf("idle: goroutines %d, fds %d; after 200 connections: active %d, goroutines %d, fds %d", goroutines0, fds0, active, goroutines, fds)
				if active != 0 || goroutines > goroutines0 || fds > fds0 {
					t.Fatalf("after 200 connections closed: active %d, goroutines %d (idle %d), fds %d (idle %d)",
						active, goroutines, goroutines0, fds, fds0)
				}
			})
		})
	}
}

// TestOutboundPortsShared checks that detour's outbound sockets take their
// local port at connect, per 4-tuple, like any client's. A socket bound to
// port 0 before it connects holds an ephemeral port of its own, and a
// gateway would run out after ip_local_port_range connections in all (and
// sooner with ports in TIME_WAIT) instead of that many per destination.
// The gateway here has two ephemeral ports; four connections to four ports
// of the server, per family, must all get through and stay up at once.
func TestOutboundPortsShared(t *testing.T) {
	tp := newTopo(t)
	if out, err := tp.exec(t, tp.G, "sysctl", "-w", "net.ipv4.ip_local_port_range=40000 40001"); err != nil {
		t.Fatalf("narrowing the gateway's ephemeral ports: %v\n%s", err, out)
	}
	ports := []int{7001, 7002, 7003, 7004}
	for _, port := range ports {
		banner(t, listenIn(t, tp.S, fmt.Sprintf("[::]:%d", port)))
	}
	d := startChecked(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--mode", "redirect", "--mark", mark}, capture...)...)
	const want = "SSH-2.0-detour-test\r\n"
	for _, f := range families {
		for _, port := range ports {
			addr := net.JoinHostPort(f.server, fmt.Sprint(port))
			c := dial(t, tp, addr) // held open until the test ends
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got := make([]byte, len(want))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
				t.Fatalf("banner through detour from %s = %q (%v), want %q; with 2 ephemeral ports on the gateway, its outbound connections must share them\n%s",
					addr, got, err, want, d.rawLog())
			}
		}
	}
}

// TestTProxyReusedSourcePort checks a client that opens a new connection
// from the source port of one the server closed first, within the minute
// the gateway keeps detour's transparent socket in TIME_WAIT: its SYN must
// reach detour's listener at once, not draw a bare ACK from the old socket
// (there is no listener on the original destination behind it) and a SYN
// retransmission from the client.
func TestTProxyReusedSourcePort(t *testing.T) {
	tp := newTopo(t)
	const serverPort, clientPort = 7005, 33333
	ln := listenIn(t, tp.S, fmt.Sprintf("[::]:%d", serverPort))
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			io.WriteString(c, "x") // and the server closes first
			c.Close()
		}
	}()
	startChecked(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--mode", "tproxy", "--mark", mark}, capture...)...)
	reuse := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
		return serr
	}}
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			addr := net.JoinHostPort(f.server, fmt.Sprint(serverPort))
			reuse.LocalAddr = &net.TCPAddr{IP: net.ParseIP(f.client), Port: clientPort}
			retrans0 := synRetrans(t, tp)
			for i := range 3 {
				if i > 0 {
					// The gateway holds the last connection in TIME_WAIT.
					out, _ := tp.exec(t, tp.G, "ss", "-Htn", "state", "time-wait", fmt.Sprintf("dport = :%d", clientPort))
					if !strings.Contains(out, f.server) {
						t.Fatalf("no TIME_WAIT socket from %s to port %d in the gateway, so nothing is tested; ss says %q", f.server, clientPort, out)
					}
				}
				var c net.Conn
				var err error
				// Until the client's own socket has left LAST_ACK, the
				// 4-tuple is busy on its side (EADDRNOTAVAIL): a bounded wait.
				for try := 0; try < 50; try++ {
					inNS(t, tp.C, func() { c, err = reuse.Dial("tcp", addr) })
					if !errors.Is(err, syscall.EADDRNOTAVAIL) {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				if err != nil {
					t.Fatalf("connection %d from port %d to %s: %v", i+1, clientPort, addr, err)
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(c)
				c.Close()
				if err != nil || string(got) != "x" {
					t.Fatalf("connection %d from port %d to %s read %q (%v), want \"x\" then EOF", i+1, clientPort, addr, got, err)
				}
			}
			if n := synRetrans(t, tp) - retrans0; n != 0 {
				t.Errorf("the client retransmitted %d SYNs for connections from a port detour's socket holds in TIME_WAIT, want 0", n)
			}
		})
	}
}

// synRetrans is the client namespace's count of retransmitted SYNs
// (TcpExt TCPSynRetrans, IPv4 and IPv6).
func synRetrans(t *testing.T, tp *topo) int {
	t.Helper()
	out, err := tp.exec(t, tp.C, "cat", "/proc/net/netstat")
	if err != nil {
		t.Fatalf("reading the client's /proc/net/netstat: %v\n%s", err, out)
	}
	lines := strings.Split(out, "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(values) != len(names) {
			continue
		}
		for j, name := range names {
			if name == "TCPSynRetrans" {
				var n int
				fmt.Sscan(values[j], &n)
				return n
			}
		}
	}
	t.Fatalf("no TcpExt TCPSynRetrans in the client's /proc/net/netstat:\n%s", out)
	return 0
}

func dial(t *testing.T, tp *topo, addr string) *net.TCPConn {
	t.Helper()
	c, err := dialIn(t, tp.C, addr)
	if err != nil {
		t.Fatalf("client dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	return c
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestTProxyForwardedReplies: TPROXY captures TCP by its SYN alone, and
// without UDP nothing turns connection tracking on; per backend, with UDP
// off and on:
//   - a captured connection still carries data both ways through detour
//     (every packet after its SYN reaches detour's socket through the
//     established rule, not the capture);
//   - a connection the gateway forwards (not captured: it comes in on the
//     server side) to a host on the captured interface gets its replies
//     through: TCP packets coming in on the captured interface with no
//     socket of detour's behind them, which a capture taking every packet
//     would hand to detour's listener, which resets them.
func TestTProxyForwardedReplies(t *testing.T) {
	for _, be := range backends {
		for _, udp := range []string{"false", "true"} {
			t.Run(be.name+"/udp="+udp, func(t *testing.T) { testTProxyForwardedReplies(t, be, udp) })
		}
	}
}

func testTProxyForwardedReplies(t *testing.T, be backend, udp string) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startDetour(t, tp, append(be.firewall(), "--listen", fmt.Sprintf(":%d", listenPort), "--mode", "tproxy", "--mark", mark,
		"--install-rules", "--bypass", "none", "--interface", "gc", "--udp="+udp)...)
	msg := bytes.Repeat([]byte("forwarded "), 10000) // several segments each way

	// echo sends msg on c, half-closes, and wants msg back.
	echo := func(what string, c *net.TCPConn, head []byte) {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		go func() {
			c.Write(append(head, msg...))
			c.CloseWrite()
		}()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("%s: %d of %d bytes echoed (%v)", what, len(got), len(msg), err)
		}
	}

	server := net.JoinHostPort(families[0].server, fmt.Sprint(bulkPort))
	c := dial(t, tp, server)
	echo("captured connection to "+server, c, []byte{'E'})
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"dst": server, "mode": "tproxy", "error": ""})

	ln := listenIn(t, tp.C, net.JoinHostPort(families[0].client, "0"))
	ln.SetDeadline(time.Now().Add(15 * time.Second))
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.Copy(c, c) // echo until the dialler's FIN
	}()
	f, err := dialIn(t, tp.S, ln.Addr().String())
	if err != nil {
		t.Fatalf("from the server side to %s on the client side: %v", ln.Addr(), err)
	}
	defer f.Close()
	echo("forwarded connection to "+ln.Addr().String(), f, nil)
}
