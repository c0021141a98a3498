//go:build linux

package main

// The small programs the bench runs inside its namespaces, as subcommands of
// its own binary (`bench helper NAME ...`): a splice-based SOCKS5 upstream,
// a server that holds idle connections and a client that opens them, and a
// TLS server and client for the cost of sniffing. They talk to the bench by
// lines on stdin and stdout and end when stdin closes.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
)

// helperNofile is the open-file limit the helpers ask for: they are test
// equipment and should not be what runs out of descriptors first. Where
// the hard limit cannot be raised (no CAP_SYS_RESOURCE) they keep the hard
// limit, to which Go raises the soft one at start.
const helperNofile = 200000

func runHelper(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: bench helper socks5|holdserver|holdclient|tlsserver|tlsclient|minproxy|source|connectload|udpsessions|ctflush [flags]")
	}
	raiseNofile(helperNofile)
	switch args[0] {
	case "socks5":
		return socks5Main(args[1:])
	case "holdserver":
		return holdServerMain(args[1:])
	case "holdclient":
		return holdClientMain()
	case "tlsserver":
		return tlsServerMain(args[1:])
	case "tlsclient":
		return tlsClientMain(args[1:])
	case "minproxy":
		return minProxyMain(args[1:])
	case "source":
		return sourceMain(args[1:])
	case "connectload":
		return connectLoadMain(args[1:])
	case "udpsessions":
		return udpSessionsMain(args[1:])
	case "ctflush":
		// conntrack -F: a candidate must not inherit the NAT bindings of
		// the one before (a reused client port would follow them).
		return netlink.ConntrackTableFlush(netlink.ConntrackTable)
	}
	return fmt.Errorf("unknown helper %q", args[0])
}

func raiseNofile(n uint64) {
	lim := syscall.Rlimit{Cur: n, Max: n}
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}

// acceptLoop serves ln until it is closed, retrying temporary errors
// (EMFILE) after a short pause.
func acceptLoop(ln net.Listener, serve func(*net.TCPConn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serve(c.(*net.TCPConn))
	}
}

// waitStdin blocks until the bench closes the helper's stdin.
func waitStdin() {
	io.Copy(io.Discard, os.Stdin)
}

// socks5Main is a minimal SOCKS5 server (RFC 1928: no authentication,
// CONNECT only) that relays with io.Copy between bare *net.TCPConn, so both
// directions splice: an upstream fast enough not to be the bottleneck.
func socks5Main(args []string) error {
	fs := flag.NewFlagSet("socks5", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to serve")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	go acceptLoop(ln, socksConn)
	waitStdin()
	return nil
}

func socksConn(c *net.TCPConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [256]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil || b[0] != 5 {
		return
	}
	if _, err := io.ReadFull(c, b[:b[1]]); err != nil {
		return
	}
	if _, err := c.Write([]byte{5, 0}); err != nil {
		return
	}
	if _, err := io.ReadFull(c, b[:4]); err != nil || b[0] != 5 || b[1] != 1 {
		return
	}
	var host string
	switch b[3] {
	case 1, 4:
		ip := make(net.IP, 4)
		if b[3] == 4 {
			ip = make(net.IP, 16)
		}
		if _, err := io.ReadFull(c, ip); err != nil {
			return
		}
		host = ip.String()
	case 3:
		if _, err := io.ReadFull(c, b[:1]); err != nil {
			return
		}
		n := int(b[0])
		if _, err := io.ReadFull(c, b[:n]); err != nil {
			return
		}
		host = string(b[:n])
	default:
		return
	}
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return
	}
	port := binary.BigEndian.Uint16(b[:2])
	s, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(int(port))), 5*time.Second)
	if err != nil {
		c.Write([]byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0})
		return
	}
	defer s.Close()
	if _, err := c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0}); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	relayPair(c, s.(*net.TCPConn))
}

// relayPair copies both ways until both directions end; EOF half-closes the
// other side, an error closes both.
func relayPair(a, b *net.TCPConn) {
	done := make(chan struct{})
	one := func(dst, src *net.TCPConn) {
		if _, err := io.Copy(dst, src); err != nil {
			a.Close()
			b.Close()
			return
		}
		dst.CloseWrite()
	}
	go func() { one(b, a); close(done) }()
	one(a, b)
	<-done
}

// minProxyMain is the least a Go transparent proxy does, for reference: a
// REDIRECT listener (IPv4), the original destination from SO_ORIGINAL_DST,
// a dial carrying the socket mark the bench's rules exempt, and io.Copy
// between bare *net.TCPConn both ways (splice). No sniffing, no routing,
// no timeouts, no log.
func minProxyMain(args []string) error {
	fs := flag.NewFlagSet("minproxy", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to serve")
	if err := fs.Parse(args); err != nil {
		return err
	}
	mark, err := strconv.ParseInt(minMark, 0, 32)
	if err != nil {
		return err
	}
	d := &net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := net.Listen("tcp4", *listen)
	if err != nil {
		return err
	}
	go acceptLoop(ln, func(c *net.TCPConn) {
		defer c.Close()
		dst, err := originalDst(c)
		if err != nil {
			return
		}
		s, err := d.Dial("tcp", dst)
		if err != nil {
			return
		}
		defer s.Close()
		relayPair(c, s.(*net.TCPConn))
	})
	waitStdin()
	return nil
}

// originalDst reads SO_ORIGINAL_DST (IPv4) of a redirected connection.
func originalDst(c *net.TCPConn) (string, error) {
	const soOriginalDst = 80
	rc, err := c.SyscallConn()
	if err != nil {
		return "", err
	}
	var sa syscall.RawSockaddrInet4
	var serr error
	err = rc.Control(func(fd uintptr) {
		size := uint32(syscall.SizeofSockaddrInet4)
		_, _, errno := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.SOL_IP, soOriginalDst,
			uintptr(unsafe.Pointer(&sa)), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
		}
	})
	if err != nil {
		return "", err
	}
	if serr != nil {
		return "", serr
	}
	port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
	return net.JoinHostPort(net.IP(sa.Addr[:]).String(), strconv.Itoa(int(port))), nil
}

// holdServerMain accepts connections, answers the first byte with one byte
// and then holds them, idle, until the peer closes. "stats" on stdin prints
// the connections open now by peer address, as JSON.
func holdServerMain(args []string) error {
	fs := flag.NewFlagSet("holdserver", flag.ContinueOnError)
	listen := fs.String("listen", "", "address to serve")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	open := map[string]int{}
	go acceptLoop(ln, func(c *net.TCPConn) {
		defer c.Close()
		var one [1]byte
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(one[:]); err != nil {
			return
		}
		if _, err := c.Write(one[:]); err != nil {
			return
		}
		c.SetDeadline(time.Time{})
		host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
		mu.Lock()
		open[host]++
		mu.Unlock()
		for {
			if _, err := c.Read(one[:]); err != nil {
				break
			}
		}
		mu.Lock()
		open[host]--
		if open[host] == 0 {
			delete(open, host)
		}
		mu.Unlock()
	})
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() != "stats" {
			continue
		}
		mu.Lock()
		out, _ := json.Marshal(open)
		mu.Unlock()
		fmt.Println(string(out))
	}
	return nil
}

// holdReply is the holdclient's answer to "open" and "close".
type holdReply struct {
	OK   int    `json:"ok"`   // connections opened end to end by this command
	Fail int    `json:"fail"` // connections that failed
	Held int    `json:"held"` // connections held now
	Err  string `json:"err,omitempty"`
}

// holdClientMain holds connections for the bench: "open N ADDR" opens N
// connections to ADDR, each proven end to end (one byte there, one byte
// back) and then left idle; "close" closes them all.
func holdClientMain() error {
	var held []net.Conn
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		var r holdReply
		switch {
		case len(f) == 3 && f[0] == "open":
			n, err := strconv.Atoi(f[1])
			if err != nil || n < 0 || n > 100000 {
				r.Err = "bad count " + f[1]
				break
			}
			conns, fail, firstErr := openHeld(n, f[2])
			held = append(held, conns...)
			r.OK, r.Fail = len(conns), fail
			if firstErr != nil {
				r.Err = firstErr.Error()
			}
		case len(f) == 1 && f[0] == "close":
			for _, c := range held {
				c.Close()
			}
			held = nil
		default:
			r.Err = "unknown command " + sc.Text()
		}
		r.Held = len(held)
		out, _ := json.Marshal(r)
		fmt.Println(string(out))
	}
	for _, c := range held {
		c.Close()
	}
	return nil
}

func openHeld(n int, addr string) (conns []net.Conn, fail int, firstErr error) {
	const workers = 128
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan struct{}, n)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				c, err := holdOne(addr)
				mu.Lock()
				if err != nil {
					fail++
					if firstErr == nil {
						firstErr = err
					}
				} else {
					conns = append(conns, c)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return conns, fail, firstErr
}

func holdOne(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	// One byte that is neither TLS nor HTTP, so a sniffer gives up at once.
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var one = [1]byte{0}
	if _, err := c.Write(one[:]); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("no answer through the path: %w", err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// tlsServerMain serves TLS (a fresh self-signed ECDSA certificate for
// bench.example) on each listed address: a full handshake, then close.
func tlsServerMain(args []string) error {
	fs := flag.NewFlagSet("tlsserver", flag.ContinueOnError)
	listen := fs.String("listen", "", "comma-separated addresses to serve")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cert, err := selfSigned("bench.example")
	if err != nil {
		return err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	for _, addr := range strings.Split(*listen, ",") {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		go acceptLoop(ln, func(c *net.TCPConn) {
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			tc := tls.Server(c, cfg)
			if tc.Handshake() == nil {
				io.Copy(io.Discard, tc)
			}
		})
	}
	waitStdin()
	return nil
}

func selfSigned(name string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// tlsStats is what tlsclient measured against one address, in microseconds.
type tlsStats struct {
	N            int     `json:"n"`
	Errors       int     `json:"errors"`
	FirstErr     string  `json:"first_error,omitempty"`
	FirstP50us   float64 `json:"first_response_p50_us"` // connect + ClientHello to the server's first bytes
	FirstP99us   float64 `json:"first_response_p99_us"`
	HandshakeP50 float64 `json:"handshake_p50_us"` // connect + full TLS handshake
	HandshakeP99 float64 `json:"handshake_p99_us"`
}

// firstRead notes when the first bytes arrive on a connection.
type firstRead struct {
	net.Conn
	at time.Time
}

func (f *firstRead) Read(p []byte) (int, error) {
	n, err := f.Conn.Read(p)
	if n > 0 && f.at.IsZero() {
		f.at = time.Now()
	}
	return n, err
}

// tlsClientMain makes -n sequential TLS connections (a real crypto/tls
// ClientHello, no session resumption) to each of -addrs in turn, alternating
// which goes first, and prints their latency percentiles as JSON.
func tlsClientMain(args []string) error {
	fs := flag.NewFlagSet("tlsclient", flag.ContinueOnError)
	addrList := fs.String("addrs", "", "comma-separated addresses")
	n := fs.Int("n", 1000, "connections per address")
	limit := fs.Duration("limit", time.Minute, "stop after this long whatever the count")
	if err := fs.Parse(args); err != nil {
		return err
	}
	addrs := strings.Split(*addrList, ",")
	first := make([][]float64, len(addrs))
	hs := make([][]float64, len(addrs))
	stats := make([]tlsStats, len(addrs))
	deadline := time.Now().Add(*limit)
	for i := 0; i < *n && time.Now().Before(deadline); i++ {
		for j := range addrs {
			k := (i + j) % len(addrs)
			f, h, err := tlsOnce(addrs[k])
			if err != nil {
				stats[k].Errors++
				if stats[k].FirstErr == "" {
					stats[k].FirstErr = err.Error()
				}
				continue
			}
			first[k] = append(first[k], us(f))
			hs[k] = append(hs[k], us(h))
		}
	}
	out := map[string]tlsStats{}
	for k, addr := range addrs {
		s := stats[k]
		s.N = len(first[k])
		s.FirstP50us, s.FirstP99us = percentile(first[k], 50), percentile(first[k], 99)
		s.HandshakeP50, s.HandshakeP99 = percentile(hs[k], 50), percentile(hs[k], 99)
		out[addr] = s
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func tlsOnce(addr string) (first, handshake time.Duration, err error) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	fr := &firstRead{Conn: c}
	tc := tls.Client(fr, &tls.Config{ServerName: "bench.example", InsecureSkipVerify: true})
	tc.SetDeadline(start.Add(3 * time.Second))
	if err := tc.Handshake(); err != nil {
		return 0, 0, err
	}
	handshake = time.Since(start)
	return fr.at.Sub(start), handshake, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// percentile is the nearest-rank percentile of xs (0 when empty).
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}
