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
	cw := bufio.NewWriterSize(client, 16<<10)
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
		client.SetReadDeadline(time.Now().Add(pc.p.handshakeTimeout()))
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
			o = &origin{conn: server, br: bufio.NewReaderSize(server, 16<<10), bw: bufio.NewWriterSize(server, 16<<10),
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
	client := pc.r.client
	idle := pc.t.idleTimeout()
	o.reusable = false
	o.conn.SetDeadline(time.Now().Add(idle))
	if _, err := o.bw.Write(head); err != nil {
		return 0, 0, true, fmt.Errorf("%w: %w", errStaleOrigin, err)
	}
	up = int64(len(head))
	bodySent := !hasBody
	if hasBody && !req.Expect100 {
		client.SetReadDeadline(time.Now().Add(idle))
		n, err := proxyport.CopyBody(o.bw, pc.br, req.Chunked, req.ContentLength)
		up += n
		if err != nil {
			return up, 0, true, fmt.Errorf("%w->server: request body: %w", errClientSide, err)
		}
		bodySent = true
	}
	if err := o.bw.Flush(); err != nil {
		return up, 0, true, fmt.Errorf("%w: %w", errStaleOrigin, err)
	}
	var resp *proxyport.Response
	for {
		o.conn.SetReadDeadline(time.Now().Add(idle))
		resp, err = proxyport.ReadResponse(o.br, proxyport.Limits{}, req.Method)
		if err != nil {
			if up == int64(len(head)) && (errors.Is(err, io.ErrUnexpectedEOF) || isReset(err)) {
				err = fmt.Errorf("%w: %w", errStaleOrigin, err)
			}
			return up, down, true, fmt.Errorf("server: %w", err)
		}
		if resp.Status >= 200 {
			break
		}
		if resp.Status == 101 {
			return up, down, true, errors.New("server: 101 Switching Protocols without an Upgrade request")
		}
		// 100 Continue, 103 Early Hints: passed on, then the final one.
		b := resp.AppendHead(nil, req.Minor, false)
		cw.Write(b)
		if err := cw.Flush(); err != nil {
			return up, down, true, fmt.Errorf("%w: %w", errClientSide, err)
		}
		down += int64(len(b))
		if resp.Status == 100 && !bodySent {
			client.SetReadDeadline(time.Now().Add(idle))
			n, err := proxyport.CopyBody(o.bw, pc.br, req.Chunked, req.ContentLength)
			up += n
			if err == nil {
				err = o.bw.Flush()
			}
			if err != nil {
				return up, down, true, fmt.Errorf("%w->server: request body: %w", errClientSide, err)
			}
			bodySent = true
		}
	}
	info.status = resp.Status
	delimitedByClose := !resp.NoBody && !resp.Chunked && resp.ContentLength < 0
	// A body the client was going to send after 100 Continue and never
	// did leaves the connection in an unknown state: close it.
	closeAfter = req.Close || delimitedByClose || !bodySent
	b := resp.AppendHead(nil, req.Minor, closeAfter)
	if _, err := cw.Write(b); err != nil {
		return up, down, true, fmt.Errorf("%w: %w", errClientSide, err)
	}
	down += int64(len(b))
	if !resp.NoBody {
		var n int64
		if delimitedByClose {
			n, err = io.Copy(cw, o.br)
		} else {
			n, err = proxyport.CopyBody(cw, o.br, resp.Chunked, resp.ContentLength)
		}
		down += n
		if err != nil {
			cw.Flush()
			return up, down, true, fmt.Errorf("response body: %w", err)
		}
	}
	if err := cw.Flush(); err != nil {
		return up, down, true, fmt.Errorf("%w: %w", errClientSide, err)
	}
	o.reusable = !resp.Close && !delimitedByClose && bodySent
	return up, down, closeAfter, nil
}

func isTimeoutOrClosed(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, net.ErrClosed) || isReset(err)
}
