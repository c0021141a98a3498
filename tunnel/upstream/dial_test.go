package upstream

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// fakeProxy is an in-process proxy on loopback: it runs serve on each
// connection it accepts. Cleanup closes the listener and every connection
// it saw and waits for its goroutines.
type fakeProxy struct {
	t        *testing.T
	ln       *net.TCPListener
	addr     string
	accepted atomic.Int32

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
	done  bool
}

func startFakeProxy(t *testing.T, serve func(p *fakeProxy, c *net.TCPConn)) *fakeProxy {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	p := &fakeProxy{t: t, ln: ln, addr: ln.Addr().String()}
	p.wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			p.accepted.Add(1)
			if !p.track(c) {
				return
			}
			p.wg.Go(func() {
				defer c.Close()
				serve(p, c)
			})
		}
	})
	t.Cleanup(p.close)
	return p
}

// track registers c to be closed at cleanup; false if cleanup already ran.
func (p *fakeProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		c.Close()
		return false
	}
	p.conns = append(p.conns, c)
	return true
}

func (p *fakeProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.done = true
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// dialTarget connects to a loopback target for a tunnel; the connection
// is closed at cleanup.
func (p *fakeProxy) dialTarget(target string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(target)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("fake proxy: %q is not a loopback target", target)
	}
	s, err := net.Dial("tcp", target)
	if err != nil {
		return nil, err
	}
	if !p.track(s) {
		return nil, net.ErrClosed
	}
	return s, nil
}

// relay copies both ways between c and s until either side ends.
func (p *fakeProxy) relay(c, s net.Conn) {
	p.wg.Go(func() { io.Copy(s, c); s.Close() })
	io.Copy(c, s)
}

// startEchoTarget is a destination that echoes each connection.
func startEchoTarget(t *testing.T) string {
	return startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) { io.Copy(c, c) }).addr
}

// deadPort is a loopback address nobody listens on: connecting is refused.
func deadPort(t *testing.T) string { return testkit.DeadPort(t).String() }

// roundTrip writes msg to c and reads the echo back.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write through tunnel: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo through tunnel = %q, %v; want %q", got, err, msg)
	}
}

// mustTCP fails unless c is a bare *net.TCPConn, which the relay splices.
func mustTCP(t *testing.T, c net.Conn) *net.TCPConn {
	t.Helper()
	tc, ok := c.(*net.TCPConn)
	if !ok {
		t.Fatalf("dialer returned a %T, want a bare *net.TCPConn", c)
	}
	t.Cleanup(func() { tc.Close() })
	return tc
}

// checkNoDeadline waits past every deadline the handshake could have left
// and checks that c still carries bytes.
func checkNoDeadline(t *testing.T, c net.Conn, after time.Duration, msg string) {
	t.Helper()
	time.Sleep(after)
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write after the handshake deadline: %v (deadline left set?)", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("read after the handshake deadline = %q, %v (deadline left set?)", got, err)
	}
}

// wantOpError checks that err is the x/net/proxy-style error: a
// *net.OpError naming op, the proxy and the target.
func wantOpError(t *testing.T, err error, op, proxy, target string) *net.OpError {
	t.Helper()
	var oe *net.OpError
	if !errors.As(err, &oe) {
		t.Fatalf("error %v (%T) is not a *net.OpError", err, err)
	}
	if oe.Op != op || oe.Net != "tcp" || oe.Source == nil || oe.Source.String() != proxy || oe.Addr == nil || oe.Addr.String() != target {
		t.Fatalf("error = %#v (%v); want Op %q, Net tcp, Source %s, Addr %s", oe, err, op, proxy, target)
	}
	return oe
}

// dialerKinds builds each proxy dialer for a proxy address, so the tests
// that do not depend on the protocol run against both.
var dialerKinds = []struct {
	name string
	op   string
	make func(proxy string, fwd *net.Dialer) Dialer
}{
	{"http", "http connect", func(p string, f *net.Dialer) Dialer { return &HTTPConnect{Proxy: p, Forward: f} }},
	{"socks5", "socks connect", func(p string, f *net.Dialer) Dialer { return &SOCKS5{Proxy: p, Forward: f} }},
}

// silentProxy accepts and reads but never answers.
func silentProxy(t *testing.T) *fakeProxy {
	return startFakeProxy(t, func(_ *fakeProxy, c *net.TCPConn) { io.Copy(io.Discard, c) })
}

func TestDirectDialsWithTemplate(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := startEchoTarget(t)
	var controls atomic.Int32
	d := &Direct{Forward: &net.Dialer{Timeout: time.Second, Control: func(network, address string, c syscall.RawConn) error {
		controls.Add(1)
		return nil
	}}}
	c, err := d.Dial(context.Background(), echo, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	roundTrip(t, c, "direct")
	if controls.Load() != 1 {
		t.Fatalf("Control ran %d times, want once (the socket mark)", controls.Load())
	}

	_, err = d.Dial(context.Background(), deadPort(t), netip.AddrPort{})
	if !errors.Is(err, syscall.ECONNREFUSED) || !isTargetFailure(err) {
		t.Fatalf("direct dial of a dead port = %v; want ECONNREFUSED as a target failure", err)
	}
}

// Direct goes to the original destination when there is one, whatever
// name it is asked for.
func TestDirectDialsOriginalDst(t *testing.T) {
	testkit.CheckGoroutines(t)
	echo := netip.MustParseAddrPort(startEchoTarget(t))
	c, err := (&Direct{}).Dial(context.Background(), "no-such-name.invalid:1", echo)
	if err != nil {
		t.Fatal(err)
	}
	mustTCP(t, c)
	roundTrip(t, c, "original")
	if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got != echo {
		t.Fatalf("connected to %v, want the original destination %v", got, echo)
	}
}

func TestDialerTimeoutBySlowProxy(t *testing.T) {
	const timeout = 200 * time.Millisecond
	for _, k := range dialerKinds {
		for _, how := range []string{"Forward.Timeout", "ctx deadline", "ctx cancel"} {
			t.Run(k.name+"/"+how, func(t *testing.T) {
				testkit.CheckGoroutines(t)
				p := silentProxy(t)
				fwd := &net.Dialer{}
				ctx := context.Background()
				switch how {
				case "Forward.Timeout":
					fwd.Timeout = timeout
				case "ctx deadline":
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, timeout)
					defer cancel()
				case "ctx cancel":
					var cancel context.CancelFunc
					ctx, cancel = context.WithCancel(ctx)
					time.AfterFunc(timeout, cancel)
				}
				start := time.Now()
				c, err := k.make(p.addr, fwd).Dial(ctx, "example.com:443", netip.AddrPort{})
				elapsed := time.Since(start)
				if err == nil {
					c.Close()
					t.Fatal("dial through a silent proxy succeeded")
				}
				wantOpError(t, err, k.op, p.addr, "example.com:443")
				if elapsed < timeout-20*time.Millisecond || elapsed > timeout+time.Second {
					t.Fatalf("gave up after %v, want about %v", elapsed, timeout)
				}
				switch how {
				case "Forward.Timeout":
					var ne net.Error
					if !errors.As(err, &ne) || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) {
						t.Fatalf("error %v is not a timeout", err)
					}
				case "ctx deadline":
					if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) {
						t.Fatalf("error %v is not a deadline", err)
					}
				case "ctx cancel":
					if !errors.Is(err, context.Canceled) {
						t.Fatalf("error %v does not say the dial was cancelled", err)
					}
				}
			})
		}
	}
}

func TestDialerRejectsBadInputBeforeDialling(t *testing.T) {
	testkit.CheckGoroutines(t)
	p := silentProxy(t)
	long := make([]byte, 256)
	for i := range long {
		long[i] = 'a'
	}
	for _, tc := range []struct {
		name    string
		d       Dialer
		address string
	}{
		{"http/no port", &HTTPConnect{Proxy: p.addr}, "example.com"},
		{"http/port 0", &HTTPConnect{Proxy: p.addr}, "example.com:0"},
		{"http/CRLF in host", &HTTPConnect{Proxy: p.addr}, "a.com\r\nX-Evil: 1:443"},
		{"http/space in host", &HTTPConnect{Proxy: p.addr}, "a b:443"},
		{"http/colon in user", &HTTPConnect{Proxy: p.addr, User: "a:b"}, "example.com:443"},
		{"socks5/host of 256 bytes", &SOCKS5{Proxy: p.addr}, string(long) + ":443"},
		{"socks5/user of 256 bytes", &SOCKS5{Proxy: p.addr, User: string(long), Password: "x"}, "example.com:443"},
		{"socks5/password of 256 bytes", &SOCKS5{Proxy: p.addr, User: "u", Password: string(long)}, "example.com:443"},
		{"socks5/empty host", &SOCKS5{Proxy: p.addr}, ":443"},
		{"socks5/no proxy", &SOCKS5{}, "example.com:443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.d.Dial(context.Background(), tc.address, netip.AddrPort{})
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			var oe *net.OpError
			if !errors.As(err, &oe) {
				t.Fatalf("error %v is not a *net.OpError", err)
			}
			t.Log(err)
		})
	}
	time.Sleep(20 * time.Millisecond)
	if n := p.accepted.Load(); n != 0 {
		t.Fatalf("proxy saw %d connections; bad input must be refused before dialling", n)
	}
}

func TestDialerProxyRefuses(t *testing.T) {
	testkit.CheckGoroutines(t)
	dead := deadPort(t)
	for _, k := range dialerKinds {
		_, err := k.make(dead, nil).Dial(context.Background(), "example.com:443", netip.AddrPort{})
		wantOpError(t, err, k.op, dead, "example.com:443")
		if !errors.Is(err, syscall.ECONNREFUSED) || isTargetFailure(err) {
			t.Fatalf("%s: %v; want ECONNREFUSED, not a target failure", k.name, err)
		}
	}
}

func TestHandshakeDeadlineIsEarliest(t *testing.T) {
	start := time.Unix(1000, 0)
	ctxAt := start.Add(3 * time.Second)
	ctx, cancel := context.WithDeadline(context.Background(), ctxAt)
	defer cancel()
	for _, tc := range []struct {
		ctx  context.Context
		d    net.Dialer
		want time.Time
	}{
		{context.Background(), net.Dialer{}, time.Time{}},
		{context.Background(), net.Dialer{Timeout: time.Second}, start.Add(time.Second)},
		{ctx, net.Dialer{Timeout: 5 * time.Second}, ctxAt},
		{ctx, net.Dialer{Timeout: time.Second}, start.Add(time.Second)},
		{ctx, net.Dialer{Deadline: start.Add(2 * time.Second), Timeout: 9 * time.Second}, start.Add(2 * time.Second)},
	} {
		if got := handshakeDeadline(tc.ctx, &tc.d, start); !got.Equal(tc.want) {
			t.Errorf("handshakeDeadline(%v) = %v, want %v", tc.d, got, tc.want)
		}
	}
}
