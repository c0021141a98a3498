//go:build !unix

package upstream

import (
	"io"
	"net"
)

// readHead consumes exactly the reply head from c (through its empty line),
// feeding it to h. Without MSG_PEEK it reads a byte at a time, which is
// slow but leaves the bytes after the head in the socket.
func (h *Handshake) readHead(c *net.TCPConn, buf []byte) error {
	for !h.Done() {
		if _, err := io.ReadFull(c, buf[:1]); err != nil {
			return readError("reply", err)
		}
		if _, err := h.feed(buf[:1]); err != nil {
			return err
		}
	}
	return nil
}
