//go:build linux

package upstream

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"
)

// dialUDPBare opens a non-blocking UDP socket connected to dst, with
// control (the socket mark) applied as a net.Dialer would, and returns it
// as a bare-descriptor PacketConn. ok is false when it cannot be done this
// way (never on Linux).
func dialUDPBare(control func(network, address string, c syscall.RawConn) error, dst netip.AddrPort) (p *PacketConn, err error, ok bool) {
	family, network := syscall.AF_INET6, "udp6"
	if dst.Addr().Is4() {
		family, network = syscall.AF_INET, "udp4"
	}
	fd, err := syscall.Socket(family, syscall.SOCK_DGRAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err), true
	}
	if control != nil {
		if err := control(network, dst.String(), bareConn(fd)); err != nil {
			syscall.Close(fd)
			return nil, err, true
		}
	}
	var sa syscall.Sockaddr
	if family == syscall.AF_INET {
		sa = &syscall.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	} else {
		sa = &syscall.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
	}
	if err := syscall.Connect(fd, sa); err != nil {
		syscall.Close(fd)
		return nil, &net.OpError{Op: "dial", Net: network, Addr: net.UDPAddrFromAddrPort(dst), Err: err}, true
	}
	return &PacketConn{fd: fd}, nil, true
}

// bareConn is a syscall.RawConn for a descriptor the caller holds, for
// Control functions.
type bareConn int

func (c bareConn) Control(f func(fd uintptr)) error { f(uintptr(c)); return nil }
func (c bareConn) Read(func(fd uintptr) bool) error {
	return fmt.Errorf("bareConn: Read not supported")
}
func (c bareConn) Write(func(fd uintptr) bool) error {
	return fmt.Errorf("bareConn: Write not supported")
}

// writeNow is write(2) on a non-blocking descriptor, without the runtime's
// bookkeeping for a system call that may block.
func writeNow(fd int, b []byte) error {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	_, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(p), uintptr(len(b)))
	if e != 0 {
		return e
	}
	return nil
}
