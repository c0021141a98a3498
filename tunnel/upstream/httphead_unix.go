//go:build unix

package upstream

import (
	"io"
	"net"
	"os"
	"syscall"
)

// readHead consumes exactly the reply head from c (through its empty line),
// feeding it to h; whatever the proxy sent after it stays in the socket for
// the tunnel. It peeks (recv with MSG_PEEK) into buf and reads exactly what
// h consumed, so no buffering wrapper is left over. Bytes peeked before the
// end are all head, so they are read too and the next peek waits for new
// bytes instead of spinning. c's deadline applies.
func (h *Handshake) readHead(c *net.TCPConn, buf []byte) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	for !h.Done() {
		n, err := peek(rc, buf)
		if err != nil {
			return readError("reply", err)
		}
		if n == 0 {
			return readError("reply", io.EOF)
		}
		k, ferr := h.feed(buf[:n])
		if _, err := io.ReadFull(c, buf[:k]); err != nil {
			return readError("reply", err)
		}
		if ferr != nil {
			return ferr
		}
	}
	return nil
}

// peek copies what is waiting in the socket's receive queue into p without
// consuming it, waiting (under the read deadline) until something is. It
// returns 0, nil at EOF.
func peek(rc syscall.RawConn, p []byte) (int, error) {
	var n int
	var serr error
	err := rc.Read(func(fd uintptr) bool {
		for {
			n, _, serr = syscall.Recvfrom(int(fd), p, syscall.MSG_PEEK)
			if serr != syscall.EINTR {
				return serr != syscall.EAGAIN
			}
		}
	})
	if err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, os.NewSyscallError("recvfrom", serr)
	}
	return n, nil
}
