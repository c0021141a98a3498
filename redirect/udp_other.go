//go:build !linux

package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
)

// UDPListener receives transparent UDP datagrams; only Linux has them.
type UDPListener struct{}

// OOBSize is the control-message space ReadDatagram needs.
const OOBSize = 64

// ErrNoOrigDst: a datagram without an original destination.
var ErrNoOrigDst = errors.New("datagram without an original destination")

// ErrTruncated: a datagram larger than the buffer.
var ErrTruncated = errors.New("datagram larger than the buffer")

// ListenUDP fails on this OS.
func ListenUDP(ctx context.Context, addr string) (*UDPListener, error) { return nil, errNotLinux }

// NewUDPListener fails on this OS.
func NewUDPListener(c *net.UDPConn) (*UDPListener, error) { return nil, errNotLinux }

// ReadDatagram fails on this OS.
func (l *UDPListener) ReadDatagram(b, oob []byte) (int, netip.AddrPort, netip.AddrPort, error) {
	return 0, netip.AddrPort{}, netip.AddrPort{}, errNotLinux
}

// IsSelf is false on this OS.
func (l *UDPListener) IsSelf(dst netip.AddrPort) bool { return false }

// Conn is nil on this OS.
func (l *UDPListener) Conn() *net.UDPConn { return nil }

// Close does nothing on this OS.
func (l *UDPListener) Close() error { return nil }

// LocalAddr is nil on this OS.
func (l *UDPListener) LocalAddr() net.Addr { return nil }

// ReplyPool hands out transparent reply sockets; only Linux has them.
type ReplyPool struct {
	Mark    uint32
	MaxIdle int
}

// ReplySocket is a transparent reply socket.
type ReplySocket struct{}

// Acquire fails on this OS.
func (p *ReplyPool) Acquire(from netip.AddrPort) (*ReplySocket, error) { return nil, errNotLinux }

// AddrInUse is zero on this OS.
func (p *ReplyPool) AddrInUse() int64 { return 0 }

// Open is zero on this OS.
func (p *ReplyPool) Open() int { return 0 }

// Close does nothing on this OS.
func (p *ReplyPool) Close() {}

// Release does nothing on this OS.
func (s *ReplySocket) Release() {}

// From is the zero address on this OS.
func (s *ReplySocket) From() netip.AddrPort { return netip.AddrPort{} }

// WriteTo fails on this OS.
func (s *ReplySocket) WriteTo(b []byte, to netip.AddrPort) error { return errNotLinux }
