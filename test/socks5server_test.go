package test

// A small SOCKS5 server in this process, listening in the upstream
// namespace, so a test can kill one mid-transfer and count what each
// carried.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
)

// socks5Server is a minimal SOCKS5 proxy (RFC 1928: no authentication,
// CONNECT only) in the upstream namespace. It resolves every name to the
// server's IPv4 address, passes a FIN on as a FIN and a reset as a reset,
// and counts what it carried. kill makes it vanish as a crashed proxy
// would: its listener closes and every connection it holds is reset.
type socks5Server struct {
	url    string // as detour names it: socks5://198.18.3.2:PORT
	ln     *net.TCPListener
	ns     string // the upstream namespace: outbound dials start there
	served atomic.Int64
	active atomic.Int64

	mu      sync.Mutex
	conns   map[*net.TCPConn]struct{}
	targets []string
	killed  bool
	wg      sync.WaitGroup
}

func startSOCKS5(t *testing.T, tp *topo, port int) *socks5Server {
	t.Helper()
	s := &socks5Server{
		url:   fmt.Sprintf("socks5://%s", net.JoinHostPort(families[0].upstream, strconv.Itoa(port))),
		ln:    listenIn(t, tp.U, net.JoinHostPort(families[0].upstream, strconv.Itoa(port))),
		ns:    tp.U,
		conns: map[*net.TCPConn]struct{}{},
	}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(func() {
		s.kill()
		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("SOCKS5 server %s: connections still open 10s after it was killed", s.url)
		}
	})
	return s
}

func (s *socks5Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptTCP()
		if err != nil {
			return
		}
		if !s.track(c) {
			continue
		}
		s.wg.Add(1)
		go s.handle(c)
	}
}

// track adds c to the connections kill resets, or resets c at once if the
// server was killed already.
func (s *socks5Server) track(c *net.TCPConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.killed {
		c.SetLinger(0)
		c.Close()
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *socks5Server) untrack(c *net.TCPConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// kill closes the listener and resets every connection.
func (s *socks5Server) kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.killed = true
	s.ln.Close()
	for c := range s.conns {
		c.SetLinger(0)
		c.Close()
	}
}

func (s *socks5Server) requested() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.targets...)
}

func (s *socks5Server) handle(c *net.TCPConn) {
	defer s.wg.Done()
	defer s.untrack(c)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	target, err := socks5Handshake(c)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.targets = append(s.targets, target)
	s.mu.Unlock()
	host, port, _ := net.SplitHostPort(target)
	if net.ParseIP(host) == nil {
		host = families[0].server // every name is the server
	}
	up, err := nsDial(s.ns, net.JoinHostPort(host, port), 5*time.Second)
	if err != nil {
		c.Write([]byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0}) // connection refused
		return
	}
	defer up.Close()
	if !s.track(up) {
		return
	}
	defer s.untrack(up)
	if _, err := c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0}); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	s.served.Add(1)
	s.active.Add(1)
	defer s.active.Add(-1)
	var wg sync.WaitGroup
	pipe := func(dst, src *net.TCPConn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if err != nil {
			// A reset (or a kill) on one side: reset the other.
			dst.SetLinger(0)
			dst.Close()
			src.Close()
			return
		}
		dst.CloseWrite()
	}
	wg.Add(2)
	go pipe(up, c)
	go pipe(c, up)
	wg.Wait()
}

// socks5Handshake answers the greeting (no authentication) and reads a
// CONNECT request; it returns the target as host:port.
func socks5Handshake(c *net.TCPConn) (string, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != 5 {
		return "", fmt.Errorf("greeting: %v", err)
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil || bytes.IndexByte(methods, 0) < 0 {
		c.Write([]byte{5, 0xff})
		return "", errors.New("no acceptable method")
	}
	if _, err := c.Write([]byte{5, 0}); err != nil {
		return "", err
	}
	var req [4]byte
	if _, err := io.ReadFull(c, req[:]); err != nil || req[0] != 5 || req[1] != 1 {
		c.Write([]byte{5, 7, 0, 1, 0, 0, 0, 0, 0, 0})
		return "", fmt.Errorf("request %v: %v", req, err)
	}
	if req[3] != 1 && req[3] != 3 && req[3] != 4 {
		c.Write([]byte{5, 8, 0, 1, 0, 0, 0, 0, 0, 0})
		return "", fmt.Errorf("address type %d", req[3])
	}
	return testkit.ReadSOCKSAddr(c, req[3])
}

// ---- the tests ----
