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

// run drives h on c until it waits for the caller (Prepared) or is Done:
// it sends what Out has and reads what Need asks for. SOCKS5 messages are
// read exactly, by their structure; an HTTP reply head through readHead.
// So the bytes after the reply stay in c for the tunnel.
func (h *Handshake) run(c *net.TCPConn) error {
	var buf [3 + 255 + 255]byte // the credentials, the largest Out
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
			return h.readHead(c)
		}
		if _, err := io.ReadFull(c, buf[:need]); err != nil {
			return readError(h.reading(), err)
		}
		if _, err := h.feed(buf[:need]); err != nil {
			return err
		}
	}
}

// exchangeRequest sends req, the request for target that h made, on c and
// reads the reply.
func (h *Handshake) exchangeRequest(c *net.TCPConn, req []byte) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	return h.run(c)
}

// dialPrepared connects to the proxy and runs the handshake up to the
// request, which names the target (SOCKS5: the method negotiation and
// authentication; HTTP CONNECT: nothing beyond the TCP connection).
func (h *Handshake) dialPrepared(ctx context.Context) (*net.TCPConn, error) {
	return dialProxy(ctx, h.op(), h.forward(), h.proxy(), "", h.run)
}

// dialTarget connects to the proxy and runs the whole handshake for
// target. A target that cannot be asked for fails before dialling.
func (h *Handshake) dialTarget(ctx context.Context, cmd byte, target string) (*net.TCPConn, error) {
	t, err := parseTarget(target)
	if err != nil {
		return nil, h.wrap(target, err)
	}
	var small [64]byte
	req, err := h.appendRequest(small[:0], cmd, t)
	if err != nil {
		return nil, h.wrap(target, err)
	}
	return dialProxy(ctx, h.op(), h.forward(), h.proxy(), target, func(c *net.TCPConn) error {
		if err := h.run(c); err != nil {
			return err
		}
		h.requested(target)
		return h.exchangeRequest(c, req)
	})
}

// finish asks the proxy, on a connection dialPrepared made, for target and
// reads the reply, bounded as dialProxy bounds a handshake.
func (h *Handshake) finish(ctx context.Context, c *net.TCPConn, target string) error {
	var small [64]byte
	req, err := h.request(small[:0], socksCmdConnect, target)
	if err != nil {
		return h.wrap(target, err)
	}
	err = exchange(ctx, forwardOf(h.forward()), time.Now(), c, func(c *net.TCPConn) error {
		return h.exchangeRequest(c, req)
	})
	if err != nil {
		return h.wrap(target, err)
	}
	return nil
}
