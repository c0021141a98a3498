//go:build !linux

package upstream

import (
	"net/netip"
	"syscall"
)

// dialUDPBare is Linux-only: elsewhere net.Dialer makes the socket.
func dialUDPBare(func(network, address string, c syscall.RawConn) error, netip.AddrPort) (*PacketConn, error, bool) {
	return nil, nil, false
}

func writeNow(fd int, b []byte) error {
	_, err := syscall.Write(fd, b)
	return err
}
