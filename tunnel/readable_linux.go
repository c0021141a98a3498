package tunnel

import (
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// readable waits until c has bytes queued or is at EOF, and returns how many
// are queued (0 at EOF). It reads nothing and holds no splice pipe while it
// waits: the goroutine parks in the runtime's poller like any blocked Read,
// so an idle connection costs its two sockets and nothing more. c's read
// deadline applies.
func readable(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var avail int
	var serr error
	err = rc.Read(func(fd uintptr) bool {
		// Bytes queued: the common case of a busy connection, one syscall.
		if n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err != nil {
			serr = err
			return true
		} else if n > 0 {
			avail = n
			return true
		}
		// None: at EOF, failed, or not yet — a peek tells them apart.
		var b byte
		n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b)), 1,
			unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		switch {
		case errno == unix.EAGAIN:
			return false // park until the poller says readable
		case errno == unix.EINTR:
			return false
		case errno != 0:
			serr = errno
		case n == 0:
			avail = 0 // EOF
		default:
			avail = 1 // raced with new data: splice will take what is there
		}
		return true
	})
	if err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: syscall.Errno(serr.(syscall.Errno))}
	}
	return avail, nil
}
