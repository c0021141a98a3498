package tunnel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/proxyport"
)

// This file is the explicit proxy port: the inbound for clients that are
// configured with a proxy instead of being redirected by the kernel. One
// port speaks HTTP/1.1 forward proxy (absolute-form and CONNECT), SOCKS5 and
// SOCKS4a, told apart by the first byte (package proxyport parses them).
// The destination is the one the client asks for; it is routed by the same
// rules, connected by the same dialers and, for tunnels, relayed by the same
// engine as a redirected connection, and ends in the same access line with
// inbound=proxy.

// ProxyPort configures the proxy inbound. The zero value accepts clients
// from DefaultProxyAllow without credentials.
type ProxyPort struct {
	// Allow lists the client addresses served; any other client is reset
	// before a byte is read, and nothing is dialled for it. Nil means
	// DefaultProxyAllow.
	Allow []netip.Prefix
	// Users, when not empty, are required: Basic for HTTP (else 407),
	// RFC 1929 for SOCKS5 (else status 1). SOCKS4 is then refused.
	Users proxyport.Users
	// HandshakeTimeout bounds reading a request head or a SOCKS handshake,
	// and the wait for the next request on a kept-alive connection is the
	// tunnel's IdleTimeout. Zero means 10s.
	HandshakeTimeout time.Duration
	// IsLocal reports whether a destination address is the gateway's own
	// (detour's listeners among them): such a destination is refused unless
	// a rule, not the default, routes it. Nil means loopback, unspecified,
	// and the addresses of the host's interfaces (the loop guard's
	// hostAddrs: re-read on a miss at most once a second).
	IsLocal func(netip.Addr) bool
	// Observer hears about this inbound's connections. Nil means the
	// tunnel's Observer.
	Observer Observer
	// NoUDP refuses SOCKS5 UDP ASSOCIATE ("command not supported").
	// Otherwise each association gets a UDP socket of its own on the
	// address the client connected to, and its datagrams become UDP
	// sessions like the kernel's, with UDP's limits and timeouts.
	NoUDP bool
	// UDP are the limits and timeouts of those sessions.
	UDP UDPOptions
	// UDPObserver hears about them. Nil means nobody.
	UDPObserver UDPObserver

	local hostAddrs
	udp   proxyUDP
}

// DefaultProxyAllow are the private ranges: RFC 1918, CGNAT (RFC 6598),
// loopback, link-local and IPv6 unique-local and link-local, and the
// benchmark range 198.18.0.0/15 (RFC 2544) that detour's tests use.
var DefaultProxyAllow = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
}

var (
	errNotAllowed  = errors.New("client address not in the proxy port's allow list")
	errLocalTarget = errors.New("destination is the gateway itself (no rule routes it)")
	errBadAuth     = errors.New("wrong or missing credentials")
)

// ServeProxy serves the proxy port on ln until ln is closed or Shutdown is
// called, like Serve. The caller creates ln (and may have inherited it from
// a previous process); Shutdown closes it.
func (t *Tunnel) ServeProxy(ln *net.TCPListener, p *ProxyPort) error {
	if p == nil {
		p = &ProxyPort{}
	}
	return t.Serve(&proxyListener{TCPListener: ln, port: p})
}

// proxyListener marks a listener whose connections go to serveProxy.
type proxyListener struct {
	*net.TCPListener
	port *ProxyPort
}

func (l *proxyListener) Accept() (*net.TCPConn, error) { return l.AcceptTCP() }

func (l *proxyListener) observer(t *Tunnel) Observer {
	if l.port.Observer != nil {
		return l.port.Observer
	}
	return t.Observer
}

func (l *proxyListener) OriginalDst(*net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errors.New("a proxy-port connection has no original destination")
}

func (p *ProxyPort) allowed(a netip.Addr) bool {
	allow := p.Allow
	if allow == nil {
		allow = DefaultProxyAllow
	}
	a = a.Unmap()
	for _, pre := range allow {
		if pre.Contains(a) {
			return true
		}
	}
	return false
}

func (p *ProxyPort) isLocal(a netip.Addr) bool {
	if p.IsLocal != nil {
		return p.IsLocal(a)
	}
	return p.local.contains(a, nil)
}

func (p *ProxyPort) handshakeTimeout() time.Duration {
	if p.HandshakeTimeout > 0 {
		return p.HandshakeTimeout
	}
	return 10 * time.Second
}

// proxyConn is one client connection on the proxy port.
type proxyConn struct {
	t      *Tunnel
	p      *ProxyPort
	r      *conn
	router *Router
	obs    Observer
	cr     *idleConn // the client, under br
	br     *bufio.Reader
	start  time.Time
}

// serveProxy is the proxy port's data path for one client: allow list,
// protocol by the first byte, then the protocol's handshake and the same
// route, connect and relay stages as a redirected connection.
func (t *Tunnel) serveProxy(p *ProxyPort, r *conn) {
	pc := &proxyConn{t: t, p: p, r: r, router: t.router.Load(), obs: p.Observer, start: time.Now()}
	if pc.obs == nil {
		pc.obs = t.Observer
	}
	client := r.client
	src := addrPort(client.RemoteAddr())
	if !p.allowed(src.Addr()) {
		defer t.remove(r)
		r.end(true)
		pc.refused("not_allowed", errNotAllowed)
		return
	}
	client.SetReadDeadline(time.Now().Add(p.handshakeTimeout()))
	pc.cr = &idleConn{c: client}
	pc.br = bufio.NewReaderSize(pc.cr, 16<<10)
	b, err := pc.br.Peek(1)
	if err != nil {
		pc.fail(&connInfo{}, "bad_request", fmt.Errorf("client sent nothing: %w", err))
		return
	}
	switch k := proxyport.Detect(b[0]); k {
	case proxyport.HTTP:
		pc.serveHTTP()
	case proxyport.SOCKS5, proxyport.SOCKS4:
		pc.serveSOCKS()
	default:
		err := proxyport.BadFirstByte(b[0])
		pc.fail(&connInfo{}, "bad_request", err, proxyport.AppendError(nil, 400, err.Error()))
	}
}

// info starts the access line of a request on this connection.
func (pc *proxyConn) info(request string) *connInfo {
	return &connInfo{start: pc.start, peer: pc.r.peer, inbound: ProxyInbound, request: request, outcome: "off"}
}

// refused logs a client turned away before any handshake.
func (pc *proxyConn) refused(reason string, err error) {
	if pc.obs != nil {
		pc.obs.Refused(reason)
	}
	if ok, held := pc.t.refusals.allowFrom(time.Now(), sniff.SourceKey(pc.r.peer.Addr()), true); ok {
		pc.t.log().LogAttrs(context.Background(), slog.LevelWarn, "refused",
			slog.String("client", pc.r.peer.String()),
			slog.String("inbound", "proxy"),
			slog.String("error", err.Error()),
			slog.Int("suppressed", held))
	}
}

// fail ends the connection after a failed handshake or request: it writes
// reply (if any), closes the client without cutting the reply off, and
// writes the access line.
func (pc *proxyConn) fail(info *connInfo, reason string, err error, reply ...[]byte) {
	r := pc.r
	defer pc.t.remove(r)
	if !info.peer.IsValid() {
		info = pc.info(info.request)
	}
	if pc.obs != nil {
		pc.obs.Refused(reason)
	}
	for _, b := range reply {
		r.client.SetWriteDeadline(time.Now().Add(time.Second))
		if _, werr := r.client.Write(b); werr != nil {
			break
		}
	}
	lingerClose(r)
	info.noRoute = true
	pc.t.logConn(info, 0, 0, err)
}

// lingerClose closes the client after a reply: half-close, then read and
// drop what the client still sends for a moment (bounded in bytes and time),
// so the kernel does not answer unread bytes with a reset that destroys the
// reply before the client reads it.
func lingerClose(r *conn) {
	c := r.client
	if c.CloseWrite() == nil {
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		io.CopyN(io.Discard, c, 4<<20)
	}
	r.end(false)
}

// dial routes a request for host (a name, or "" when addr is given) or addr
// and port, and connects: the same rules as a redirected connection, with
// inbound=proxy. It fills info's route, destination, upstream and target.
func (pc *proxyConn) dial(info *connInfo, host string, addr netip.Addr, port uint16, proto sniff.Proto) (*net.TCPConn, error) {
	route, idx := pc.route(info, host, addr, port, proto)
	return pc.connect(info, route, idx)
}

// route picks the route for a request (the first matching rule with
// inbound=proxy, else the default) and sets info's destination as far as it
// is known: the address asked for; for a name, its address when rules with
// CIDR conditions need one (resolved by the gateway; a name that does not
// resolve is routed by name alone), else none.
func (pc *proxyConn) route(info *connInfo, host string, addr netip.Addr, port uint16, proto sniff.Proto) (Action, int) {
	info.found = sniff.Result{Proto: proto, Host: host}
	if host != "" && pc.router.hasCIDRs(ProxyInbound) {
		if ip, err := pc.resolve(host); err == nil {
			addr = ip
		}
	}
	info.dst = netip.AddrPortFrom(addr.Unmap(), port)
	route, idx := pc.router.RouteFor(ProxyInbound, host, proto, info.dst)
	info.route = route
	return route, idx
}

// connect connects a routed request. A name is sent to an upstream as the
// client asked for it, and resolved here for a direct route. A destination
// on the gateway itself is refused unless a rule (idx >= 0, not the
// default) routes it.
func (pc *proxyConn) connect(info *connInfo, route Action, idx int) (*net.TCPConn, error) {
	host := info.found.Host
	switch route.Kind {
	case ActionReject:
		return nil, errRejected
	case ActionDirect:
		if host != "" && !info.dst.Addr().IsValid() {
			ip, err := pc.resolve(host)
			if err != nil {
				return nil, err
			}
			info.dst = netip.AddrPortFrom(ip, info.dst.Port())
		}
		if idx < 0 && pc.p.isLocal(info.dst.Addr()) {
			return nil, errLocalTarget
		}
	case ActionProxy:
		if host == "" && idx < 0 && pc.p.isLocal(info.dst.Addr()) {
			return nil, errLocalTarget
		}
		// The name is what the client asked for; the upstream resolves it
		// (dst, if resolved for the rules, serves the group's direct
		// members).
		route.Name = Override
	}
	server, lease, target, err := pc.t.connectFor(pc.r, route, info.dst, info.found, pc.obs)
	info.lease, info.target = lease, target
	return server, err
}

// resolve looks host up for a direct route or a CIDR condition.
func (pc *proxyConn) resolve(host string) (netip.Addr, error) {
	ctx, cancel := context.WithTimeout(context.Background(), pc.t.dialTimeout())
	defer cancel()
	ips, err := pc.t.lookup(ctx, host)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("resolving %s: %w", host, err)
	}
	if len(ips) == 0 {
		return netip.Addr{}, fmt.Errorf("resolving %s: no address", host)
	}
	return ips[0].Unmap(), nil
}

// serveHTTP reads HTTP requests: CONNECT becomes a tunnel, anything else is
// forwarded request by request.
func (pc *proxyConn) serveHTTP() {
	req, err := proxyport.ReadRequest(pc.br, proxyport.Limits{})
	if err != nil {
		pc.httpFail(pc.info("http"), err)
		return
	}
	if !pc.httpAuthorized(req) {
		return
	}
	if req.IsConnect() {
		pc.serveCONNECT(req)
		return
	}
	pc.forward(req)
}

// httpFail answers a request head that cannot be served and closes.
func (pc *proxyConn) httpFail(info *connInfo, err error) {
	var pe *proxyport.Error
	if errors.As(err, &pe) && pe.Status != 0 {
		pc.fail(info, "bad_request", err, proxyport.AppendError(nil, pe.Status, pe.Msg))
		return
	}
	pc.fail(info, "bad_request", err)
}

// httpAuthorized checks Proxy-Authorization when users are configured; a
// request without the right one gets 407 and the connection is closed.
func (pc *proxyConn) httpAuthorized(req *proxyport.Request) bool {
	if len(pc.p.Users) == 0 {
		return true
	}
	user, pass, ok := proxyport.Basic(req.ProxyAuth)
	if ok && pc.p.Users.Check(user, pass) {
		return true
	}
	info := pc.info(httpRequestName(req))
	info.found.Host = req.Host
	err := errBadAuth
	if req.ProxyAuth != "" {
		err = fmt.Errorf("%w (user %q)", errBadAuth, user)
	}
	pc.fail(info, "auth", err, proxyport.AppendError(nil, 407, "proxy credentials required",
		`Proxy-Authenticate: Basic realm="detour"`))
	return false
}

func httpRequestName(req *proxyport.Request) string {
	if req.IsConnect() {
		return "connect"
	}
	return "http"
}

// serveCONNECT tunnels: 200 once the destination is connected, then the
// relay. For port 443 the TLS ClientHello is peeked for its SNI, logged with
// the access line (a name other than the CONNECT host is flagged).
func (pc *proxyConn) serveCONNECT(req *proxyport.Request) {
	info := pc.info("connect")
	host, addr := req.Host, netip.Addr{}
	if ip, err := netip.ParseAddr(host); err == nil {
		host, addr = "", ip
	}
	server, err := pc.dial(info, host, addr, req.Port, sniff.Unknown)
	if err != nil {
		pc.dialFailed(info, err, proxyport.AppendError(nil, dialStatus(err), err.Error()))
		return
	}
	if _, err := pc.r.client.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		pc.tunnelFailed(info, server, fmt.Errorf("client: writing 200: %w", err))
		return
	}
	pc.relay(info, server, req.Port == 443)
}

// serveSOCKS runs the SOCKS handshake, connects, replies and relays.
func (pc *proxyConn) serveSOCKS() {
	req, err := proxyport.ReadSOCKS(pc.br, pc.r.client, pc.p.Users, !pc.p.NoUDP)
	if err != nil {
		info := pc.info("socks")
		reason := "bad_request"
		var se *proxyport.SOCKSError
		if errors.As(err, &se) && se.AuthFailed {
			reason = "auth"
		}
		pc.fail(info, reason, err)
		return
	}
	if req.Cmd == proxyport.CmdUDPAssociate {
		pc.serveAssociation(req)
		return
	}
	info := pc.info(fmt.Sprintf("socks%d", req.Version))
	server, err := pc.dial(info, req.Host, req.Addr, req.Port, sniff.Unknown)
	if err != nil {
		pc.dialFailed(info, err, socksReply(req.Version, socksCode(err), netip.AddrPort{}))
		return
	}
	if err := proxyport.WriteSOCKSReply(pc.r.client, req.Version, proxyport.RepSucceeded, addrPort(server.LocalAddr())); err != nil {
		pc.tunnelFailed(info, server, fmt.Errorf("client: writing the SOCKS reply: %w", err))
		return
	}
	pc.relay(info, server, req.Port == 443)
}

func socksReply(version, code byte, bound netip.AddrPort) []byte {
	var b bytesWriter
	proxyport.WriteSOCKSReply(&b, version, code, bound)
	return b
}

type bytesWriter []byte

func (b *bytesWriter) Write(p []byte) (int, error) { *b = append(*b, p...); return len(p), nil }

// dialFailed answers a request whose destination could not be connected
// (or was refused) and writes the access line.
func (pc *proxyConn) dialFailed(info *connInfo, err error, reply []byte) {
	r := pc.r
	defer pc.t.remove(r)
	r.client.SetWriteDeadline(time.Now().Add(time.Second))
	r.client.Write(reply)
	lingerClose(r)
	if pc.obs != nil {
		pc.obs.Closed(info.route.String(), 0, 0)
	}
	pc.t.logConn(info, 0, 0, err)
}

// tunnelFailed ends a tunnel whose server was connected but that failed
// before the relay started.
func (pc *proxyConn) tunnelFailed(info *connInfo, server *net.TCPConn, err error) {
	pc.r.setServer(server)
	pc.r.end(isReset(err))
	pc.t.finishWith(pc.r, info, pc.obs, 0, 0, err)
}

// relay starts the relay of a tunnel whose handshake is done: what the
// client sent after its request is written first; for TLS ports the
// ClientHello's SNI is peeked first, for the access line.
func (pc *proxyConn) relay(info *connInfo, server *net.TCPConn, sniffTLS bool) {
	r, client := pc.r, pc.r.client
	if err := r.setServer(server); err != nil {
		pc.t.finishWith(r, info, pc.obs, 0, 0, err) // cut (shutdown) while dialling
		return
	}
	var first []byte
	if n := pc.br.Buffered(); n > 0 {
		first, _ = pc.br.Peek(n)
		first = append([]byte(nil), first...)
	}
	if sniffTLS && !pc.t.Sniff.Disabled {
		start := time.Now()
		data, found, o, _ := sniff.Peek(bufferedConn{pc.br, client}, sniff.Options{Timeout: pc.t.Sniff.Timeout, MaxBytes: pc.t.Sniff.MaxBytes})
		info.sniffTook, info.outcome = time.Since(start), o.String()
		first = data
		if found.Proto != sniff.Unknown {
			info.found.Proto = found.Proto
			info.sni = found.Host
			info.found.ECH = found.ECH
		}
		if pc.obs != nil {
			pc.obs.Sniffed(found, info.outcome, info.sniffTook)
		}
	}
	client.SetReadDeadline(time.Time{})
	pc.br = nil
	replayed := int64(len(first))
	if replayed > 0 {
		if _, err := server.Write(first); err != nil {
			r.end(isReset(err))
			pc.t.finishWith(r, info, pc.obs, 0, 0, fmt.Errorf("client->server: writing %d bytes sent after the request: %w", replayed, err))
			return
		}
	}
	err := r.startRelay(pc.t.engine, pc.t.idleTimeout(), nil, func(up, down int64, err error) {
		pc.t.finishWith(r, info, pc.obs, up+replayed, down, err)
	})
	if err != nil {
		r.end(true)
		pc.t.finishWith(r, info, pc.obs, 0, 0, err)
	}
}

// idleConn reads and writes c with its deadline renewed before each call,
// so that the idle timeout bounds a stall, not a whole transfer. With idle
// 0 it leaves the deadlines alone.
type idleConn struct {
	c    *net.TCPConn
	idle time.Duration
}

func (i *idleConn) Read(p []byte) (int, error) {
	if i.idle > 0 {
		i.c.SetReadDeadline(time.Now().Add(i.idle))
	}
	return i.c.Read(p)
}

func (i *idleConn) Write(p []byte) (int, error) {
	if i.idle > 0 {
		i.c.SetWriteDeadline(time.Now().Add(i.idle))
	}
	return i.c.Write(p)
}

// bufferedConn reads what a bufio.Reader holds, then the connection.
type bufferedConn struct {
	br *bufio.Reader
	c  *net.TCPConn
}

func (b bufferedConn) Read(p []byte) (int, error)        { return b.br.Read(p) }
func (b bufferedConn) SetReadDeadline(t time.Time) error { return b.c.SetReadDeadline(t) }

// dialStatus is the HTTP status for a failed dial.
func dialStatus(err error) int {
	switch {
	case errors.Is(err, errRejected), errors.Is(err, errLocalTarget):
		return 403
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return 504
	}
	return 502
}

// socksCode is the SOCKS5 reply for a failed dial.
func socksCode(err error) byte {
	switch {
	case errors.Is(err, errRejected), errors.Is(err, errLocalTarget):
		return proxyport.RepNotAllowed
	case errors.Is(err, syscall.ECONNREFUSED):
		return proxyport.RepConnectionRefused
	case errors.Is(err, syscall.ENETUNREACH):
		return proxyport.RepNetworkUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return proxyport.RepHostUnreachable
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return proxyport.RepHostUnreachable
	}
	return proxyport.RepGeneralFailure
}
