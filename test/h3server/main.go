// Command h3server is the tests' HTTP/3 server (and client), on quic-go: a
// test-only dependency, imported nowhere else. It is built by the tests and
// by scripts/capture-first-flight.sh, never shipped.
//
// Server: serves one page over HTTP/3 (QUIC v1 and v2, on UDP) and over
// HTTPS with HTTP/2 and HTTP/1.1 (on TCP) at the same port number; the TCP
// responses carry Alt-Svc so a browser may switch to HTTP/3. The
// certificate is self-signed, made at start for the -name names. Once both
// sockets listen it prints, on stdout:
//
//	spki BASE64      the certificate's SPKI SHA-256, for Chromium's
//	                 --ignore-certificate-errors-spki-list
//	listening HOST:PORT
//
// and then one line per request:
//
//	request proto=HTTP/3.0 host=site.test path=/ remote=198.18.0.1:40000
//
// Chromium over QUIC against it, in the client namespace:
//
//	chromium --headless --no-sandbox --enable-quic \
//	  --origin-to-force-quic-on=site.test:443 \
//	  --host-resolver-rules="MAP site.test 198.18.1.2, MAP * ~NOTFOUND" \
//	  --ignore-certificate-errors-spki-list=BASE64 \
//	  --dump-dom https://site.test/
//
// prints the page (the body names the protocol it came over: "via HTTP/3.0").
//
//	h3server [-listen 127.0.0.1:0] [-name site.test,...] [-body TEXT] [-quic-version 1|2|both]
//
// Client: one GET over HTTP/3, printing the status line and body; it skips
// certificate checks. -connect sends the packets to that address whatever
// the URL's host says (the URL still gives SNI and :authority).
//
//	h3server -client URL [-connect HOST:PORT] [-quic-version 1|2] [-timeout 10s]
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("h3server: ")
	var (
		listen  = flag.String("listen", "127.0.0.1:0", "address for both the UDP (HTTP/3) and the TCP (HTTPS) socket")
		names   = flag.String("name", "site.test", "comma-separated DNS names of the certificate")
		body    = flag.String("body", "hello from h3server", "the page's text")
		version = flag.String("quic-version", "", "QUIC version: 1, 2 or both (server default both, client default 1)")
		client  = flag.String("client", "", "client mode: GET this https URL over HTTP/3")
		connect = flag.String("connect", "", "client mode: send to this address instead of the URL's host")
		timeout = flag.Duration("timeout", 10*time.Second, "client mode: give up after this long")
	)
	flag.Parse()
	versions, err := parseVersions(*version, *client != "")
	if err != nil {
		log.Print(err)
		os.Exit(2)
	}
	if *client != "" {
		err = runClient(*client, *connect, versions, *timeout)
	} else {
		err = runServer(*listen, strings.Split(*names, ","), *body, versions)
	}
	if err != nil {
		log.Print(err)
		os.Exit(1)
	}
}

func parseVersions(s string, client bool) ([]quic.Version, error) {
	switch s {
	case "1":
		return []quic.Version{quic.Version1}, nil
	case "2":
		return []quic.Version{quic.Version2}, nil
	case "both":
		return []quic.Version{quic.Version1, quic.Version2}, nil
	case "":
		if client {
			return []quic.Version{quic.Version1}, nil
		}
		return []quic.Version{quic.Version1, quic.Version2}, nil
	}
	return nil, fmt.Errorf("-quic-version %q: want 1, 2 or both", s)
}

func runServer(listen string, names []string, body string, versions []quic.Version) error {
	cert, spki, err := selfSigned(names)
	if err != nil {
		return err
	}
	udp, tcp, err := listenBoth(listen)
	if err != nil {
		return err
	}
	var out sync.Mutex
	println := func(format string, args ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	tlsConf := &tls.Config{Certificates: []tls.Certificate{cert}}
	h3 := &http3.Server{
		TLSConfig:  http3.ConfigureTLSConfig(tlsConf),
		QUICConfig: &quic.Config{Versions: versions},
	}
	h3.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		println("request proto=%s host=%s path=%s remote=%s", r.Proto, r.Host, r.URL.Path, r.RemoteAddr)
		if r.ProtoMajor < 3 {
			h3.SetQUICHeaders(w.Header()) // Alt-Svc: h3=":port"
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, "<!doctype html><title>h3server</title><p id=body>%s via %s</p>\n", body, r.Proto)
	})
	h1 := &http.Server{
		Handler:   h3.Handler,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	errs := make(chan error, 2)
	go func() { errs <- h3.Serve(udp) }()
	go func() { errs <- h1.ServeTLS(tcp, "", "") }()
	println("spki %s", spki)
	println("listening %s", udp.LocalAddr())

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case <-sig:
	case err = <-errs:
	}
	h3.Close()
	h1.Close()
	return err
}

// listenBoth opens a UDP and a TCP socket on the same address and port; for
// port 0 it retries until a port is free for both.
func listenBoth(addr string) (net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("-listen %q: %v", addr, err)
	}
	for range 20 {
		udp, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, err
		}
		_, p, _ := net.SplitHostPort(udp.LocalAddr().String())
		tcp, err := net.Listen("tcp", net.JoinHostPort(host, p))
		if err == nil {
			return udp, tcp, nil
		}
		udp.Close()
		if port != "0" {
			return nil, nil, err
		}
	}
	return nil, nil, errors.New("no port free for both UDP and TCP")
}

// selfSigned makes a certificate for names and returns it with the base64
// SHA-256 of its SubjectPublicKeyInfo.
func selfSigned(names []string) (tls.Certificate, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	sum := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, base64.StdEncoding.EncodeToString(sum[:]), nil
}

func runClient(url, connect string, versions []quic.Version, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tr := &http3.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, // a test server's self-signed certificate
		QUICConfig:      &quic.Config{Versions: versions},
	}
	if connect != "" {
		tr.Dial = func(ctx context.Context, _ string, tlsConf *tls.Config, conf *quic.Config) (*quic.Conn, error) {
			return quic.DialAddrEarly(ctx, connect, tlsConf, conf)
		}
	}
	defer tr.Close()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	fmt.Printf("%s %s\n", resp.Proto, resp.Status)
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		fmt.Println(sc.Text())
	}
	return sc.Err()
}
