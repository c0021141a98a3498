//go:build unix

package upstream

import (
	"io"
	"net"
	"os"
	"slices"
	"syscall"
)

// readHead consumes exactly the reply head from c (through its empty line)
// and returns it; whatever the proxy sent after it stays in the socket for
// the tunnel. It peeks (recv with MSG_PEEK) to find the end, then reads
// exactly that much, so no buffering wrapper is left over. Bytes peeked
// without finding the end are all head, so they are read too and the next
// peek waits for new bytes instead of spinning. c's deadline applies.
func readHead(c *net.TCPConn, limit int) ([]byte, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 0, 512)
	for {
		if len(buf) >= limit {
			return nil, errHeadTooLarge
		}
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(cap(buf), limit-len(buf)))
		}
		free := buf[len(buf):min(cap(buf), limit)]
		n, err := peek(rc, free)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, io.ErrUnexpectedEOF
		}
		end := headEnd(buf[:len(buf)+n], len(buf))
		take := n
		if end >= 0 {
			take = end - len(buf)
		}
		if _, err := io.ReadFull(c, buf[len(buf):len(buf)+take]); err != nil {
			return nil, err
		}
		buf = buf[:len(buf)+take]
		if end >= 0 {
			return buf, nil
		}
	}
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
