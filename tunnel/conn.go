package tunnel

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/detour-proxy/detour/tunnel/relay"
)

// errShutdown ends a connection still open when the shutdown grace period
// ran out.
var errShutdown = errors.New("closed by shutdown")

// conn is one accepted connection from accept to its access line, as
// Shutdown sees it: the client, the server once dialled, the relay once
// started. Shutdown may cut it in any stage; a cut connection starts
// nothing more.
type conn struct {
	client *net.TCPConn   // nil while on an event loop (ev)
	peer   netip.AddrPort // the client's address
	ev     *evConn        // the connection on an event loop; nil once handed to a goroutine
	src    netip.Prefix   // the client's sniff.SourceKey, with MaxConns

	mu     sync.Mutex
	server *net.TCPConn // once dialled
	relay  *relay.Relay // once relaying
	cut    error        // why Shutdown cut it; nil until then
	ended  bool         // its sockets are closed
}

// cutOff resets whatever c holds now: the relay, or the client and the
// server dialled so far. The stage that is running notices (its socket is
// closed) and ends with err.
func (c *conn) cutOff(err error) {
	c.mu.Lock()
	if c.cut != nil {
		c.mu.Unlock()
		return
	}
	c.cut = err
	if ev := c.ev; ev != nil {
		c.mu.Unlock()
		ev.lp.l.Post(func() { ev.cut(err) }) // fails only once the loop is gone, with ev
		return
	}
	r := c.relay
	if r == nil && !c.ended {
		c.ended = true
		resetClose(c.client)
		resetClose(c.server)
	}
	c.mu.Unlock()
	if r != nil {
		r.Abort(err) // outside the lock: its end calls back into the tunnel
	}
}

// setServer attaches the dialled server. When c was cut meanwhile it resets
// server and returns the cut's error.
func (c *conn) setServer(server *net.TCPConn) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut != nil {
		resetClose(server)
		return c.cut
	}
	c.server = server
	return nil
}

// serverConn is the server attached to c, nil if none.
func (c *conn) serverConn() *net.TCPConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.server
}

// startRelay hands c's client and server to the engine, unless c was cut
// (then it returns the cut's error). first, if not nil, hears whose bytes
// came first (relay.Engine.StartWatching).
func (c *conn) startRelay(e *relay.Engine, idle time.Duration, first func(server bool), done func(up, down int64, err error)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut != nil {
		return c.cut
	}
	if first != nil {
		c.relay = e.StartWatching(c.client, c.server, idle, first, done)
	} else {
		c.relay = e.Start(c.client, c.server, idle, done)
	}
	return nil
}

// end closes what c holds when it ends before relaying: with a reset (the
// closest a proxy that accepted can come to "connection refused", and how a
// client's reset is passed on), or plainly. Only the first call (or a cut)
// closes.
func (c *conn) end(reset bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return
	}
	c.ended = true
	if c.ev != nil {
		c.ev.close(reset) // on the loop's goroutine
		return
	}
	for _, s := range []*net.TCPConn{c.client, c.server} {
		if s == nil {
			continue
		}
		if reset {
			s.SetLinger(0)
		}
		s.Close()
	}
}

// leaveLoop attaches client, c's socket taken off its event loop, for the
// goroutine that serves c from now on. When c was cut meanwhile it resets
// client and returns the cut's error.
func (c *conn) leaveLoop(client *net.TCPConn) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut != nil {
		c.ended = true
		resetClose(client)
		return c.cut
	}
	c.client, c.ev = client, nil
	return nil
}

// resetClose closes s with a reset; nil is fine.
func resetClose(s *net.TCPConn) {
	if s != nil {
		s.SetLinger(0)
		s.Close()
	}
}

// isReset reports whether err means the peer reset the connection.
func isReset(err error) bool { return relay.IsReset(err) }
