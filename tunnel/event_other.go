//go:build !linux

package tunnel

import (
	"errors"
	"net/netip"
	"syscall"
)

// Event loops are Linux's (event_linux.go): elsewhere every connection is
// served on goroutines.

type descListener interface {
	Listener
	SyscallConn() (syscall.RawConn, error)
	OriginalDstFD(fd int, peer netip.AddrPort) (netip.AddrPort, error)
}

type eventLoop struct{}

type evListener struct{}

func (*evListener) stop([]*eventLoop) {}

type evConn struct{ lp *struct{ l poster } }

type poster interface{ Post(func()) error }

func (*evConn) cut(error)    {}
func (*evConn) close(bool)   {}
func (t *Tunnel) stopLoops() {}

var errNoLoops = errors.New("no event loops")

func (t *Tunnel) serveLoops(descListener) error { return errNoLoops }
