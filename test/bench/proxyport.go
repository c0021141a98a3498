//go:build linux

package main

// The explicit proxy port: CONNECT through detour's --proxy-listen against
// the same through squid and against the transparent path (detour-redirect),
// new connections per second and one stream's throughput, in the same run.

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	gatewayClientIP = "198.18.1.1" // the gateway's address on the client side
	proxyPortPort   = 8080         // detour --proxy-listen
	squidPort       = 3128
	sourcePort      = 9100 // the source helper: bytes until the peer closes
)

// proxyPortResult is one way of reaching the server in the proxy-port
// comparison.
type proxyPortResult struct {
	Setup string         `json:"setup"`
	Conns *loadResult    `json:"conns,omitempty"`
	Flow  *loadResult    `json:"stream,omitempty"`
	Error string         `json:"error,omitempty"`
	Extra map[string]any `json:"extra,omitempty"`
}

// loadResult is what the connectload helper prints.
type loadResult struct {
	Seconds  float64 `json:"seconds"`
	Done     int64   `json:"done"`
	Errors   int64   `json:"errors"`
	PerSec   float64 `json:"per_sec"`
	Bytes    int64   `json:"bytes,omitempty"`
	Gbps     float64 `json:"gbps,omitempty"`
	FirstErr string  `json:"first_err,omitempty"`
}

// squidConf: CONNECT to any port for anyone, nothing cached or logged.
const squidConf = `http_port %[2]s:%[3]d
visible_hostname detour-bench
pid_filename %[1]s/squid.pid
access_log none
cache_log %[1]s/squid-cache.log
cache_store_log none
netdb_filename none
coredump_dir %[1]s
cache deny all
pinger_enable off
shutdown_lifetime 0 seconds
max_filedescriptors 20000
dns_nameservers 127.0.0.1
http_access allow all
`

// proxyPortCost measures CONNECT through detour's proxy port and through
// squid, and the same request through the transparent path.
func (b *bench) proxyPortCost(cands []candidate) error {
	want := false
	for _, c := range cands {
		want = want || c.Name == "detour-redirect"
	}
	if !want {
		return nil
	}
	src, err := b.procs.start("source", b.topo.S, 0, true, b.self, "helper", "source", "-listen", fmt.Sprintf("%s:%d", serverIP, sourcePort))
	if err != nil {
		return err
	}
	defer src.stop(time.Second)
	if err := b.waitListen(b.topo.S, sourcePort, 10*time.Second); err != nil {
		return fmt.Errorf("source: %w\n%s", err, src.tail())
	}
	proxyAddr := func(port int) string { return fmt.Sprintf("%s:%d", gatewayClientIP, port) }
	setups := []struct {
		name  string
		proxy string // "" for the transparent path
		start func() (stop func(), err error)
	}{
		{"detour proxy port (CONNECT)", proxyAddr(proxyPortPort), func() (func(), error) {
			p, err := b.procs.start("detour-proxyport", b.topo.G, nofile, false, b.detour, "run", "--log-format", "json",
				"--listen", fmt.Sprintf(":%d", detourPort), "--grace", "1s", "--proxy-listen", proxyAddr(proxyPortPort))
			if err != nil {
				return nil, err
			}
			stop := func() { p.stop(2 * time.Second) }
			if err := b.waitListen(b.topo.G, proxyPortPort, 10*time.Second); err != nil {
				stop()
				return nil, fmt.Errorf("%w\n%s", err, p.tail())
			}
			return stop, nil
		}},
		{"squid (CONNECT)", proxyAddr(squidPort), func() (func(), error) {
			dir := filepath.Join(b.tmp, "squid")
			os.MkdirAll(dir, 0o777)
			os.Chmod(dir, 0o777)
			conf := filepath.Join(dir, "squid.conf")
			if err := os.WriteFile(conf, []byte(fmt.Sprintf(squidConf, dir, gatewayClientIP, squidPort)), 0o644); err != nil {
				return nil, err
			}
			p, err := b.procs.start("squid", b.topo.G, nofile, false, "squid", "-N", "-n", b.topo.id, "-f", conf)
			if err != nil {
				return nil, err
			}
			stop := func() {
				p.stop(3 * time.Second)
				left, _ := filepath.Glob(filepath.Join("/dev/shm", b.topo.id+"-*"))
				for _, f := range left {
					os.Remove(f)
				}
			}
			if err := b.waitListen(b.topo.G, squidPort, 15*time.Second); err != nil {
				stop()
				return nil, fmt.Errorf("%w\n%s", err, p.tail())
			}
			return stop, nil
		}},
		{"detour-redirect (transparent)", "", func() (func(), error) {
			r, err := b.startCandidate(candidateNamed("detour-redirect"))
			if err != nil {
				return nil, err
			}
			return func() { b.stopCandidate(r) }, nil
		}},
	}
	for _, s := range setups {
		if b.ctx.Err() != nil {
			return b.ctx.Err()
		}
		b.logf("proxy port: %s", s.name)
		res := proxyPortResult{Setup: s.name}
		stop, err := s.start()
		if err == nil {
			res.Conns, err = b.connectLoad(s.proxy, fmt.Sprintf("%s:%d", serverIP, httpPort), "conns", b.opts.connSeconds, b.opts.concurrency)
			if err == nil {
				res.Flow, err = b.connectLoad(s.proxy, fmt.Sprintf("%s:%d", serverIP, sourcePort), "stream", b.opts.bulkSeconds, 1)
			}
			stop()
		}
		if err != nil {
			res.Error = err.Error()
			b.logf("  %v", err)
		} else {
			b.logf("  %.0f conn/s (%d errors), one stream %.2f Gbit/s", res.Conns.PerSec, res.Conns.Errors, res.Flow.Gbps)
		}
		b.res.ProxyPort = append(b.res.ProxyPort, res)
	}
	return nil
}

func (b *bench) connectLoad(proxy, target, mode string, seconds, concurrency int) (*loadResult, error) {
	out, err := runCmd(b.ctx, time.Duration(seconds)*time.Second+time.Minute, "ip", "netns", "exec", b.topo.C, b.self, "helper", "connectload",
		"-proxy", proxy, "-target", target, "-mode", mode, "-seconds", strconv.Itoa(seconds), "-concurrency", strconv.Itoa(concurrency))
	if err != nil {
		return nil, fmt.Errorf("connectload %s: %v\n%s", mode, err, truncate(out))
	}
	var r loadResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("connectload said %q: %v", truncate(out), err)
	}
	if r.Done == 0 {
		return nil, fmt.Errorf("connectload %s: nothing done (%d errors, first: %s)", mode, r.Errors, r.FirstErr)
	}
	return &r, nil
}

// sourceMain writes bytes to every connection until the peer closes it.
func sourceMain(args []string) error {
	fs := flag.NewFlagSet("source", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to serve")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	buf := make([]byte, 256<<10)
	go acceptLoop(ln, func(c *net.TCPConn) {
		defer c.Close()
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	waitStdin()
	return nil
}

// connectLoadMain is the client: in mode conns, -concurrency workers each
// open a connection (through -proxy with CONNECT, or straight to -target,
// which the capture rules hand to detour), send one HTTP request with
// Connection: close and read the response to its end, for -seconds; in
// mode stream, one connection reads from the source for -seconds. It prints
// a loadResult.
func connectLoadMain(args []string) error {
	fs := flag.NewFlagSet("connectload", flag.ContinueOnError)
	proxy := fs.String("proxy", "", "HTTP proxy to CONNECT through; empty: connect to -target")
	target := fs.String("target", "", "destination host:port")
	mode := fs.String("mode", "conns", "conns or stream")
	seconds := fs.Int("seconds", 4, "how long")
	concurrency := fs.Int("concurrency", 32, "workers (conns)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	open := func(deadline time.Time) (net.Conn, *bufio.Reader, error) {
		addr := *target
		if *proxy != "" {
			addr = *proxy
		}
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err != nil {
			return nil, nil, err
		}
		c.SetDeadline(deadline)
		br := bufio.NewReader(c)
		if *proxy == "" {
			return c, br, nil
		}
		fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", *target, *target)
		status, err := br.ReadString('\n')
		if err != nil || !strings.Contains(status, " 200 ") {
			c.Close()
			return nil, nil, fmt.Errorf("CONNECT: %q %v", status, err)
		}
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				c.Close()
				return nil, nil, err
			}
			if line == "\r\n" || line == "\n" {
				return c, br, nil
			}
		}
	}
	var res loadResult
	var firstErr atomic.Value
	fail := func(err error) {
		atomic.AddInt64(&res.Errors, 1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	start := time.Now()
	end := start.Add(time.Duration(*seconds) * time.Second)
	switch *mode {
	case "conns":
		var wg sync.WaitGroup
		req := []byte("GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
		for range *concurrency {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(end) {
					c, br, err := open(time.Now().Add(5 * time.Second))
					if err != nil {
						fail(err)
						continue
					}
					_, err = c.Write(req)
					var body []byte
					if err == nil {
						body, err = io.ReadAll(br)
					}
					c.Close()
					switch {
					case err != nil:
						fail(err)
					case !strings.Contains(string(body), "hello from the bench server"):
						fail(errors.New("no response from the bench server"))
					default:
						atomic.AddInt64(&res.Done, 1)
					}
				}
			}()
		}
		wg.Wait()
	case "stream":
		c, br, err := open(end.Add(5 * time.Second))
		if err != nil {
			return err
		}
		buf := make([]byte, 256<<10)
		for time.Now().Before(end) {
			n, err := br.Read(buf)
			res.Bytes += int64(n)
			if err != nil {
				fail(err)
				break
			}
		}
		c.Close()
		res.Done = 1
	default:
		return fmt.Errorf("-mode %q: want conns or stream", *mode)
	}
	res.Seconds = time.Since(start).Seconds()
	res.PerSec = float64(res.Done) / res.Seconds
	res.Gbps = float64(res.Bytes) * 8 / res.Seconds / 1e9
	if v, ok := firstErr.Load().(string); ok {
		res.FirstErr = v
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}
