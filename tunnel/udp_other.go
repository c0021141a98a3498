//go:build !linux

package tunnel

import (
	"errors"
	"syscall"

	"github.com/detour-proxy/detour/tunnel/upstream"
)

var errUDPNotLinux = errors.New("tunnel: transparent UDP needs Linux")

type udpPoller struct{}

func newUDPPoller(*UDPServer) (*udpPoller, error)                { return nil, errUDPNotLinux }
func (p *udpPoller) add(*udpSession, *upstream.PacketConn) error { return errUDPNotLinux }
func (p *udpPoller) close()                                      {}
func isAddrInUse(err error) bool                                 { return errors.Is(err, syscall.EADDRINUSE) }
