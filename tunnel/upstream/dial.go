package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Dialer is the one dial signature every way out shares: Direct, SOCKS5
// and HTTPConnect, and a Group's members through them.
//
// target is what to ask for, "host:port" where host is a sniffed name or an
// IP literal; dst is the connection's original destination (the zero
// AddrPort when there is none). A proxy asks for target. Direct connects to
// dst when it is valid, so a direct member of a group asked for a sniffed
// name goes where the client was going, not where the gateway's resolver
// says; else to target. The result is a bare *net.TCPConn, after any proxy
// handshake and with no deadline left set, so the relay can splice it.
type Dialer interface {
	Dial(ctx context.Context, target string, dst netip.AddrPort) (*net.TCPConn, error)
}

var (
	_ Dialer = (*Direct)(nil)
	_ Dialer = (*HTTPConnect)(nil)
	_ Dialer = (*SOCKS5)(nil)
)

// Direct connects to the destination itself.
type Direct struct {
	// Forward is the template for the outbound socket: it carries the
	// timeout and the socket-mark Control function. Nil means a zero
	// net.Dialer.
	Forward *net.Dialer
}

// Dial connects to dst, or, when dst is not valid, to target (a hostname
// resolved by the system resolver).
//
// Its errors are failures of the destination, not of a route: a group never
// marks a direct upstream down.
func (d *Direct) Dial(ctx context.Context, target string, dst netip.AddrPort) (*net.TCPConn, error) {
	address := target
	if dst.IsValid() {
		address = dst.String()
	}
	c, err := dialTCP(ctx, forwardOf(d.Forward), address)
	if err != nil {
		return nil, targetError{err}
	}
	return c, nil
}

// dialTCP connects to address with d and returns the TCP connection.
//
// It goes through DialContext, whose resolver takes an IP literal without
// a lookup, and not through Dialer.DialTCP: that one binds its local
// address even when it is the zero AddrPort, and bind(2) to port 0 takes
// an ephemeral port for this socket alone. connect(2) on an unbound socket
// picks the port for the 4-tuple, so the same port serves many
// destinations, and ports in TIME_WAIT are not locked away: on a gateway
// that is the difference between about 28,000 outbound connections (the
// default ip_local_port_range) and that many per destination.
func dialTCP(ctx context.Context, d *net.Dialer, address string) (*net.TCPConn, error) {
	c, err := d.DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: hostPort(address), Err: fmt.Errorf("got a %T, want a *net.TCPConn", c)}
	}
	return tc, nil
}

// dialProxy connects to proxy with forward and runs handshake on the
// connection. The whole of it is bounded by ctx and by forward's Timeout
// and Deadline: the earliest of them is the connection's deadline during
// the handshake, and cancelling ctx interrupts it. The deadline is cleared
// before the connection is returned. Errors are *net.OpError{Op: op,
// Source: proxy, Addr: target}.
func dialProxy(ctx context.Context, op string, forward *net.Dialer, proxy, target string, handshake func(*net.TCPConn) error) (*net.TCPConn, error) {
	fail := func(err error) error {
		return proxyError(op, proxy, target, err)
	}
	if proxy == "" {
		return nil, fail(errors.New("no proxy address"))
	}
	fd := forwardOf(forward)
	start := time.Now()
	tc, err := connectProxy(ctx, fd, proxy, start)
	if err != nil {
		return nil, fail(err)
	}
	if err := exchange(ctx, fd, start, tc, handshake); err != nil {
		tc.Close()
		return nil, fail(err)
	}
	return tc, nil
}

// connectProxy opens the TCP connection to proxy with half of the budget
// (ctx's deadline, forward's Timeout from start and Deadline). Its timeout is
// the proxy's own failure (its host down, SYNs dropped: nothing a client's
// target can cause), returned while ctx is still alive, so a group benches
// this upstream and tries the next with the other half. A timeout later,
// waiting for the reply to CONNECT, may be the target's and stays ctx's:
// nobody is benched for it.
func connectProxy(ctx context.Context, forward *net.Dialer, proxy string, start time.Time) (*net.TCPConn, error) {
	connectCtx := ctx
	var connectBy time.Time
	if deadline := handshakeDeadline(ctx, forward, start); !deadline.IsZero() {
		var cancel context.CancelFunc
		connectBy = start.Add(deadline.Sub(start) / 2)
		connectCtx, cancel = context.WithDeadline(ctx, connectBy)
		defer cancel()
	}
	tc, err := dialTCP(connectCtx, forward, proxy)
	// The dial's own timer may fire a little before the context's.
	if err != nil && !connectBy.IsZero() && !time.Now().Before(connectBy) && ctxErr(ctx) == nil {
		err = fmt.Errorf("connecting to the proxy: no answer within %v: %w", connectBy.Sub(start).Round(time.Millisecond), err)
	}
	return tc, err
}

// exchange runs handshake on tc, bounded by ctx and by forward's Timeout
// (from start) and Deadline: the earliest of them is tc's deadline during
// the handshake, and cancelling ctx interrupts it. The deadline is cleared
// afterwards; on an error the caller closes tc.
func exchange(ctx context.Context, forward *net.Dialer, start time.Time, tc *net.TCPConn, handshake func(*net.TCPConn) error) error {
	if deadline := handshakeDeadline(ctx, forward, start); !deadline.IsZero() {
		if err := tc.SetDeadline(deadline); err != nil {
			return err
		}
	}
	// Cancelling ctx puts the deadline in the past, which wakes a blocked
	// read or write.
	stop := context.AfterFunc(ctx, func() { tc.SetDeadline(time.Unix(1, 0)) })
	err := handshake(tc)
	if !stop() {
		// ctx is done and the deadline is being (or was) moved: the
		// connection can't be handed out whatever the handshake said.
		err = ctx.Err()
	} else if err != nil {
		if cerr := ctxErr(ctx); cerr != nil {
			err = cerr // ctx's deadline, set on the conn, fired first
		}
	}
	if err == nil {
		err = tc.SetDeadline(time.Time{})
	}
	return err
}

// handshakeDeadline is the earliest of ctx's deadline, d.Deadline and
// start+d.Timeout; zero if none is set.
func handshakeDeadline(ctx context.Context, d *net.Dialer, start time.Time) time.Time {
	var dl time.Time
	earliest := func(t time.Time) {
		if !t.IsZero() && (dl.IsZero() || t.Before(dl)) {
			dl = t
		}
	}
	if t, ok := ctx.Deadline(); ok {
		earliest(t)
	}
	earliest(d.Deadline)
	if d.Timeout > 0 {
		earliest(start.Add(d.Timeout))
	}
	return dl
}

// ctxErr is ctx.Err(), or DeadlineExceeded once ctx's deadline has passed
// even if ctx has not noticed yet: a connection deadline set from it can
// fire a little before ctx's own timer.
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

// forwardOf is d, or a zero Dialer for nil; the caller must not change it.
func forwardOf(d *net.Dialer) *net.Dialer {
	if d == nil {
		return &net.Dialer{}
	}
	return d
}

// template returns a copy of d (a zero Dialer for nil) that the caller may
// use without touching d.
func template(d *net.Dialer) *net.Dialer {
	if d == nil {
		return &net.Dialer{}
	}
	c := *d
	return &c
}

// proxyError is the error of a dial through proxy, as x/net/proxy makes
// them: which step (op), the proxy, the target.
func proxyError(op, proxy, target string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: hostPort(proxy), Addr: hostPort(target), Err: err}
}

// target is a parsed "host:port" a proxy is asked to connect to.
type target struct {
	ip   netip.Addr // valid when the host is an IP literal (unmapped, no zone)
	host string     // the hostname, when ip is not valid
	port uint16
}

// parseTarget splits and checks address. A hostname may hold letters,
// digits and "-._~" only: it is written into a CONNECT request or a SOCKS
// request, and a sniffed name comes from the client.
func parseTarget(address string) (target, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return target{}, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return target{}, fmt.Errorf("invalid port %q", port)
	}
	if ip, err := parseIP(host); err == nil {
		// A zone means nothing to a proxy on another host.
		ip = ip.Unmap().WithZone("")
		return target{ip: ip, port: uint16(p)}, nil
	}
	if host == "" {
		return target{}, errors.New("missing host")
	}
	for i := 0; i < len(host); i++ {
		switch c := host[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '.', c == '_', c == '~':
		default:
			return target{}, fmt.Errorf("invalid host %q", host)
		}
	}
	return target{host: host, port: uint16(p)}, nil
}

// parseIP is netip.ParseAddr, without its allocated error for a host
// that cannot be an IP literal (one with no ':' and more than digits and
// dots): a name, the common case.
func parseIP(host string) (netip.Addr, error) {
	if strings.IndexByte(host, ':') < 0 {
		for i := 0; i < len(host); i++ {
			if c := host[i]; c != '.' && !isDigit(c) {
				return netip.Addr{}, errNotIP
			}
		}
	}
	return netip.ParseAddr(host)
}

var errNotIP = errors.New("not an IP literal")

// hostPort is a net.Addr for an address known as a string, which may hold a
// name (a proxy's or a target's).
type hostPort string

func (a hostPort) Network() string { return "tcp" }
func (a hostPort) String() string  { return string(a) }

// targetError marks an error about the destination rather than the route
// to it: a direct dial that failed, or a proxy that answered that it could
// not reach the target. The upstream itself works, so a group neither
// marks it down nor tries another one.
type targetError struct{ err error }

func (e targetError) Error() string       { return e.err.Error() }
func (e targetError) Unwrap() error       { return e.err }
func (e targetError) targetFailure() bool { return true }

// isTargetFailure reports whether err says the destination failed while
// the upstream worked.
func isTargetFailure(err error) bool {
	var tf interface{ targetFailure() bool }
	return errors.As(err, &tf) && tf.targetFailure()
}

// isRequestRefused reports whether err is an upstream that works refusing
// one request, which another upstream might accept.
func isRequestRefused(err error) bool {
	var rr interface{ requestRefused() bool }
	return errors.As(err, &rr) && rr.requestRefused()
}

// readError says which read of a handshake failed. An EOF there is
// unexpected. It keeps Timeout, so (*net.OpError).Timeout still answers
// for a handshake that timed out.
func readError(what string, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return &stepError{step: "reading " + what, err: err}
}

type stepError struct {
	step string
	err  error
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func (e *stepError) Timeout() bool {
	var ne net.Error
	return errors.As(e.err, &ne) && ne.Timeout()
}
