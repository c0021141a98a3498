package test

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"testing"
)

// Ports of the servers in the server namespace.
const (
	httpPort = 80
	bulkPort = 9000
)

// startServers runs, in the server namespace, an HTTP server on port 80 that
// tells each client the address it sees, and a bulk server on port 9000
// whose first byte from the client picks a behaviour:
//
//	'U' data… EOF  → replies with the hex SHA-256 of data, closes
//	'D' n (8 bytes) → sends n bytes of stream(n), closes
//	'H' data… EOF  → then sends 1 MiB of stream(1 MiB), closes (half-close)
//	'R' x          → resets the connection after reading one more byte
//	'E' data… EOF  → echoes, closes
//	'B'            → sends a banner first, then echoes (server-first protocols)
func startServers(t *testing.T, tp *topo) {
	t.Helper()
	hln := listenIn(t, tp.S, fmt.Sprintf("[::]:%d", httpPort))
	go http.Serve(hln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprintf(w, "hello from the server namespace; you are %s\n", host)
	}))
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
	case 'B':
		io.WriteString(c, "SSH-2.0-detour-test\r\n")
		io.Copy(c, c)
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
