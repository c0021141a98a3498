// Command capture records what a real upstream proxy (dante, microsocks,
// squid) answers to detour's client handshake: it runs upstream.Handshake
// against the proxy, asks it for a target (with {banner} or {banner6}, a
// loopback server of its own that speaks first, as an SSH server does; with
// {dead}, a loopback port nobody listens on), and saves every byte the
// proxy sent: the method selection, the authentication reply, the reply,
// and the server's first bytes behind it. It never connects anywhere but
// loopback. scripts/capture-upstream-replies.sh drives it to build
// tunnel/upstream/testdata/replies, the seed corpus of the reply fuzz
// targets.
//
// Usage:
//
//	capture -out FILE -proxy socks5://[user:pass@]127.0.0.1:PORT -target HOST:PORT
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/detour-proxy/detour/tunnel/upstream"
)

// banner is what the capture's own server sends first.
const banner = "SSH-2.0-OpenSSH_9.6 detour-capture\r\n"

func main() {
	log.SetFlags(0)
	log.SetPrefix("capture: ")
	if err := run(); err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

func run() error {
	var (
		out     = flag.String("out", "", "file to write the proxy's bytes to (required)")
		proxy   = flag.String("proxy", "", "the proxy's URL, as --upstream takes it; loopback only (required)")
		target  = flag.String("target", "", "what to ask the proxy for: HOST:PORT, with {banner}, {banner6} or {dead} for a port (required)")
		timeout = flag.Duration("timeout", 20*time.Second, "give up after this long")
	)
	flag.Parse()
	if *out == "" || *proxy == "" || *target == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	u, err := upstream.Parse(*proxy, nil)
	if err != nil {
		return err
	}
	addr, ok := u.ProxyAddr()
	if !ok || !addr.Addr().IsLoopback() {
		return fmt.Errorf("proxy %s: want a loopback IP literal", u.Name)
	}
	t, err := expandTarget(*target)
	if err != nil {
		return err
	}
	got, err := converse(u, addr, t, time.Now().Add(*timeout))
	if err != nil {
		return err
	}
	if len(got) == 0 {
		return errors.New("the proxy sent nothing")
	}
	if err := os.WriteFile(*out, got, 0o644); err != nil {
		return err
	}
	log.Printf("%s: %d bytes from %s for %s", *out, len(got), u.Name, t)
	return nil
}

// expandTarget replaces {banner}, {banner6} and {dead} in target with
// ports of servers of its own on 127.0.0.1 and ::1, and of none.
func expandTarget(target string) (string, error) {
	for _, s := range []struct{ key, network, addr string }{
		{"{banner}", "tcp4", "127.0.0.1:0"},
		{"{banner6}", "tcp6", "[::1]:0"},
	} {
		if !strings.Contains(target, s.key) {
			continue
		}
		ln, err := net.Listen(s.network, s.addr)
		if err != nil {
			return "", err
		}
		go serveBanner(ln)
		target = strings.ReplaceAll(target, s.key, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	if strings.Contains(target, "{dead}") {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		target = strings.ReplaceAll(target, "{dead}", strconv.Itoa(port))
	}
	return target, nil
}

// serveBanner greets every connection with banner and holds it until the
// peer closes.
func serveBanner(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.WriteString(c, banner)
			io.Copy(io.Discard, c)
		}()
	}
}

// converse runs the handshake for target through u at addr and returns
// all the proxy sent: up to the end of the reply and, after it, what
// comes within 500 ms (the banner), or until the proxy closes.
func converse(u *upstream.Upstream, addr netip.AddrPort, target string, deadline time.Time) ([]byte, error) {
	h, ok := u.Handshake()
	if !ok {
		return nil, fmt.Errorf("%s has no handshake", u.Name)
	}
	c, err := net.DialTimeout("tcp", addr.String(), time.Until(deadline))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(deadline)
	var got []byte
	buf := make([]byte, 4096)
	for !h.Done() {
		out := h.Out(nil)
		if h.Prepared() {
			if out, err = h.Request(out, target); err != nil {
				return nil, err
			}
		}
		if len(out) > 0 {
			if _, err := c.Write(out); err != nil {
				return nil, err
			}
		}
		n, rerr := c.Read(buf)
		got = append(got, buf[:n]...)
		if _, err := h.Feed(buf[:n]); err != nil {
			log.Printf("the proxy's answer ends the handshake: %v", err)
			return drain(c, got), nil
		}
		if rerr != nil {
			log.Printf("%v", h.ReadError(rerr))
			return got, nil
		}
	}
	return drain(c, got), nil
}

// drain appends to got what c sends within 500 ms, or until it closes.
func drain(c net.Conn, got []byte) []byte {
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	rest, _ := io.ReadAll(c)
	return append(got, rest...)
}
