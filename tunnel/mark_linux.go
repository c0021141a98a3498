package tunnel

import (
	"github.com/detour-proxy/detour/tunnel/evloop"
	"golang.org/x/sys/unix"
)

// setMark sets SO_MARK on fd.
func setMark(fd int, mark uint32) error {
	return evloop.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(int32(mark)))
}
