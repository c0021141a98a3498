package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/detour-proxy/detour/internal/socksudp"
	"github.com/detour-proxy/detour/tunnel/proxyport"
)

// SOCKS5 UDP ASSOCIATE on the proxy port (RFC 1928 §7). Each association
// gets a UDP socket of its own, bound to the address the client's TCP
// connection reached; the client sends its datagrams there with a SOCKS5
// UDP header naming the destination. They become UDP sessions of one
// UDPServer per proxy port (inbound proxy): sniffed, routed by the same
// rules, carried direct or through a SOCKS5 upstream; replies go back
// through the association's socket with a header naming where they came
// from. The association lasts as long as its TCP connection (and at most
// the idle timeout without a datagram).

// proxyUDP is a proxy port's UDP side: the sessions' server and which
// association each client UDP address belongs to, for replies.
type proxyUDP struct {
	once sync.Once
	srv  *UDPServer

	mu       sync.Mutex
	byClient map[netip.AddrPort]*association
}

// server returns the port's UDPServer, made on first use.
func (p *ProxyPort) udpServer(t *Tunnel) *UDPServer {
	p.udp.once.Do(func() {
		srv := &UDPServer{Tunnel: t, Replies: &p.udp, Options: p.UDP, Observer: p.UDPObserver,
			Inbound: ProxyInbound, refuseLocal: p.isLocal}
		p.udp.mu.Lock()
		p.udp.byClient = map[netip.AddrPort]*association{}
		p.udp.srv = srv
		p.udp.mu.Unlock()
	})
	return p.udp.srv
}

// UDPSessions is the number of UDP sessions of the port's associations.
func (p *ProxyPort) UDPSessions() int {
	p.udp.mu.Lock()
	srv := p.udp.srv
	p.udp.mu.Unlock()
	if srv == nil {
		return 0
	}
	return srv.Sessions()
}

// ShutdownUDP ends the UDP sessions of the port's associations (their TCP
// connections end with the tunnel's Shutdown).
func (p *ProxyPort) ShutdownUDP() {
	p.udp.mu.Lock()
	srv := p.udp.srv
	p.udp.mu.Unlock()
	if srv != nil {
		srv.Shutdown()
	}
}

// AcquireReply is the Replier of the port's sessions: replies leave through
// the socket of the client's association.
func (u *proxyUDP) AcquireReply(from netip.AddrPort) (ReplySender, error) {
	return udpReplier{u: u, from: from}, nil
}

type udpReplier struct {
	u    *proxyUDP
	from netip.AddrPort
}

func (r udpReplier) WriteTo(b []byte, to netip.AddrPort) error {
	r.u.mu.Lock()
	a := r.u.byClient[to]
	r.u.mu.Unlock()
	if a == nil {
		return errAssociationGone
	}
	return a.reply(b, r.from, to)
}

func (udpReplier) Release() {}

var errAssociationGone = errors.New("the client's UDP association has ended")

// association is one UDP ASSOCIATE: the client's IP, the relay socket, and
// the client UDP addresses seen on it. It is the PacketListener the
// sessions' server reads it through.
type association struct {
	u      *proxyUDP
	t      *Tunnel
	conn   *net.UDPConn
	client netip.Addr       // datagrams from elsewhere are dropped
	port   uint16           // the client's UDP port if it named one, else 0
	last   atomic.Int64     // UnixNano of the last datagram from the client
	peers  []netip.AddrPort // client addresses registered in u.byClient
	rbuf   []byte
	wmu    sync.Mutex
	wbuf   []byte
	names  map[string]netip.Addr // resolved ATYP domain names
}

func (a *association) LocalAddr() net.Addr { return a.conn.LocalAddr() }
func (a *association) Close() error        { return a.conn.Close() }

// ReadDatagram reads the client's next datagram and strips its header.
func (a *association) ReadDatagram(b, _ []byte) (int, netip.AddrPort, netip.AddrPort, string, error) {
	n, from, err := a.conn.ReadFromUDPAddrPort(a.rbuf)
	if err != nil {
		return 0, netip.AddrPort{}, netip.AddrPort{}, "", err
	}
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if from.Addr() != a.client || (a.port != 0 && from.Port() != a.port) {
		return 0, from, netip.AddrPort{}, "not_associated", nil
	}
	addr, host, port, off, err := proxyport.ParseUDPHeader(a.rbuf[:n])
	if err != nil {
		return 0, from, netip.AddrPort{}, "bad_header", nil
	}
	if host != "" {
		if addr = a.resolve(host); !addr.IsValid() {
			return 0, from, netip.AddrPort{}, "unresolved", nil
		}
	}
	a.last.Store(time.Now().UnixNano())
	a.register(from)
	return copy(b, a.rbuf[off:n]), from, netip.AddrPortFrom(addr, port), "", nil
}

// resolve looks a destination name up (once per association).
func (a *association) resolve(host string) netip.Addr {
	if ip, ok := a.names[host]; ok {
		return ip
	}
	var ip netip.Addr
	ctx, cancel := contextWithTimeout(a.t.dialTimeout())
	ips, err := a.t.lookup(ctx, host)
	cancel()
	if err == nil && len(ips) > 0 {
		ip = ips[0].Unmap()
	}
	if len(a.names) < 64 {
		a.names[host] = ip
	}
	return ip
}

// register notes that replies to from go through a.
func (a *association) register(from netip.AddrPort) {
	for _, p := range a.peers {
		if p == from {
			return
		}
	}
	a.u.mu.Lock()
	a.u.byClient[from] = a
	a.u.mu.Unlock()
	a.peers = append(a.peers, from)
}

// reply sends b to the client with a header naming src.
func (a *association) reply(b []byte, src, to netip.AddrPort) error {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	a.wbuf = append(socksudp.Append(a.wbuf[:0], src), b...)
	_, err := a.conn.WriteToUDPAddrPort(a.wbuf, to)
	return err
}

// forget removes a's client addresses from the reply table.
func (a *association) forget() {
	a.u.mu.Lock()
	for _, p := range a.peers {
		if a.u.byClient[p] == a {
			delete(a.u.byClient, p)
		}
	}
	a.u.mu.Unlock()
}

// serveAssociation answers UDP ASSOCIATE and keeps the association for as
// long as the client's TCP connection stays open (and it sends datagrams at
// least once an idle timeout).
func (pc *proxyConn) serveAssociation(req *proxyport.SOCKSRequest) {
	info := pc.info("socks5-udp")
	client := pc.r.client
	local := addrPort(client.LocalAddr())
	uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(local.Addr(), 0)))
	if err != nil {
		pc.fail(info, "udp", fmt.Errorf("opening the UDP relay: %w", err), socksReply(5, proxyport.RepGeneralFailure, netip.AddrPort{}))
		return
	}
	srv := pc.p.udpServer(pc.t)
	a := &association{u: &pc.p.udp, t: pc.t, conn: uc, client: addrPort(client.RemoteAddr()).Addr(),
		rbuf: make([]byte, 64<<10+maxUDPHeader), names: map[string]netip.Addr{}}
	if req.Addr.IsValid() && !req.Addr.IsUnspecified() && req.Port != 0 {
		a.port = req.Port
	}
	a.last.Store(time.Now().UnixNano())
	ua := uc.LocalAddr().(*net.UDPAddr).AddrPort()
	bound := netip.AddrPortFrom(ua.Addr().Unmap(), ua.Port())
	info.dst = bound
	if err := proxyport.WriteSOCKSReply(client, 5, proxyport.RepSucceeded, bound); err != nil {
		uc.Close()
		pc.fail(info, "udp", fmt.Errorf("client: writing the SOCKS reply: %w", err))
		return
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeUDP(a) }()
	err = pc.holdAssociation(a)
	uc.Close()
	<-served
	a.forget()
	pc.r.end(false)
	defer pc.t.remove(pc.r)
	info.noRoute = true
	pc.t.logConn(info, 0, 0, err)
}

// holdAssociation waits until the client closes the TCP connection, or
// sends nothing on it or the association for an idle timeout.
func (pc *proxyConn) holdAssociation(a *association) error {
	idle := pc.t.idleTimeout()
	buf := make([]byte, 512)
	for {
		pc.r.client.SetReadDeadline(time.Now().Add(idle))
		_, err := pc.br.Read(buf)
		var ne net.Error
		switch {
		case err == nil:
			continue // bytes on the TCP connection mean nothing: dropped
		case errors.As(err, &ne) && ne.Timeout():
			if time.Since(time.Unix(0, a.last.Load())) < idle {
				continue
			}
			return errors.New("association idle")
		case errors.Is(err, net.ErrClosed):
			return errShutdown
		default:
			return nil // the client closed it: the normal end
		}
	}
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
