package upstream

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/detour-proxy/detour/internal/testkit"
)

// loopConn is one upstream connection driven as an event loop drives it: a
// bare non-blocking socket, epoll, and the Handshake; no *net.TCPConn.
type loopConn struct {
	t     *testing.T
	fd    int
	ep    int
	until time.Time
}

// connectNonBlocking starts a non-blocking connect to addr and waits for it
// to finish.
func connectNonBlocking(t *testing.T, addr netip.AddrPort, until time.Time) (*loopConn, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	c := &loopConn{t: t, fd: fd, ep: ep, until: until}
	t.Cleanup(c.close)
	err = unix.Connect(fd, &unix.SockaddrInet4{Addr: addr.Addr().As4(), Port: int(addr.Port())})
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return c, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT, Fd: int32(fd)}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		t.Fatal(err)
	}
	if !c.wait(unix.EPOLLOUT) {
		return c, errors.New("connect: timed out")
	}
	if soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || soErr != 0 {
		return c, errors.Join(err, unix.Errno(soErr))
	}
	return c, nil
}

func (c *loopConn) close() {
	if c.fd >= 0 {
		unix.Close(c.fd)
		unix.Close(c.ep)
		c.fd = -1
	}
}

// wait waits for events (or an error or hang-up) on the socket, until the
// connection's deadline.
func (c *loopConn) wait(events uint32) bool {
	var evs [1]unix.EpollEvent
	for {
		ms := int(time.Until(c.until) / time.Millisecond)
		if ms <= 0 {
			return false
		}
		n, err := unix.EpollWait(c.ep, evs[:], ms)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			c.t.Fatal(err)
		}
		if n == 1 && evs[0].Events&(events|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			return true
		}
	}
}

// write sends all of p (a handshake message is small: it goes at once).
func (c *loopConn) write(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	n, err := unix.Write(c.fd, p)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	return err
}

// read waits until the socket is readable and reads once.
func (c *loopConn) read(buf []byte) (int, error) {
	for {
		n, err := unix.Read(c.fd, buf)
		if errors.Is(err, unix.EAGAIN) {
			if !c.wait(unix.EPOLLIN) {
				return 0, errors.New("read: timed out")
			}
			continue
		}
		if err == nil && n == 0 {
			return 0, io.EOF
		}
		return n, err
	}
}

// handshake runs h on c to the end, asking for target once prepared, and
// returns the tunnel's bytes that came with the reply.
func (c *loopConn) handshake(h *Handshake, target string) ([]byte, error) {
	buf := make([]byte, 4096)
	out := make([]byte, 0, 512)
	for !h.Done() {
		out = h.Out(out[:0])
		if h.Prepared() {
			var err error
			if out, err = h.Request(out, target); err != nil {
				return nil, err
			}
		}
		if err := c.write(out); err != nil {
			return nil, err
		}
		n, err := c.read(buf)
		if err != nil {
			return nil, h.ReadError(err)
		}
		used, err := h.Feed(buf[:n])
		if err != nil {
			return nil, err
		}
		if h.Done() {
			return buf[used:n], nil
		}
	}
	return nil, nil
}

// loopDial is an event loop's dial through g for target: Pick, connect,
// handshake, Report, and the next upstream after a failure Report allows
// to go on from; a Lease on success.
func loopDial(t *testing.T, g *Group, key, target string) (*loopConn, Lease, []byte, error) {
	var tried []*Upstream
	var errs []error
	for u := g.Pick(key, nil); u != nil; u = g.Pick(key, tried) {
		tried = append(tried, u)
		addr, ok := u.ProxyAddr()
		h, ok2 := u.Handshake()
		if !ok || !ok2 {
			t.Fatalf("%s: not usable by a loop", u.Name)
		}
		c, err := connectNonBlocking(t, addr, time.Now().Add(5*time.Second))
		var early []byte
		if err == nil {
			early, err = c.handshake(&h, target)
		}
		if err == nil {
			g.Report(u, nil)
			return c, g.Lease(u, nil), early, nil
		}
		c.close()
		errs = append(errs, err)
		if !g.Report(u, err) {
			return nil, Lease{}, nil, g.Failure(tried, errs, true)
		}
	}
	return nil, Lease{}, nil, g.Failure(tried, errs, false)
}

// An event loop on bare non-blocking sockets can use the Handshake and the
// group primitives as they are meant: through SOCKS5 (with and without
// credentials) and HTTP CONNECT the target is asked for, the server's first
// bytes that came with the reply are handed over, the tunnel works, and a
// broken upstream is failed over and benched.
func TestHandshakeOnNonBlockingSocket(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	banner := "SSH-2.0-x\r\n"
	seen := make(chan socksSeen, 4)
	heads := make(chan string, 4)
	socks := (&socksServer{seen: seen, after: banner}).start(t)
	socksAuth := (&socksServer{user: "alice", pass: "s3cret", seen: seen, after: banner}).start(t)
	httpp := httpProxy(t, "", "", heads)
	// A proxy that answers the greeting with garbage: a broken upstream.
	broken := startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) {
		io.ReadFull(c, make([]byte, 3))
		io.WriteString(c, "HTTP/1.1 400 Bad Request\r\n\r\n")
	})

	for _, tc := range []struct {
		name string
		d    Dialer
		say  string // the server's first bytes, when the proxy sends them with the reply
	}{
		{"socks5", &SOCKS5{Proxy: socks.addr}, banner},
		{"socks5 user/pass", &SOCKS5{Proxy: socksAuth.addr, User: "alice", Password: "s3cret"}, banner},
		{"http connect", &HTTPConnect{Proxy: httpp.addr}, ""},
	} {
		bad := &Upstream{Name: "broken", Dialer: &SOCKS5{Proxy: broken.addr}}
		good := &Upstream{Name: tc.name, Dialer: tc.d}
		g, _, logs := newTestGroup(bad, good)
		c, lease, early, err := loopDial(t, g, "", echo)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if lease.Upstream != good || good.Active() != 1 || bad.Up() || !strings.Contains(logs.String(), "upstream down") {
			t.Fatalf("%s: carried by %v (active %d), broken up %v; log %s", tc.name, lease.Upstream, good.Active(), bad.Up(), logs)
		}
		if string(early) != tc.say {
			t.Fatalf("%s: bytes with the reply %q, want %q", tc.name, early, tc.say)
		}
		if _, ok := tc.d.(*HTTPConnect); ok {
			if want := "CONNECT " + echo + " HTTP/1.1\r\nHost: " + echo + "\r\n\r\n"; <-heads != want {
				t.Fatalf("%s: the proxy did not get %q", tc.name, want)
			}
		}
		if err := c.write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 0, 4)
		for len(got) < 4 {
			buf := make([]byte, 4-len(got))
			n, err := c.read(buf)
			if err != nil {
				t.Fatalf("%s: echo: %v", tc.name, err)
			}
			got = append(got, buf[:n]...)
		}
		if string(got) != "ping" {
			t.Fatalf("%s: echo %q", tc.name, got)
		}
		c.close()
		lease.Release()
		if good.Active() != 0 {
			t.Fatalf("%s: active %d after release", tc.name, good.Active())
		}
	}
	// Every upstream failing: Dial's error, naming each.
	g, _, _ := newTestGroup(&Upstream{Name: "broken", Dialer: &SOCKS5{Proxy: broken.addr}},
		&Upstream{Name: "dead", Dialer: &SOCKS5{Proxy: deadPort(t)}})
	if _, lease, _, err := loopDial(t, g, "", echo); err == nil || lease.Upstream != nil ||
		!strings.Contains(err.Error(), "all 2 upstreams failed: upstream broken: ") || !strings.Contains(err.Error(), "want 0x05; upstream dead: connection refused") {
		t.Fatalf("all failing: %v", err)
	}
	for range 2 {
		if s := <-seen; s.target != echo {
			t.Fatalf("the SOCKS5 proxy was asked for %q, want %q", s.target, echo)
		}
	}
}
