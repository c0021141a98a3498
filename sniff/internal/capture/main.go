// Command capture records the first flight a real client sends: it listens on
// a loopback address, runs the client against it, saves the bytes of the
// first connection that sends any, and closes without answering. It never
// listens or connects anywhere but loopback. scripts/capture-first-flight.sh
// drives it to build sniff/testdata.
//
// With -udp it listens on a loopback UDP port instead and records the
// datagrams of the first client address (QUIC Initial packets, a DNS query)
// until that client pauses for -idle or -max-datagrams arrived, never
// answering; the file then holds each datagram prefixed with its two-byte
// big-endian length.
//
// Usage:
//
//	capture -out FILE [-listen 127.0.0.1:0] [-udp] [flags] -- CLIENT ARGS...
//	capture -out FILE -client go-tls|go-http|go-h2c -name HOST
//
// In CLIENT ARGS, {port} becomes the listening port and {addr} the listening
// host:port. With -manifest, a line "FILE PROTO HOST ALPN ECH" built from
// -proto, -host, -alpn and -ech is appended to the manifest on success.
package main

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
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
		out      = flag.String("out", "", "file to write the first flight to (required)")
		listen   = flag.String("listen", "127.0.0.1:0", "loopback address to listen on")
		timeout  = flag.Duration("timeout", 30*time.Second, "give up after this long")
		idle     = flag.Duration("idle", 700*time.Millisecond, "the flight is over after this long without bytes")
		client   = flag.String("client", "", "built-in client instead of a command: go-tls, go-http or go-h2c")
		name     = flag.String("name", "", "host name for a built-in client")
		manifest = flag.String("manifest", "", "manifest to append a line to on success")
		proto    = flag.String("proto", "", "manifest: expected protocol")
		host     = flag.String("host", "", "manifest: expected host, empty for none")
		alpn     = flag.String("alpn", "", "manifest: expected ALPN list, comma-separated")
		ech      = flag.Bool("ech", false, "manifest: expect encrypted_client_hello")
		udp      = flag.Bool("udp", false, "capture the datagrams of the first UDP client instead")
		maxDgram = flag.Int("max-datagrams", 8, "-udp: stop after this many datagrams")
		qtype    = flag.String("qtype", "", "manifest: expected DNS QTYPE (written in the ALPN column)")
	)
	flag.Parse()
	args := flag.Args()
	if *out == "" || (*client == "") == (len(args) == 0) {
		return errors.New("need -out and either -client or a command after --")
	}
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("-listen %q: not a loopback address and port", *listen)
	}

	flights := make(chan []byte, 1)
	var addr string
	if *udp {
		if *client != "" {
			return errors.New("-udp takes a command, not -client")
		}
		pc, err := net.ListenPacket("udp", *listen)
		if err != nil {
			return err
		}
		defer pc.Close()
		addr = pc.LocalAddr().String()
		go readDatagrams(pc, *idle, *maxDgram, flights)
	} else {
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return err
		}
		defer ln.Close()
		addr = ln.Addr().String()
		go accept(ln, *idle, flights)
	}
	_, port, _ := net.SplitHostPort(addr)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	clientDone := make(chan error, 1)
	if *client != "" {
		go func() { clientDone <- builtin(ctx, *client, *name, addr) }()
	} else {
		for i, a := range args {
			a = strings.ReplaceAll(a, "{port}", port)
			args[i] = strings.ReplaceAll(a, "{addr}", addr)
		}
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, io.Discard, os.Stderr
		setProcessGroup(cmd)
		// On cancel, SIGTERM the group: timeout(1) passes it on to the
		// group it made for its own child.
		cmd.Cancel = func() error { return signalGroup(cmd, syscall.SIGTERM) }
		cmd.WaitDelay = 3 * time.Second
		if err := cmd.Start(); err != nil {
			return err
		}
		defer signalGroup(cmd, syscall.SIGKILL)
		go func() { clientDone <- cmd.Wait() }()
	}
	defer func() {
		cancel()
		select {
		case <-clientDone:
		case <-time.After(5 * time.Second):
		}
	}()

	var flight []byte
	select {
	case flight = <-flights:
	case err := <-clientDone:
		// The client gave up; a flight may still be in its idle wait.
		select {
		case flight = <-flights:
		case <-time.After(*idle + time.Second):
			return fmt.Errorf("%s: client ended without sending anything (%v)", *out, err)
		}
	case <-ctx.Done():
		return fmt.Errorf("%s: no flight within %v", *out, *timeout)
	}

	if err := writeFile(*out, flight); err != nil {
		return err
	}
	log.Printf("%s: %d bytes", *out, len(flight))
	if *manifest != "" {
		third := *alpn
		if *qtype != "" {
			third = *qtype
		}
		line := strings.Join([]string{filepath.Base(*out), *proto, dash(*host), dash(third), yesNo(*ech)}, " ")
		f, err := os.OpenFile(*manifest, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			_, err = fmt.Fprintln(f, line)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// accept serves connections until ln closes and sends the first non-empty
// flight on flights.
func accept(ln net.Listener, idle time.Duration, flights chan<- []byte) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			if b := readFlight(c, idle); len(b) > 0 {
				select {
				case flights <- b:
				default: // another connection was first
				}
			}
		}()
	}
}

// readFlight reads what c sends until it pauses for idle, closes, or sends
// 64 KiB, and never writes.
func readFlight(c net.Conn, idle time.Duration) []byte {
	var b []byte
	buf := make([]byte, 64<<10)
	c.SetReadDeadline(time.Now().Add(20 * time.Second)) // the first byte
	for len(b) < len(buf) {
		n, err := c.Read(buf[:len(buf)-len(b)])
		b = append(b, buf[:n]...)
		if err != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(idle))
	}
	return b
}

// readDatagrams records the datagrams the first client address sends to
// pc until it pauses for idle or max arrived, and sends them, each prefixed
// with its two-byte big-endian length, on flights. It never writes.
func readDatagrams(pc net.PacketConn, idle time.Duration, max int, flights chan<- []byte) {
	var out []byte
	var from string
	buf := make([]byte, 64<<10)
	pc.SetReadDeadline(time.Now().Add(20 * time.Second)) // the first datagram
	for n := 0; n < max; {
		k, a, err := pc.ReadFrom(buf)
		if err != nil {
			break
		}
		if from == "" {
			from = a.String()
		} else if a.String() != from {
			continue // another client or another connection: not this flow
		}
		out = binary.BigEndian.AppendUint16(out, uint16(k))
		out = append(out, buf[:k]...)
		n++
		pc.SetReadDeadline(time.Now().Add(idle))
	}
	if len(out) > 0 {
		flights <- out
	}
}

// builtin runs one of the Go clients against addr, naming host.
func builtin(ctx context.Context, kind, host, addr string) error {
	if host == "" {
		return errors.New("built-in clients need -name")
	}
	_, port, _ := net.SplitHostPort(addr)
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr) // whatever the URL says: loopback only
	}
	switch kind {
	case "go-tls":
		d := tls.Dialer{Config: &tls.Config{
			ServerName:         host,
			NextProtos:         []string{"h2", "http/1.1"},
			InsecureSkipVerify: true, // the listener never answers anyway
		}}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	case "go-http", "go-h2c":
		t := &http.Transport{DialContext: dial}
		if kind == "go-h2c" {
			t.Protocols = new(http.Protocols)
			t.Protocols.SetUnencryptedHTTP2(true)
		}
		defer t.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, "GET", "http://"+net.JoinHostPort(host, port)+"/index.html", nil)
		if err != nil {
			return err
		}
		resp, err := (&http.Client{Transport: t}).Do(req)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	return fmt.Errorf("unknown built-in client %q", kind)
}

func writeFile(name string, b []byte) error {
	tmp := name + ".tmp" + strconv.Itoa(os.Getpid())
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, name)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "ech"
	}
	return "-"
}
