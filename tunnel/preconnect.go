package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// PreconnectObserver is an Observer that also hears how each upstream
// connection opened during the sniff (see preconnect) ended: used for its
// client's connection, or closed unused (the client went away or never
// spoke, or shutdown cut it).
type PreconnectObserver interface {
	Preconnected(used bool)
}

// preconnect is connectEarly for a proxied route: when the group's choice
// of upstream cannot depend on the name (upstream.Group.PicksWithoutName),
// it connects to the upstream the group picks and finishes the handshake
// up to the request (SOCKS5: method negotiation and authentication; HTTP
// CONNECT: the TCP connection), while the client's first bytes are on their
// way. connectPending then sends only the request, with the sniffed name.
// It returns no hop when the group cannot do that; an error when no
// upstream could be reached (the connection fails as a dial would).
//
// A pre-connection teaches nothing about its client: it is opened for
// every connection alike, before the client has said a word, and how long
// the client then keeps it waiting never benches the upstream (see
// upstream.Pending.Dial).
func (t *Tunnel) preconnect(c *conn, a Action, dst netip.AddrPort) (hop, error) {
	g := a.Group
	if !g.PicksWithoutName() {
		return hop{}, nil
	}
	if t.dials.Err() != nil {
		return hop{route: a}, errShutdown
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.dials, t.dialTimeout())
	defer cancel()
	p, err := g.Preconnect(ctx, g.Key.Key(c.peer, dst, ""))
	if err != nil {
		if t.dials.Err() != nil && errors.Is(err, context.Canceled) {
			err = errShutdown
		}
		if t.Observer != nil {
			t.Observer.Dialed(a.String(), time.Since(start), err)
		}
		return hop{route: a}, err
	}
	if p == nil {
		return hop{}, nil
	}
	server := p.Conn()
	if t.Loops != nil {
		t.Loops.Dialed(server)
	}
	if err := c.setServer(server); err != nil {
		t.dropPending(p) // cut by shutdown meanwhile
		return hop{route: a}, err
	}
	return hop{route: a, pending: p}, nil
}

// connectPending is connect for a hop preconnect opened: it asks the
// upstream for the target (the sniffed name when the route trusts it) on
// the prepared connection.
func (t *Tunnel) connectPending(c *conn, h hop, dst netip.AddrPort, found sniff.Result) (hop, error) {
	start := time.Now()
	if t.dials.Err() != nil {
		t.dropPending(h.pending)
		return h, errShutdown
	}
	ctx, cancel := context.WithTimeout(t.dials, t.dialTimeout())
	defer cancel()
	prepared := h.pending.Conn()
	h.target = t.proxyTarget(ctx, h.route.Name, c.peer.Addr(), dst, found)
	lease, err := h.pending.Dial(ctx, h.target, dst)
	h.pending = nil
	if err != nil && t.dials.Err() != nil && errors.Is(err, context.Canceled) {
		err = errShutdown
	}
	if t.Observer != nil {
		t.Observer.Dialed(h.route.String(), time.Since(start), err)
		if po, ok := t.Observer.(PreconnectObserver); ok {
			po.Preconnected(err == nil && lease.Conn == prepared)
		}
	}
	h.lease = lease
	if err != nil {
		h.lease.Conn = nil
		return h, err
	}
	if lease.Conn != prepared && t.Loops != nil {
		t.Loops.Dialed(lease.Conn)
	}
	if err := c.setServer(lease.Conn); err != nil {
		return h, err // cut meanwhile; finish releases the lease
	}
	h.server = lease.Conn
	return h, nil
}

// dropPending closes a pre-connection that will not be used, and counts it.
func (t *Tunnel) dropPending(p *upstream.Pending) {
	if conn := p.Conn(); conn != nil && t.Loops != nil {
		t.Loops.Closed(conn)
	}
	if p.Close() && t.Observer != nil {
		if po, ok := t.Observer.(PreconnectObserver); ok {
			po.Preconnected(false)
		}
	}
}
