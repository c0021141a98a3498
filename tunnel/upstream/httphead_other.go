//go:build !unix

package upstream

import (
	"io"
	"net"
)

// readHead consumes exactly the reply head from c (through its empty line)
// and returns it. Without MSG_PEEK it reads a byte at a time, which is slow
// but leaves the bytes after the head in the socket.
func readHead(c *net.TCPConn, limit int) ([]byte, error) {
	buf := make([]byte, 0, 512)
	for len(buf) < limit {
		buf = append(buf, 0)
		if _, err := io.ReadFull(c, buf[len(buf)-1:]); err != nil {
			return nil, err
		}
		if headEnd(buf, len(buf)-1) >= 0 {
			return buf, nil
		}
	}
	return nil, errHeadTooLarge
}
