// Command capture records what a real proxy client sends to a proxy port:
// it listens on a loopback address, runs the client against it, and saves
// every byte of the first connection's request (an HTTP request head, or a
// SOCKS greeting, authentication and request), answering the handshake as
// far as the request and then refusing it. It never listens or connects
// anywhere but loopback. scripts/capture-proxy-flights.sh drives it to
// build tunnel/proxyport/testdata/flights.
//
// Usage:
//
//	capture -out FILE [-listen 127.0.0.1:0] [-users user:pass] [-host NAME] -- CLIENT ARGS...
//
// In CLIENT ARGS, {addr} becomes the listening host:port and {port} the
// port.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/tunnel/proxyport"
)

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
		out     = flag.String("out", "", "file to write the client's bytes to (required)")
		listen  = flag.String("listen", "127.0.0.1:0", "loopback address to listen on")
		timeout = flag.Duration("timeout", 30*time.Second, "give up after this long")
		creds   = flag.String("users", "", "user:pass the SOCKS5 handshake asks for (none: no authentication)")
		host    = flag.String("host", "", "record only a request for this host (browsers send their own requests too)")
	)
	flag.Parse()
	args := flag.Args()
	if *out == "" || len(args) == 0 {
		return errors.New("need -out and a command after --")
	}
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("-listen %q: not a loopback address and port", *listen)
	}
	var users proxyport.Users
	if *creds != "" {
		u, p, _ := strings.Cut(*creds, ":")
		users = proxyport.Users{u: p}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	defer ln.Close()
	addr := ln.Addr().String()
	_, port, _ := net.SplitHostPort(addr)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	for i, a := range args {
		args[i] = strings.NewReplacer("{addr}", addr, "{port}", port).Replace(a)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	if err := cmd.Start(); err != nil {
		return err
	}
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	}()

	got := make(chan []byte, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if b := record(c, users, *host); len(b) > 0 {
				got <- b
				return
			}
		}
	}()
	select {
	case b := <-got:
		return os.WriteFile(*out, b, 0o644)
	case <-ctx.Done():
		return fmt.Errorf("%s: no request within %s", args[0], *timeout)
	}
}

// record reads one request from c, answering a SOCKS handshake up to it,
// and returns every byte the client sent meanwhile.
func record(c net.Conn, users proxyport.Users, host string) []byte {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var rec bytes.Buffer
	br := bufio.NewReaderSize(io.TeeReader(c, &rec), 64<<10)
	first, err := br.Peek(1)
	if err != nil {
		return nil
	}
	switch proxyport.Detect(first[0]) {
	case proxyport.HTTP:
		r, err := proxyport.ReadRequest(br, proxyport.Limits{})
		if err != nil {
			log.Printf("request: %v", err)
			return nil
		}
		if _, err := proxyport.CopyBody(io.Discard, br, r.Chunked, r.ContentLength); err != nil {
			log.Printf("request body: %v", err)
			return nil
		}
		c.Write(proxyport.AppendError(nil, 502, "captured"))
		if host != "" && r.Host != host {
			return nil
		}
	case proxyport.SOCKS5, proxyport.SOCKS4:
		req, err := proxyport.ReadSOCKS(br, c, users, false)
		if err != nil {
			log.Printf("socks: %v", err)
			return nil
		}
		proxyport.WriteSOCKSReply(c, req.Version, proxyport.RepConnectionRefused, netip.AddrPort{})
		if host != "" && req.Host != host {
			return nil
		}
	default:
		return nil
	}
	return rec.Bytes()
}
