package upstream

import (
	"context"
	"io"
	"net"
	"time"
)

// The blocking side of Handshake: the dialers run it on a *net.TCPConn,
// under the deadline dialProxy and exchange set.

// op, proxy and forward are the dialer's, for errors and for reaching the
// proxy.
func (h *Handshake) op() string {
	if h.socks != nil {
		return "socks connect"
	}
	return "http connect"
}

func (h *Handshake) proxy() string {
	if h.socks != nil {
		return h.socks.Proxy
	}
	return h.http.Proxy
}

func (h *Handshake) forward() *net.Dialer {
	if h.socks != nil {
		return h.socks.Forward
	}
	return h.http.Forward
}

// scratch is a buffer for run: what Out sends (the SOCKS5 credentials),
// the largest message part (a bound name and port), the request, or an
// HTTP reply head peeked at.
func (h *Handshake) scratch() []byte {
	if h.http != nil {
		return make([]byte, 512)
	}
	return make([]byte, max(4+1+255+2, 3+len(h.socks.User)+len(h.socks.Password)))
}

// run drives h on c until it waits for the caller (Prepared) or is Done:
// it sends what Out has and reads what Need asks for, in buf (from
// scratch). SOCKS5 messages are read exactly, by their structure; an HTTP
// reply head through readHead. So the bytes after the reply stay in c for
// the tunnel.
func (h *Handshake) run(c *net.TCPConn, buf []byte) error {
	for {
		if out := h.Out(buf[:0]); len(out) > 0 {
			if _, err := c.Write(out); err != nil {
				return err
			}
		}
		need := h.Need()
		switch {
		case need == 0:
			return nil
		case h.http != nil:
			return h.readHead(c, buf)
		}
		if _, err := io.ReadFull(c, buf[:need]); err != nil {
			return readError(h.reading(), err)
		}
		if _, err := h.feed(buf[:need]); err != nil {
			return err
		}
	}
}

// exchangeRequest sends req, the request h made, on c and reads the reply
// with buf.
func (h *Handshake) exchangeRequest(c *net.TCPConn, req, buf []byte) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	return h.run(c, buf)
}

// dialPrepared connects to the proxy and runs the handshake up to the
// request, which names the target (SOCKS5: the method negotiation and
// authentication; HTTP CONNECT: nothing beyond the TCP connection).
func (h *Handshake) dialPrepared(ctx context.Context) (*net.TCPConn, error) {
	buf := h.scratch()
	return dialProxy(ctx, h.op(), h.forward(), h.proxy(), "", func(c *net.TCPConn) error {
		return h.run(c, buf)
	})
}

// dialTarget connects to the proxy and runs the whole handshake for
// target. A target that cannot be asked for fails before dialling.
func (h *Handshake) dialTarget(ctx context.Context, cmd byte, target string) (*net.TCPConn, error) {
	t, err := parseTarget(target)
	if err != nil {
		return nil, h.wrap(target, err)
	}
	buf := h.scratch()
	if _, err := h.appendRequest(buf[:0], cmd, t); err != nil {
		return nil, h.wrap(target, err)
	}
	return dialProxy(ctx, h.op(), h.forward(), h.proxy(), target, func(c *net.TCPConn) error {
		if err := h.run(c, buf); err != nil {
			return err
		}
		req, _ := h.appendRequest(buf[:0], cmd, t) // checked above
		h.requested(target)
		return h.exchangeRequest(c, req, buf) // req is sent before buf is read into
	})
}

// finish asks the proxy, on a connection dialPrepared made, for target and
// reads the reply, bounded as dialProxy bounds a handshake.
func (h *Handshake) finish(ctx context.Context, c *net.TCPConn, target string) error {
	buf := h.scratch()
	req, err := h.request(buf[:0], socksCmdConnect, target)
	if err != nil {
		return h.wrap(target, err)
	}
	err = exchange(ctx, forwardOf(h.forward()), time.Now(), c, func(c *net.TCPConn) error {
		return h.exchangeRequest(c, req, buf) // req is sent before buf is read into
	})
	if err != nil {
		return h.wrap(target, err)
	}
	return nil
}
