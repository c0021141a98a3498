package evloop

import (
	"net/netip"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The socket calls a loop's connections make, on bare descriptors, without
// allocating: addresses go in and out as netip values. They are raw
// syscalls: on non-blocking sockets none of them waits, and the runtime's
// bookkeeping for a syscall that may block (entersyscall, and sysmon
// handing the loop's P to another thread when one takes over 20 µs, as a
// close or a connect may) would cost more than the call.

// Accept takes one connection from the listening socket lfd: a
// non-blocking, close-on-exec descriptor and its peer (IPv4-mapped
// addresses unmapped). unix.EAGAIN means none is waiting.
func Accept(lfd int) (int, netip.AddrPort, error) {
	var raw unix.RawSockaddrAny
	size := uint32(unsafe.Sizeof(raw))
	fd, _, e := syscall.RawSyscall6(unix.SYS_ACCEPT4, uintptr(lfd), uintptr(unsafe.Pointer(&raw)), uintptr(unsafe.Pointer(&size)),
		unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, netip.AddrPort{}, e
	}
	peer := addrOf(&raw)
	return int(fd), netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port()), nil
}

// Socket makes a non-blocking, close-on-exec TCP socket of dst's family.
func Socket(dst netip.AddrPort) (int, error) {
	family := unix.AF_INET6
	if dst.Addr().Is4() {
		family = unix.AF_INET
	}
	fd, _, e := syscall.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, os.NewSyscallError("socket", e)
	}
	return int(fd), nil
}

// Connect starts connecting fd to dst. unix.EINPROGRESS is the usual
// answer: the socket reports writable (or an error) once done.
func Connect(fd int, dst netip.AddrPort) error {
	var sa [unsafe.Sizeof(unix.RawSockaddrInet6{})]byte
	var n uintptr
	if a := dst.Addr(); a.Is4() {
		s := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa))
		s.Family, s.Addr = unix.AF_INET, a.As4()
		putPort(&s.Port, dst.Port())
		n = unsafe.Sizeof(*s)
	} else {
		s := (*unix.RawSockaddrInet6)(unsafe.Pointer(&sa))
		s.Family, s.Addr = unix.AF_INET6, a.As16()
		putPort(&s.Port, dst.Port())
		n = unsafe.Sizeof(*s)
	}
	_, _, e := syscall.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa)), n)
	if e != 0 {
		return e
	}
	return nil
}

// SockError is the pending error of fd (SO_ERROR), nil if none: after a
// non-blocking connect, what it came to.
func SockError(fd int) error {
	var v int32
	size := uint32(4)
	_, _, e := syscall.RawSyscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_ERROR,
		uintptr(unsafe.Pointer(&v)), uintptr(unsafe.Pointer(&size)), 0)
	switch {
	case e != 0:
		return os.NewSyscallError("getsockopt", e)
	case v != 0:
		return syscall.Errno(v)
	}
	return nil
}

// NoDelay turns Nagle's algorithm off on fd, as Go does for every TCP
// connection: a relay writes what it reads at once.
func NoDelay(fd int) error {
	return SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
}

// SetsockoptInt sets an integer socket option.
func SetsockoptInt(fd, level, opt, v int) error {
	v32 := int32(v)
	_, _, e := syscall.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&v32)), 4, 0)
	if e != 0 {
		return os.NewSyscallError("setsockopt", e)
	}
	return nil
}

// Close closes fd; with reset, with SO_LINGER 0, so the peer gets a reset.
func Close(fd int, reset bool) {
	if reset {
		l := unix.Linger{Onoff: 1, Linger: 0}
		syscall.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_LINGER,
			uintptr(unsafe.Pointer(&l)), unsafe.Sizeof(l), 0)
	}
	syscall.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0)
}

// ShutdownWrite sends fd's peer a FIN (shutdown(2) SHUT_WR).
func ShutdownWrite(fd int) error {
	_, _, e := syscall.RawSyscall(unix.SYS_SHUTDOWN, uintptr(fd), unix.SHUT_WR, 0)
	if e != 0 {
		return e
	}
	return nil
}

// Dup duplicates fd, close-on-exec: a loop's own handle on a listener
// someone else owns and closes.
func Dup(fd int) (int, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("fcntl", err)
	}
	return nfd, nil
}

func addrOf(raw *unix.RawSockaddrAny) netip.AddrPort {
	switch raw.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), getPort(sa.Port))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(raw))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), getPort(sa.Port))
	}
	return netip.AddrPort{}
}

// getPort and putPort convert a port to and from a sockaddr's network byte
// order.
func getPort(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0], b[1] = byte(port>>8), byte(port)
}

// Read reads from fd into b: n > 0 bytes, 0 at EOF, or an error
// (unix.EAGAIN: nothing queued).
func Read(fd int, b []byte) (int, error) {
	r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// WriteMore is Write with MSG_MORE: the kernel holds the bytes back for
// what follows, so a FIN sent next (shutdown or close) leaves in the same
// segment as the bytes.
func WriteMore(fd int, b []byte) (int, error) {
	r, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)),
		unix.MSG_MORE, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// Write writes b to fd: how much went, or an error (unix.EAGAIN: the send
// buffer is full).
func Write(fd int, b []byte) (int, error) {
	r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
