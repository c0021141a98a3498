package tunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/evloop"
	"github.com/detour-proxy/detour/tunnel/relay"
)

// evConn is one transparent connection on an event loop, from accept to
// its access line: serveConn's stages as steps driven by the sockets'
// events. Everything here runs on the loop's goroutine; other goroutines
// reach a connection only through conn.cutOff, which posts to the loop.
type evConn struct {
	lp     *eventLoop
	c      *conn // the Tunnel's record: limits, Shutdown
	cfd    int   // the client
	sfd    int   // the server; -1 until dialled
	ctok   evloop.Token
	stok   evloop.Token
	can    [2]relay.Can   // client, server: what their events allowed, until the relay
	sock   *fdSocket      // the server socket, as Control and the loop guard see it
	sockTo netip.AddrPort // what sock was dialled to
	dst    netip.AddrPort
	router *Router
	start  time.Time
	stage  evStage

	buf        []byte // the client's first bytes, from the loop's Kit
	sniffStart time.Time
	sn         sniffed
	sniffing   bool // holds a sniffing slot

	route     Action
	routed    bool // route is decided (on the address alone, or after the sniff)
	dialStart time.Time
	dialErr   error // a dial that failed while the sniff went on
	connected bool
	up        *evUpstream // the way through an upstream group, if any
	down      []byte      // the server's first bytes, come with a proxy's reply

	sniffTimer evloop.Timer
	timer      evloop.Timer // the dial's timeout, then the relay's idle timeout
	pair       relay.Pair
	last       time.Time // when the relay last moved bytes
	moved      int64     // bytes moved by then

	// Kept here so a connection is one allocation: c points to rec, the
	// first dial's sock to firstSock.
	rec       conn
	firstSock fdSocket
	sockUsed  bool // firstSock was handed out
}

// The stages of an evConn.
type evStage uint8

const (
	evSniff   evStage = iota // reading the client's first bytes (maybe dialling too)
	evConnect                // sniffed; waiting for the server's connect
	evRelay                  // relaying
	evDone                   // closed, or handed to a goroutine
)

// evClient and evServer are an evConn as the handler of its client's and
// its server's socket; the alarms, as what its timers call.
type (
	evClient     evConn
	evServer     evConn
	evSniffAlarm evConn
	evDialAlarm  evConn
	evIdleAlarm  evConn
	evUpAlarm    evConn
)

func (a *evSniffAlarm) Alarm() { (*evConn)(a).sniffTimedOut() }
func (a *evDialAlarm) Alarm()  { (*evConn)(a).dialTimedOut() }
func (a *evIdleAlarm) Alarm()  { (*evConn)(a).checkIdle() }
func (a *evUpAlarm) Alarm()    { (*evConn)(a).upTimedOut() }

// serve starts the data path of a connection just accepted: stage 1, the
// original destination; then the sniff, or a hand-over to a goroutine when
// the route is an upstream group whatever the client says.
func (lp *eventLoop) serve(ln descListener, fd int, peer netip.AddrPort) {
	t := lp.t
	e := &evConn{lp: lp, cfd: fd, sfd: -1, start: lp.l.Now()}
	e.rec.peer, e.rec.ev = peer, e
	e.c = &e.rec
	if !t.admitEv(e.c) {
		return
	}
	if t.Observer != nil {
		t.Observer.Accepted()
	}
	dst, err := ln.OriginalDstFD(fd, peer)
	if err != nil {
		t.refuse(e.c, dst, "not_redirected", err)
		return
	}
	if t.Loops != nil && t.Loops.Looped(peer, dst) {
		t.refuseLoop(e.c, dst)
		return
	}
	e.dst, e.router = dst, t.router.Load()
	evloop.NoDelay(fd)
	if e.ctok, err = lp.l.Add(fd, (*evClient)(e)); err != nil {
		e.fail(fmt.Errorf("client: %w", err))
		return
	}
	a, final := e.router.RouteByAddr(dst)
	if final && a.Kind == ActionProxy && a.Group != nil && !loopable(a) {
		e.handOff(nil) // preconnect and sniff on a goroutine (tunnel.go)
		return
	}
	e.startSniff(a, final)
}

// admitEv counts c as served, like dispatch: beyond MaxConns it is reset,
// or a connection of the client holding the most is. It reports false,
// having closed c's socket, when c is not served.
func (t *Tunnel) admitEv(c *conn) bool {
	result, evicted := t.add(c)
	switch result {
	case addShutdown:
		evloop.Close(c.ev.cfd, false)
		return false
	case addFull:
		evloop.Close(c.ev.cfd, true)
		t.refusedForLimit(c.peer)
		return false
	}
	if evicted != nil {
		evicted.cutOff(errEvicted)
		t.evictedForLimit(evicted, c.peer)
	}
	return true
}

func (h *evClient) Ready(ev uint32) {
	e := (*evConn)(h)
	if e.stage == evRelay {
		e.pair.Event(0, ev)
		e.run()
		return
	}
	e.can[0] |= relay.CanFrom(ev)
	if e.stage == evSniff {
		e.readSniff()
	}
}

func (h *evServer) Ready(ev uint32) {
	e := (*evConn)(h)
	if e.stage == evRelay {
		e.pair.Event(1, ev)
		e.run()
		return
	}
	e.can[1] |= relay.CanFrom(ev)
	switch {
	case e.stage == evDone || e.connected:
	case e.up != nil:
		e.upReady(ev)
	case ev&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) != 0:
		e.connectDone(ev)
	}
}

// startSniff is stage 2, unless sniffing is off, the port is a
// server-first one, dst is known to speak first, or too many connections
// are being sniffed (the same choice as Tunnel.sniff). a and final are the
// route by the address alone (Router.RouteByAddr): when final, the connect
// starts at once and overlaps the wait for the first bytes.
func (e *evConn) startSniff(a Action, final bool) {
	t := e.lp.t
	switch {
	case t.Sniff.Disabled:
		e.sn.outcome = "off"
	case t.skipPort(e.dst.Port()):
		e.sn.outcome = "skipped"
	case t.silent.Silent(e.dst):
		e.sn.outcome, e.sn.watch = "skipped", true
	case !t.enterSniffing(e.c.peer.Addr()):
		e.sn.outcome = "busy"
	default:
		e.sniffing, e.sniffStart = true, e.lp.l.Now()
		e.buf = e.lp.kit.GetBuf()
		timeout := t.Sniff.Timeout
		if timeout <= 0 {
			timeout = sniff.DefaultTimeout
		}
		e.lp.l.Arm(&e.sniffTimer, timeout, (*evSniffAlarm)(e))
		if !e.connectEarly(a, final) {
			return
		}
		e.readSniff()
		return
	}
	if t.Observer != nil {
		t.Observer.Sniffed(e.sn.found, e.sn.outcome, 0)
	}
	e.stage = evConnect
	e.sniffed()
}

// connectEarly starts stage 4 before the sniff when the name cannot change
// the route (final: a is the route): a direct route is dialled; through an
// upstream group whose pick cannot depend on the name, the proxy is
// connected and greeted (see preconnect; serve handed a group the loop
// cannot carry to a goroutine). It reports false when the connection is
// over.
func (e *evConn) connectEarly(a Action, final bool) bool {
	switch {
	case !final:
	case a.Kind == ActionDirect || a.Kind == ActionProxy && a.Group == nil:
		e.route, e.routed = a, true
		return e.dial()
	case a.Kind == ActionProxy && a.Group.PicksWithoutName():
		e.upStart(a, true)
		return e.stage != evDone
	}
	return true
}

// readSniff reads the client's first bytes until sniff.Judge has its
// verdict, the client has nothing more for now, or it is gone.
func (e *evConn) readSniff() {
	limit := e.lp.t.Sniff.MaxBytes
	if limit <= 0 {
		limit = sniff.DefaultMaxBytes
	}
	for e.stage == evSniff && e.can[0]&relay.CanRead != 0 {
		n, err := evloop.Read(e.cfd, e.buf[len(e.buf):cap(e.buf)])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			e.can[0] &^= relay.CanRead
			return
		case err != nil:
			e.endSniff(sniff.Closed, os.NewSyscallError("read", err))
			return
		case n == 0:
			e.endSniff(sniff.Closed, io.EOF)
			return
		}
		if len(e.buf)+n < cap(e.buf) {
			e.can[0].ShortRead()
		}
		e.buf = e.buf[:len(e.buf)+n]
		r, o, done, grow := sniff.Judge(e.buf, limit)
		if done {
			e.sn.found = r
			e.endSniff(o, nil)
			return
		}
		if grow > cap(e.buf) {
			b := make([]byte, len(e.buf), grow)
			copy(b, e.buf)
			e.lp.kit.PutBuf(e.buf)
			e.buf = b
		}
	}
}

func (e *evConn) sniffTimedOut() {
	if e.stage == evSniff {
		e.endSniff(sniff.Timeout, nil)
	}
}

// endSniff ends stage 2 with outcome o (err: the read error behind a
// Closed one), as Tunnel.peek does.
func (e *evConn) endSniff(o sniff.Outcome, err error) {
	t := e.lp.t
	e.stage = evConnect
	e.lp.l.Stop(&e.sniffTimer)
	if e.sniffing {
		e.sniffing = false
		t.leaveSniffing(e.c.peer.Addr())
	}
	e.sn.first, e.sn.outcome, e.sn.took = e.buf, o.String(), e.lp.l.Now().Sub(e.sniffStart)
	e.sn.watch = o == sniff.Timeout && len(e.buf) == 0
	if t.Observer != nil {
		t.Observer.Sniffed(e.sn.found, e.sn.outcome, e.sn.took)
	}
	if o == sniff.Closed && isReset(err) && e.dialErr == nil {
		e.dialErr = fmt.Errorf("client: %w", err)
	}
	e.sniffed()
}

// sniffed goes on after stage 2: stage 3, the route (unless decided
// before the sniff), then stage 4, the connect; the relay starts once the
// server is connected. A route through an upstream group goes on on a
// goroutine (handOff).
func (e *evConn) sniffed() {
	if e.dialErr != nil {
		e.fail(e.dialErr)
		return
	}
	if !e.routed {
		a, err := route(e.router, e.dst, e.sn.found)
		e.route, e.routed = a, true
		switch {
		case err != nil:
			e.fail(err)
		case a.Kind == ActionProxy && a.Group != nil && loopable(a):
			e.upStart(a, false) // upDone starts the relay
		case a.Kind == ActionProxy && a.Group != nil:
			e.handOff(&e.sn)
		default:
			e.dial() // connectDone starts the relay
		}
		return
	}
	switch {
	case e.connected:
		e.startRelay()
	case e.up != nil && e.stage == evConnect:
		e.upRead() // sends the request once the greeting is done
	}
}

// dial starts connecting to the original destination; it reports false
// when the connection failed at once (and is over).
func (e *evConn) dial() bool {
	t, l := e.lp.t, e.lp.l
	e.dialStart = l.Now()
	if t.dials.Err() != nil {
		e.fail(errShutdown)
		return false
	}
	fd, err := evloop.Socket(e.dst)
	if err != nil {
		return e.dialFailed(err)
	}
	e.sfd, e.sock, e.sockTo = fd, e.newSock(fd), e.dst
	if err := t.prepareSocket(e.sock, e.dst); err != nil {
		return e.dialFailed(err)
	}
	evloop.NoDelay(fd)
	if e.stok, err = l.Add(fd, (*evServer)(e)); err != nil {
		return e.dialFailed(err)
	}
	switch err := evloop.Connect(fd, e.dst); err {
	case nil:
		return e.connectDone(syscall.EPOLLOUT)
	case syscall.EINPROGRESS:
		l.Arm(&e.timer, t.dialTimeout(), (*evDialAlarm)(e))
		return true
	default:
		return e.dialFailed(os.NewSyscallError("connect", err))
	}
}

// prepareSocket does to a socket a loop dials to dst what setup's control
// does to the goroutines' (the mark, Control, the loop guard's record),
// without its closures and without dst as a string to parse back.
func (t *Tunnel) prepareSocket(s *fdSocket, dst netip.AddrPort) error {
	if t.Mark != 0 {
		if err := setMark(s.fd, t.Mark); err != nil {
			return markError(t.Mark, dst.String(), err)
		}
	}
	if t.Control != nil {
		if err := t.Control("tcp", dst.String(), s); err != nil {
			return err
		}
	}
	if t.Loops != nil {
		s.rec.rc = s
		t.Loops.track(dst, &s.rec)
	}
	return nil
}

// connectDone is the end of the connect: ev is the server socket's first
// event that says so.
func (e *evConn) connectDone(ev uint32) bool {
	if ev&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
		err := evloop.SockError(e.sfd)
		if err == nil {
			err = syscall.ECONNRESET
		}
		return e.dialFailed(os.NewSyscallError("connect", err))
	}
	e.connected = true
	e.lp.l.Stop(&e.timer)
	if obs := e.lp.t.Observer; obs != nil {
		obs.Dialed(e.route.String(), e.lp.l.Now().Sub(e.dialStart), nil)
	}
	if e.stage == evConnect {
		e.startRelay()
	}
	return true
}

func (e *evConn) dialTimedOut() {
	if e.stage != evDone && !e.connected {
		e.dialFailed(errDialTimeout)
	}
}

// errDialTimeout is a connect that took longer than DialTimeout.
var errDialTimeout = &net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}

// dialFailed ends a failed dial: at once, or, while the client's first
// bytes are awaited, once they came (the access line names the host).
func (e *evConn) dialFailed(err error) bool {
	e.lp.l.Stop(&e.timer)
	err = fmt.Errorf("dial tcp %s: %w", e.dst, err)
	if obs := e.lp.t.Observer; obs != nil {
		obs.Dialed(e.route.String(), e.lp.l.Now().Sub(e.dialStart), err)
	}
	e.closeServer(true)
	if e.stage == evSniff {
		e.dialErr = err
		return true
	}
	e.fail(err)
	return false
}

// startRelay is stages 5 and 6: the sniffed bytes go to the server first,
// then bytes flow both ways until both sides are done.
func (e *evConn) startRelay() {
	t, l := e.lp.t, e.lp.l
	e.stage = evRelay
	var watch func(server bool)
	if e.sn.watch {
		watch = t.watchFirst(e.dst, e.c.peer.Addr(), l.Now())
	}
	first, down := e.buf, e.down
	e.buf, e.down = nil, nil
	e.pair.Init(e.lp.kit, e.cfd, e.sfd, first, down, e.can, watch)
	e.last = l.Now()
	l.Arm(&e.timer, t.idleTimeout(), (*evIdleAlarm)(e))
	e.run()
}

// run moves what can be moved now.
func (e *evConn) run() {
	st := e.pair.Run()
	if up, down := e.pair.Moved(); up+down != e.moved {
		e.moved, e.last = up+down, e.lp.l.Now()
	}
	switch st {
	case relay.Over:
		e.endRelay()
	case relay.Again:
		e.lp.l.Later((*evClient)(e))
	}
}

// errIdle ends a relay on which nothing moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// checkIdle ends the relay if nothing moved for the idle timeout, else
// waits for the rest of it.
func (e *evConn) checkIdle() {
	if e.stage != evRelay {
		return
	}
	idle := e.lp.t.idleTimeout()
	quiet := e.lp.l.Now().Sub(e.last)
	if quiet < idle {
		e.lp.l.Reset(&e.timer, idle-quiet)
		return
	}
	e.pair.Abort(errIdle, false)
	e.endRelay()
}

// endRelay closes both sockets and writes the access line.
func (e *evConn) endRelay() {
	e.stage = evDone
	e.lp.l.Stop(&e.timer)
	e.forget()
	e.pair.Close()
	e.lp.relayEnded()
	up, down := e.pair.Moved()
	e.lp.t.finish(e.c, e.info(), up, down, e.pair.Err())
}

// fail ends a connection before its relay: both sockets are reset (the
// closest a proxy that accepted can come to "connection refused"), and the
// access line says why.
func (e *evConn) fail(err error) {
	if e.stage == evDone {
		return
	}
	e.close(true)
	e.lp.t.finish(e.c, e.info(), 0, 0, err)
}

// close ends e's stages without an access line, closing its sockets.
func (e *evConn) close(reset bool) {
	l := e.lp.l
	e.stage = evDone
	l.Stop(&e.sniffTimer)
	l.Stop(&e.timer)
	if e.sniffing {
		e.sniffing = false
		e.lp.t.leaveSniffing(e.c.peer.Addr())
	}
	if e.buf != nil {
		e.lp.kit.PutBuf(e.buf)
		e.buf = nil
	}
	if e.down != nil {
		e.lp.kit.PutBuf(e.down)
		e.down = nil
	}
	if e.up != nil {
		e.preconnected(false)
	}
	e.closeServer(reset)
	l.Remove(e.ctok)
	evloop.Close(e.cfd, reset)
}

// closeServer closes the server socket, if any.
func (e *evConn) closeServer(reset bool) {
	if e.sfd < 0 {
		return
	}
	e.lp.l.Remove(e.stok)
	e.closeSock()
	evloop.Close(e.sfd, reset)
	e.sfd = -1
	if e.up != nil {
		e.up.release()
	}
}

// closeSock marks the server socket closed for the loop guard and
// Control's holders, before its descriptor is closed.
func (e *evConn) closeSock() {
	if e.sock == nil {
		return
	}
	if g := e.lp.t.Loops; g != nil {
		g.dialClosed(e.sockTo, e.sock)
	}
	e.sock.close()
	e.sock = nil
}

// forget takes both sockets out of the loop before the Pair closes them.
func (e *evConn) forget() {
	e.lp.l.Remove(e.ctok)
	e.lp.l.Remove(e.stok)
	e.closeSock()
}

// cut ends e for Shutdown or the connection limit (conn.cutOff).
func (e *evConn) cut(err error) {
	switch e.stage {
	case evDone:
	case evRelay:
		e.pair.Abort(err, true)
		e.endRelay()
	default:
		e.fail(err)
	}
}

// info is the access line's account of e.
//
// It is the loop's one connInfo, filled anew: finish uses it and lets go
// of it before it returns, on the loop's goroutine, and a held connection
// does not carry one.
func (e *evConn) info() *connInfo {
	c := &e.lp.line
	*c = connInfo{start: e.start, peer: e.c.peer, dst: e.dst, found: e.sn.found, outcome: e.sn.outcome,
		sniffTook: e.sn.took, route: e.route}
	if up := e.up; up != nil {
		c.lease, c.target = up.lease, up.target
		if c.lease.Upstream == nil {
			c.lease.Upstream = up.u // failed: the last one tried
		}
	}
	return c
}

// handOff moves e to a goroutine, for a route through an upstream group:
// the client's socket leaves the loop for the runtime's poller, and
// serveFrom goes on from stage 2 (sn nil) or 3.
func (e *evConn) handOff(sn *sniffed) {
	t, l := e.lp.t, e.lp.l
	e.stage = evDone
	l.Stop(&e.sniffTimer)
	l.Delete(e.ctok, e.cfd)
	var done *sniffed
	if sn != nil {
		s := *sn
		s.first = append([]byte(nil), e.buf...)
		done = &s
	}
	if e.buf != nil {
		e.lp.kit.PutBuf(e.buf)
		e.buf = nil
	}
	client, err := tcpConnOf(e.cfd)
	if err != nil {
		evloop.Close(e.cfd, true)
		t.finish(e.c, e.info(), 0, 0, fmt.Errorf("client: %w", err))
		return
	}
	if err := e.c.leaveLoop(client); err != nil {
		t.finish(e.c, e.info(), 0, 0, err) // cut meanwhile
		return
	}
	router, dst, start := e.router, e.dst, e.start
	t.workers.run(func() { t.serveFrom(e.c, start, dst, router, done) })
}

// tcpConnOf makes fd a *net.TCPConn (a descriptor of its own, in the
// runtime's poller) and closes fd.
func tcpConnOf(fd int) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), "client")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("not a TCP connection: %T", c)
	}
	return tc, nil
}

// fdSocket is a loop's socket as Control functions (the socket mark) and
// the loop guard see it: a syscall.RawConn whose Control runs only while
// the socket is open, so a closed socket's reused number is never touched.
type fdSocket struct {
	mu     sync.Mutex
	fd     int
	closed bool
	rec    dialing // the loop guard's record of it
}

var errSocketClosed = errors.New("socket closed")

// newSock is the fdSocket of fd, a socket e dials: the one kept in e the
// first time (a closed one is never reused: the loop guard may still ask it).
func (e *evConn) newSock(fd int) *fdSocket {
	if !e.sockUsed {
		e.sockUsed, e.firstSock.fd = true, fd
		return &e.firstSock
	}
	return &fdSocket{fd: fd}
}

func (s *fdSocket) Control(f func(fd uintptr)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errSocketClosed
	}
	f(uintptr(s.fd))
	return nil
}

func (s *fdSocket) Read(func(fd uintptr) bool) error  { return errors.ErrUnsupported }
func (s *fdSocket) Write(func(fd uintptr) bool) error { return errors.ErrUnsupported }

// close marks s closed; the caller closes the descriptor after.
func (s *fdSocket) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}
