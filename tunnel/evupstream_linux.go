package tunnel

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/tunnel/evloop"
	"github.com/detour-proxy/detour/tunnel/relay"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// Stage 4 through an upstream group on an event loop: the connection to
// the proxy and its handshake (upstream.Handshake: SOCKS5 or HTTP CONNECT)
// on the server socket, driven by its events, with Dial's choice, failover
// and health rules (Group.Pick, Report, Lease). When the group's pick
// cannot depend on the name, it starts with the sniff, as preconnect does:
// the greeting (and authentication) are done by the time the name is
// known, and only the request is left.

// evUpstream is an evConn's way through an upstream group.
type evUpstream struct {
	g         *upstream.Group
	key       string
	u         *upstream.Upstream // the one being tried
	h         upstream.Handshake
	tried     []*upstream.Upstream
	errs      []error
	pre       bool // opened before the target was known
	up        bool // the TCP connection to the proxy is up
	requested bool
	lease     upstream.Lease
	target    string
	start     time.Time
}

// loopable reports whether the loop can carry a route through g: every
// upstream a proxy named by its address that speaks a protocol Handshake
// knows. (A proxy named by a host name needs a lookup, and a name checked
// by Verify a resolver: those go to a goroutine.)
func loopable(a Action) bool {
	if a.Name == Verify {
		return false
	}
	for _, u := range a.Group.Upstreams {
		if _, ok := u.ProxyAddr(); !ok {
			return false
		}
		if _, ok := u.Handshake(); !ok {
			return false
		}
	}
	return len(a.Group.Upstreams) > 0
}

// upStart starts through a's group: pre, before the target is known.
func (e *evConn) upStart(a Action, pre bool) {
	e.route, e.routed = a, true
	g := a.Group
	e.up = &evUpstream{g: g, key: g.Key.Key(e.c.peer, e.dst, e.sn.found.Host), pre: pre, start: e.lp.l.Now()}
	e.dialStart = e.up.start
	e.upNext(false)
}

// upNext connects to the next upstream to try; fresh starts the search
// over (a pre-connection broke while it waited: not the upstream's fault).
func (e *evConn) upNext(fresh bool) {
	t, up := e.lp.t, e.up
	if fresh {
		up.tried, up.errs = up.tried[:0], up.errs[:0]
	}
	if t.dials.Err() != nil {
		e.upFail(errShutdown)
		return
	}
	u := up.g.Pick(up.key, up.tried)
	if u == nil {
		e.upFail(up.g.Failure(up.tried, up.errs, false))
		return
	}
	addr, _ := u.ProxyAddr()
	up.u, up.up, up.requested = u, false, false
	up.h, _ = u.Handshake()
	fd, err := evloop.Socket(addr)
	if err == nil {
		e.sfd, e.sock, e.sockTo = fd, e.newSock(fd), addr
		err = e.upConnect(addr)
	}
	if err != nil {
		e.upTried(fmt.Errorf("dial tcp %s: %w", addr, err))
	}
}

// upConnect starts the socket's connect to the proxy at addr, within half
// the dial budget (the rest is the handshake's), as Dial does.
func (e *evConn) upConnect(addr netip.AddrPort) error {
	t, l := e.lp.t, e.lp.l
	if err := t.prepareSocket(e.sock, addr); err != nil {
		return err
	}
	evloop.NoDelay(e.sfd)
	var err error
	if e.stok, err = l.Add(e.sfd, (*evServer)(e)); err != nil {
		return err
	}
	e.can[1] = 0
	switch err := evloop.Connect(e.sfd, addr); err {
	case nil:
		e.upReady(syscall.EPOLLOUT)
	case syscall.EINPROGRESS:
		l.Arm(&e.timer, t.dialTimeout()/2, (*evUpAlarm)(e))
	default:
		return os.NewSyscallError("connect", err)
	}
	return nil
}

// upReady is an event on the server socket while the handshake runs.
func (e *evConn) upReady(ev uint32) {
	up := e.up
	if !up.up {
		if ev&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
			err := evloop.SockError(e.sfd)
			if err == nil {
				err = syscall.ECONNRESET
			}
			e.upTried(fmt.Errorf("dial tcp %s: %w", e.upAddr(), os.NewSyscallError("connect", err)))
			return
		}
		if ev&syscall.EPOLLOUT == 0 {
			return
		}
		up.up = true
		if up.pre {
			// Counted from now on, as Preconnect's Pending is: a
			// least-conn pick sees the pre-connections held open.
			up.lease = up.g.Lease(up.u, nil)
		}
		// The greeting (and authentication) have the other half of this
		// attempt's budget: a proxy that never answers is given up, and
		// benched, without eating the next one's.
		e.lp.l.Arm(&e.timer, e.lp.t.dialTimeout()/2, (*evUpAlarm)(e))
		if !e.upSend(up.h.Out(e.upBuf())) {
			return
		}
	}
	e.upRead()
}

// upRead feeds what the proxy sent to the handshake.
func (e *evConn) upRead() {
	up := e.up
	for e.stage != evDone && e.up == up && !up.h.Done() && e.can[1]&relay.CanRead != 0 {
		if up.h.Prepared() {
			if e.stage == evConnect && !up.requested {
				e.upRequest()
				continue
			}
			// The target is not known yet: the connection waits as long
			// as the sniff does; the request gets a dial timeout of its
			// own (as Preconnect and Pending.Dial have each theirs).
			e.lp.l.Stop(&e.timer)
			return
		}
		// Whatever follows the reply is the server's: Feed says where it
		// starts, so reading more than Need is safe.
		buf := e.lp.kit.Scratch()
		n, err := evloop.Read(e.sfd, buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			e.can[1] &^= relay.CanRead
			if up.h.Prepared() && e.stage == evConnect && !up.requested {
				e.upRequest()
				continue
			}
			return
		case err != nil || n == 0:
			if err == nil {
				err = io.EOF
			}
			e.upBroken(up.h.ReadError(err))
			return
		}
		if n < len(buf) {
			e.can[1].ShortRead() // the next bytes bring an event
		}
		k, err := up.h.Feed(buf[:n])
		if err != nil {
			e.upTried(err)
			return
		}
		if up.h.Done() {
			e.upDone(buf[k:n])
			return
		}
		if !e.upSend(up.h.Out(e.upBuf())) {
			return
		}
	}
	switch {
	case e.stage == evDone || e.up != up || !up.h.Prepared() || up.requested:
	case e.stage == evConnect:
		e.upRequest()
	default:
		e.lp.l.Stop(&e.timer) // waiting for the target, as above
	}
}

// upRequest asks the upstream for the target, once the sniff is over and
// the handshake prepared.
func (e *evConn) upRequest() {
	t, up := e.lp.t, e.up
	up.requested = true
	if up.pre { // a fresh dial timeout, as Pending.Dial has
		e.lp.l.Arm(&e.timer, t.dialTimeout(), (*evUpAlarm)(e))
	}
	up.target = t.proxyTarget(context.Background(), e.route.Name, e.c.peer.Addr(), e.dst, e.sn.found)
	req, err := up.h.Request(e.upBuf(), up.target)
	if err != nil {
		e.upFail(err)
		return
	}
	e.upSend(req)
}

// upSend writes a handshake message to the proxy: small, on a socket whose
// buffer is empty, so all of it or an error.
func (e *evConn) upSend(b []byte) bool {
	if len(b) == 0 {
		return true
	}
	n, err := evloop.Write(e.sfd, b)
	if err == nil && n < len(b) {
		err = syscall.EAGAIN
	}
	if err != nil {
		e.upBroken(e.up.h.ReadError(os.NewSyscallError("write", err)))
		return false
	}
	return true
}

// upDone: the tunnel is up; rest is the server's first bytes, which came
// with the reply.
func (e *evConn) upDone(rest []byte) {
	t, up := e.lp.t, e.up
	e.lp.l.Stop(&e.timer)
	up.g.Report(up.u, nil)
	if up.lease.Upstream == nil { // not counted since the connect
		up.lease = up.g.Lease(up.u, nil)
	}
	if len(rest) > 0 {
		e.down = append(e.lp.kit.GetBuf(), rest...)
	}
	e.connected = true
	if t.Observer != nil {
		t.Observer.Dialed(e.route.String(), e.lp.l.Now().Sub(up.start), nil)
		e.preconnected(true)
	}
	e.startRelay()
}

// upBroken is a failure to read from or write to the proxy. A
// pre-connection that broke once prepared (the proxy dropped it while the
// client was slow; the request may have gone before the close was read)
// says nothing of the upstream, as in Pending.Dial: the search starts
// over, unreported.
func (e *evConn) upBroken(err error) {
	up := e.up
	if up.pre && up.up && (up.requested || up.h.Prepared()) {
		e.lp.l.Stop(&e.timer)
		e.closeServer(true)
		e.preconnected(false) // replaced by a fresh connection
		e.upNext(true)
		return
	}
	e.upTried(err)
}

// upTried ends the attempt through the current upstream with err: the
// group's health rules say whether to try the next one.
func (e *evConn) upTried(err error) { e.upEnded(err, true) }

// upEnded ends the attempt through the current upstream with err; report
// says whether err tells of the upstream (Group.Report then says whether
// to try the next one), else the search ends without benching anyone.
func (e *evConn) upEnded(err error, report bool) {
	up := e.up
	e.lp.l.Stop(&e.timer)
	e.closeServer(true)
	up.tried = append(up.tried, up.u)
	up.errs = append(up.errs, err)
	if !report || !up.g.Report(up.u, err) {
		e.upFail(up.g.Failure(up.tried, up.errs, true))
		return
	}
	e.upNext(false)
}

func (e *evConn) upTimedOut() {
	up := e.up
	if up == nil || e.stage == evDone || e.connected {
		return
	}
	// Waiting for the reply to the request, the target may be slow: that
	// benches nobody.
	e.upEnded(fmt.Errorf("dial tcp %s: %w", e.upAddr(), errDialTimeout.Err), !up.requested)
}

// upFail ends the connection: no upstream carried it.
func (e *evConn) upFail(err error) {
	e.closeServer(true)
	if obs := e.lp.t.Observer; obs != nil {
		obs.Dialed(e.route.String(), e.lp.l.Now().Sub(e.dialStart), err)
	}
	e.preconnected(false)
	if e.stage == evSniff {
		e.dialErr = err // ended once the sniff is
		return
	}
	e.fail(err)
}

// preconnected tells a PreconnectObserver how a pre-connection ended, once.
func (e *evConn) preconnected(used bool) {
	up := e.up
	if up == nil || !up.pre {
		return
	}
	up.pre = false
	if po, ok := e.lp.t.Observer.(PreconnectObserver); ok {
		po.Preconnected(used)
	}
}

func (e *evConn) upAddr() string {
	addr, _ := e.up.u.ProxyAddr()
	return addr.String()
}

// release stops counting a connection to the proxy that is closed before
// it carried anything (a pre-connection is counted from its connect).
func (up *evUpstream) release() {
	up.lease.Release()
	up.lease = upstream.Lease{}
}

// upBuf is a buffer for one handshake message.
func (e *evConn) upBuf() []byte { return e.lp.kit.Scratch()[:0] }
