package tunnel

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/proxyport"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// origin is the forward proxy's connection to one destination, kept for the
// client's next request to the same destination on the same route.
type origin struct {
	conn      *net.TCPConn
	br        *bufio.Reader
	bw        *bufio.Writer
	authority string // host:port asked for
	route     string
	dst       netip.AddrPort
	lease     upstream.Lease // released when the connection closes
	target    string
	reusable  bool // the last response left it ready for another request
}

func (o *origin) close() {
	if o == nil {
		return
	}
	o.conn.Close()
	o.lease.Release()
}

// forward serves absolute-form requests one after the other on the client
// connection, first req: each is routed and connected on its own (a
// connection to the same destination on the same route is kept for the
// next), sent on with its head rewritten and its body streamed, and its
// response streamed back. Pipelined requests wait in the client's buffer
// until the response before them is through. One access line per request.
func (pc *proxyConn) forward(req *proxyport.Request) {
	r, client := pc.r, pc.r.client
	cw := bufio.NewWriterSize(&idleConn{c: client, idle: pc.t.idleTimeout()}, 16<<10)
	var cur *origin
	end := func() {
		cur.close()
		lingerClose(r)
		pc.t.remove(r)
	}
	for {
		info := pc.info("http")
		info.start = time.Now()
		up, down, closeAfter, err := pc.exchange(req, &cur, cw, info)
		if pc.obs != nil {
			pc.obs.Closed(info.route.String(), up, down)
		}
		pc.t.logConn(info, up, down, err)
		if err != nil || closeAfter {
			end()
			return
		}
		client.SetReadDeadline(time.Now().Add(pc.t.idleTimeout()))
		next, err := proxyport.ReadRequest(pc.br, proxyport.Limits{})
		if err != nil {
			if err != io.EOF && !isTimeoutOrClosed(err) {
				info := pc.info("http")
				info.noRoute = true
				var pe *proxyport.Error
				if errors.As(err, &pe) && pe.Status != 0 {
					client.SetWriteDeadline(time.Now().Add(time.Second))
					client.Write(proxyport.AppendError(nil, pe.Status, pe.Msg))
				}
				if pc.obs != nil {
					pc.obs.Refused("bad_request")
				}
				pc.t.logConn(info, 0, 0, err)
			}
			end()
			return
		}
		if len(pc.p.Users) > 0 || next.IsConnect() {
			// A refusal, or a tunnel that takes the connection over, ends
			// the relay on its own.
			cur.close()
			cur = nil
			if !pc.httpAuthorized(next) {
				return
			}
			if next.IsConnect() {
				pc.serveCONNECT(next)
				return
			}
		}
		req = next
	}
}

// exchange carries one request and its response. It reports the bytes
// each way and whether the client connection must close after it.
func (pc *proxyConn) exchange(req *proxyport.Request, cur **origin, cw *bufio.Writer, info *connInfo) (up, down int64, closeAfter bool, err error) {
	host, addr := req.Host, netip.Addr{}
	if ip, perr := netip.ParseAddr(host); perr == nil {
		host, addr = "", ip
	}
	route, idx := pc.route(info, host, addr, req.Port, sniff.HTTP)
	info.found.Proto = sniff.HTTP
	reply := func(status int, err error) (int64, int64, bool, error) {
		b := proxyport.AppendError(nil, status, err.Error())
		cw.Write(b)
		cw.Flush()
		return 0, int64(len(b)), true, err
	}
	head := req.AppendHead(make([]byte, 0, 1024))
	hasBody := req.Chunked || req.ContentLength > 0
	for attempt := 0; ; attempt++ {
		o := *cur
		reused := o != nil && o.authority == req.Authority() && o.route == route.String()
		if !reused {
			o.close()
			*cur = nil
			server, derr := pc.connect(info, route, idx)
			if derr != nil {
				return reply(dialStatus(derr), derr)
			}
			sc := &idleConn{c: server, idle: pc.t.idleTimeout()}
			o = &origin{conn: server, br: bufio.NewReaderSize(sc, 16<<10), bw: bufio.NewWriterSize(sc, 16<<10),
				authority: req.Authority(), route: route.String(), dst: info.dst, lease: info.lease, target: info.target}
			*cur = o
			if err := pc.r.setServer(server); err != nil {
				return 0, 0, true, err // cut by Shutdown
			}
		} else {
			info.dst, info.target, info.lease = o.dst, o.target, o.lease // for the access line; released with o
		}
		up, down, closeAfter, err = pc.roundTrip(req, head, hasBody, o, cw, info)
		if err != nil && reused && attempt == 0 && !hasBody && down == 0 && errors.Is(err, errStaleOrigin) {
			// The kept connection was closed by the destination before
			// this request reached it: once more on a new one.
			o.close()
			*cur = nil
			continue
		}
		if err != nil || closeAfter || !o.reusable {
			o.close()
			*cur = nil
		}
		if err != nil && down == 0 && !errors.Is(err, errClientSide) {
			_, d, _, _ := reply(502, err)
			return up, d, true, err
		}
		return up, down, closeAfter, err
	}
}

var (
	errStaleOrigin = errors.New("kept connection closed by the destination")
	errClientSide  = errors.New("client")
)

// roundTrip sends one request on o and streams the response to the client.
func (pc *proxyConn) roundTrip(req *proxyport.Request, head []byte, hasBody bool, o *origin, cw *bufio.Writer, info *connInfo) (up, down int64, closeAfter bool, err error) {
	o.reusable = false
	tr := &trip{head: int64(len(head))}
	if err := pc.sendRequest(req, head, hasBody, o, tr); err != nil {
		return tr.up, 0, true, err
	}
	resp, err := pc.finalResponse(req, o, cw, tr)
	if err != nil {
		return tr.up, tr.down, true, err
	}
	info.status = resp.Status
	closeAfter, err = pc.sendResponse(req, resp, o, cw, tr)
	return tr.up, tr.down, closeAfter, err
}

// trip counts one request's exchange with its origin.
type trip struct {
	head     int64 // the request head's length
	up, down int64 // bytes to the origin, to the client
	bodySent bool  // the request body (if any) went to the origin
}

// sendRequest writes the request head to the origin and, unless the client
// waits for 100 Continue, its body.
func (pc *proxyConn) sendRequest(req *proxyport.Request, head []byte, hasBody bool, o *origin, tr *trip) error {
	if _, err := o.bw.Write(head); err != nil {
		return fmt.Errorf("%w: %w", errStaleOrigin, err)
	}
	tr.up = int64(len(head))
	tr.bodySent = !hasBody
	if hasBody && !req.Expect100 {
		if err := pc.sendBody(req, o, tr, false); err != nil {
			return err
		}
	}
	if err := o.bw.Flush(); err != nil {
		return fmt.Errorf("%w: %w", errStaleOrigin, err)
	}
	return nil
}

// sendBody copies the request body from the client to the origin (and
// flushes it, if flush).
func (pc *proxyConn) sendBody(req *proxyport.Request, o *origin, tr *trip, flush bool) error {
	n, err := pc.copyRequestBody(o.bw, req)
	tr.up += n
	if err == nil && flush {
		err = o.bw.Flush()
	}
	if err != nil {
		return fmt.Errorf("%w->server: request body: %w", errClientSide, err)
	}
	tr.bodySent = true
	return nil
}

// finalResponse reads the origin's responses until the final one. Interim
// ones (100 Continue, 103 Early Hints) are passed on to the client; after a
// 100 Continue the request body follows.
func (pc *proxyConn) finalResponse(req *proxyport.Request, o *origin, cw *bufio.Writer, tr *trip) (*proxyport.Response, error) {
	for {
		resp, err := proxyport.ReadResponse(o.br, proxyport.Limits{}, req.Method)
		if err != nil {
			if tr.up == tr.head && (errors.Is(err, io.ErrUnexpectedEOF) || isReset(err)) {
				err = fmt.Errorf("%w: %w", errStaleOrigin, err)
			}
			return nil, fmt.Errorf("server: %w", err)
		}
		if resp.Status >= 200 {
			return resp, nil
		}
		if resp.Status == 101 {
			return nil, errors.New("server: 101 Switching Protocols without an Upgrade request")
		}
		b := resp.AppendHead(nil, req.Minor, false)
		cw.Write(b)
		if err := cw.Flush(); err != nil {
			return nil, fmt.Errorf("%w: %w", errClientSide, err)
		}
		tr.down += int64(len(b))
		if resp.Status == 100 && !tr.bodySent {
			if err := pc.sendBody(req, o, tr, true); err != nil {
				return nil, err
			}
		}
	}
}

// sendResponse writes the final response's head and body to the client,
// and says whether the client connection closes after it (and whether the
// origin's may be reused).
func (pc *proxyConn) sendResponse(req *proxyport.Request, resp *proxyport.Response, o *origin, cw *bufio.Writer, tr *trip) (closeAfter bool, err error) {
	delimitedByClose := !resp.NoBody && !resp.Chunked && resp.ContentLength < 0
	// A body the client was going to send after 100 Continue and never
	// did leaves the connection in an unknown state: close it.
	closeAfter = req.Close || delimitedByClose || !tr.bodySent
	b := resp.AppendHead(nil, req.Minor, closeAfter)
	if _, err := cw.Write(b); err != nil {
		return true, fmt.Errorf("%w: %w", errClientSide, err)
	}
	tr.down += int64(len(b))
	if !resp.NoBody {
		var n int64
		if delimitedByClose {
			n, err = io.Copy(flushing{cw, o.br}, o.br)
		} else {
			n, err = proxyport.CopyBody(flushing{cw, o.br}, o.br, resp.Chunked, resp.ContentLength)
		}
		tr.down += n
		if err != nil {
			cw.Flush()
			return true, fmt.Errorf("response body: %w", err)
		}
	}
	if err := cw.Flush(); err != nil {
		return true, fmt.Errorf("%w: %w", errClientSide, err)
	}
	o.reusable = !resp.Close && !delimitedByClose && tr.bodySent
	return closeAfter, nil
}

// copyRequestBody streams the request body from the client to dst, the
// idle timeout bounding each read rather than the whole body.
func (pc *proxyConn) copyRequestBody(dst *bufio.Writer, req *proxyport.Request) (int64, error) {
	pc.cr.idle = pc.t.idleTimeout()
	defer func() { pc.cr.idle = 0 }()
	return proxyport.CopyBody(flushing{dst, pc.br}, pc.br, req.Chunked, req.ContentLength)
}

// flushing writes a body to w and flushes whenever src has nothing more
// buffered: what arrived goes on before the next read waits, so a body
// streams instead of waiting for w's buffer to fill.
type flushing struct {
	w   *bufio.Writer
	src *bufio.Reader
}

func (f flushing) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil && f.src.Buffered() == 0 {
		err = f.w.Flush()
	}
	return n, err
}

func isTimeoutOrClosed(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, net.ErrClosed) || isReset(err)
}
