package upstream

import (
	"context"
	"net"
	"net/netip"
	"sync"
)

// PicksWithoutName reports whether the group's choice of upstream cannot
// depend on the name sniffed from the client: round-robin, weighted,
// least-connections, or consistent hashing on the client's address. Only
// then may Preconnect run before the name is known.
func (g *Group) PicksWithoutName() bool {
	switch g.Strategy.(type) {
	case nil, *RoundRobin, *Weighted, *LeastConn:
		return true
	case *ConsistentHash:
		return g.Key == HashClient
	}
	return false // a strategy of the caller's: it may read anything
}

// Preconnect opens a connection through the upstream the strategy picks
// for key and finishes the part of the handshake that does not name the
// target, while the caller is still learning the target (sniffing the
// client's first bytes). The Pending's Dial then sends only the request.
//
// It returns nil and no error when the group's choice may depend on the
// name (see PicksWithoutName) or the upstream picked cannot prepare (a
// direct member): the caller dials as usual once the target is known. A
// failure fails over to the next upstream like Dial, and benches the
// upstream like Dial: what fails here (the proxy unreachable, a broken
// greeting, our credentials refused) no target and no client could cause.
// The error is returned only when every upstream failed; ctx done ends the
// search without benching anyone.
func (g *Group) Preconnect(ctx context.Context, key string) (*Pending, error) {
	if len(g.Upstreams) == 0 || !g.PicksWithoutName() {
		return nil, nil
	}
	g.unbench(g.now())
	tried := make([]*Upstream, 0, len(g.Upstreams))
	var errs []error
	for len(tried) < len(g.Upstreams) {
		u := g.next(key, tried)
		if u == nil {
			break
		}
		hs, ok := u.Handshake()
		if !ok {
			return nil, nil
		}
		tried = append(tried, u)
		c, err := hs.dialPrepared(ctx)
		switch {
		case err == nil:
			u.active.Add(1)
			g.markUp(u, "dial")
			return &Pending{g: g, u: u, hs: hs, conn: c, key: key}, nil
		case ctxErr(ctx) != nil:
			return nil, ctx.Err()
		}
		g.Report(u, err)
		errs = append(errs, err)
	}
	return nil, g.Failure(tried, errs, false)
}

func (g *Group) strategy() Strategy {
	if g.Strategy == nil {
		return &g.rr
	}
	return g.Strategy
}

// Pending is a connection Preconnect opened, waiting for its target. Its
// upstream counts it as active from Preconnect on. Exactly one of Dial or
// Close ends it.
type Pending struct {
	g    *Group
	u    *Upstream
	hs   Handshake // prepared
	key  string
	mu   sync.Mutex
	conn *net.TCPConn // nil once handed out or closed
}

// Conn is the connection to the upstream, for a caller that must be able
// to reset it meanwhile (shutdown); nil once Dial or Close took it.
func (p *Pending) Conn() *net.TCPConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn
}

// Upstream is the upstream the connection goes through.
func (p *Pending) Upstream() *Upstream { return p.u }

// Dial sends the request for target on the prepared connection and returns
// it as a Lease. If the upstream refuses the request, the group's other
// upstreams are tried, as Dial would; if the prepared connection broke
// meanwhile (the proxy closed it while the client was slow to speak), a
// new connection is dialled through the group, and the upstream is not
// benched for it: how long a client waits is the client's business, so
// its prepared connection teaches the group nothing. A target failure ends
// the search as in Dial.
func (p *Pending) Dial(ctx context.Context, target string, dst netip.AddrPort) (Lease, error) {
	p.mu.Lock()
	c := p.conn
	p.conn = nil
	p.mu.Unlock()
	if c == nil {
		return Lease{Upstream: p.u}, net.ErrClosed
	}
	err := p.hs.finish(ctx, c, target)
	if err == nil {
		return Lease{Conn: c, Upstream: p.u, held: true}, nil
	}
	c.Close()
	p.u.active.Add(-1)
	switch {
	case ctxErr(ctx) != nil, isTargetFailure(err):
		return Lease{Upstream: p.u}, groupErr(p.g.Name, p.u, err)
	case isRequestRefused(err):
		return p.g.dial(ctx, target, dst, p.key, []*Upstream{p.u}, []error{err})
	}
	return p.g.dial(ctx, target, dst, p.key, nil, nil)
}

// Close closes a connection that Dial did not take, and stops counting it.
// It reports whether there was one: an unused pre-connection.
func (p *Pending) Close() bool {
	p.mu.Lock()
	c := p.conn
	p.conn = nil
	p.mu.Unlock()
	if c == nil {
		return false
	}
	c.Close()
	p.u.active.Add(-1)
	return true
}
