package test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	cryptorand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"math/big"
	"math/rand/v2"
	"net"
	"net/http"
	"testing"
	"time"
)

// Ports of the servers in the server namespace.
const (
	httpPort  = 80
	httpsPort = 443
	sshPort   = 2222 // a server-first service (banner, then echo)
	bulkPort  = 9000
)

// startServers runs, in the server namespace, HTTP on port 80 and HTTPS
// (self-signed, any *.test name) on 443 that tell each client the address
// they see, a server-first banner service on ports 22 and 2222, and a bulk
// server on port 9000
// whose first byte from the client picks a behaviour:
//
//	'U' data… EOF  → replies with the hex SHA-256 of data, closes
//	'D' n (8 bytes) → sends n bytes of stream(n), closes
//	'H' data… EOF  → then sends 1 MiB of stream(1 MiB), closes (half-close)
//	'R' x          → resets the connection after reading one more byte
//	'E' data… EOF  → echoes, closes
//	'I' data… EOF  → replies "I", then reads until EOF with plain reads (no
//	                 splice pipe: an idle connection costs one socket), closes
func startServers(t *testing.T, tp *topo) {
	t.Helper()
	greet := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintf(w, "hello from the server namespace; you are %s\n", host)
	})
	// Clients that send garbage or give up mid-handshake are part of the
	// tests: the servers need not log them.
	quiet := log.New(io.Discard, "", 0)
	go (&http.Server{Handler: greet, ErrorLog: quiet}).Serve(listenIn(t, tp.S, fmt.Sprintf("[::]:%d", httpPort)))
	tln := listenIn(t, tp.S, fmt.Sprintf("[::]:%d", httpsPort))
	srv := &http.Server{Handler: greet, ErrorLog: quiet, TLSConfig: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}
	go srv.ServeTLS(tln, "", "")
	t.Cleanup(func() { srv.Close() })
	for _, port := range []int{sshPort, 22} {
		banner(t, listenIn(t, tp.S, fmt.Sprintf("[::]:%d", port)))
	}
	bln := listenIn(t, tp.S, fmt.Sprintf("[::]:%d", bulkPort))
	go func() {
		for {
			c, err := bln.AcceptTCP()
			if err != nil {
				return
			}
			go bulk(c)
		}
	}()
}

func bulk(c *net.TCPConn) {
	defer c.Close()
	var op [1]byte
	if _, err := io.ReadFull(c, op[:]); err != nil {
		return
	}
	switch op[0] {
	case 'U':
		h := sha256.New()
		io.Copy(h, c)
		io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
	case 'D':
		var n [8]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		io.CopyN(c, stream(int64(binary.BigEndian.Uint64(n[:]))), int64(binary.BigEndian.Uint64(n[:])))
	case 'H':
		io.Copy(io.Discard, c)
		io.CopyN(c, stream(1<<20), 1<<20)
	case 'R':
		io.ReadFull(c, op[:])
		c.SetLinger(0)
	case 'E':
		io.Copy(c, c)
	case 'I':
		c.Write([]byte{'I'})
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}
}

// stream is a deterministic pseudo-random byte stream seeded by its length,
// so both ends can produce it independently.
func stream(n int64) io.Reader {
	var seed [32]byte
	binary.BigEndian.PutUint64(seed[:], uint64(n))
	return rand.NewChaCha8(seed)
}

func streamSum(n int64) string {
	h := sha256.New()
	io.CopyN(h, stream(n), n)
	return hex.EncodeToString(h.Sum(nil))
}

// selfSigned makes a throwaway certificate for any name.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), cryptorand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "detour test server"},
		DNSNames:     []string{"*.test", "site.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
	der, err := x509.CreateCertificate(cryptorand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// banner serves a server-first protocol on ln, like SSH: a banner line as
// soon as the client connects, then an echo.
func banner(t *testing.T, ln *net.TCPListener) {
	bannerAfter(ln, 0, "SSH-2.0-detour-test\r\n")
}

// bannerAfter serves greeting on ln delay after each accept (a server that
// answers a little late), then an echo.
func bannerAfter(ln *net.TCPListener, delay time.Duration, greeting string) {
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				time.Sleep(delay)
				io.WriteString(c, greeting)
				io.Copy(c, c)
			}()
		}
	}()
}
