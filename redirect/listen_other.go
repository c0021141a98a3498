//go:build !linux

package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
)

var errNotLinux = errors.New("redirect: transparent proxying needs Linux netfilter")

// Listener accepts redirected connections; only Linux has them.
type Listener struct{}

// Listen fails on this OS.
func Listen(ctx context.Context, mode Mode, addr string) (*Listener, error) { return nil, errNotLinux }

// ListenFile fails on this OS.
func ListenFile(f *os.File, mode Mode, addr string) (*Listener, error) {
	f.Close()
	return nil, errNotLinux
}

// SameAddr is false on this OS.
func SameAddr(bound netip.AddrPort, addr string) bool { return false }

// SyscallConn fails on this OS.
func (l *Listener) SyscallConn() (syscall.RawConn, error) { return nil, errNotLinux }

// Accept fails on this OS.
func (l *Listener) Accept() (*net.TCPConn, error) { return nil, errNotLinux }

// Close does nothing on this OS.
func (l *Listener) Close() error { return nil }

// Addr is nil on this OS.
func (l *Listener) Addr() net.Addr { return nil }

// Mode is the zero Mode on this OS.
func (l *Listener) Mode() Mode { return Redirect }

// OriginalDst fails on this OS.
func (l *Listener) OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errNotLinux
}

// MarkLoops fails on this OS.
func MarkLoops(mark uint32) ([]Problem, error) { return nil, errNotLinux }
