//go:build linux

package tunnel

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/detour-proxy/detour/tunnel/upstream"
)

// udpPoller reads the replies of every session in one goroutine: the
// sessions' outbound sockets are in one epoll set (level-triggered, keyed
// by session id, not descriptor: a closed socket leaves the set by itself
// and its number may be reused), and the set waits in the runtime's own
// poller like a socket.
type udpPoller struct {
	srv  *UDPServer
	epfd int
	rc   syscall.RawConn
	file *os.File
	mu   sync.Mutex
	done bool
}

func newUDPPoller(srv *UDPServer) (*udpPoller, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("udp poller: epoll_create1: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("udp poller: %w", err)
	}
	f := os.NewFile(uintptr(fd), "detour-udp-poller")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("udp poller: %w", err)
	}
	p := &udpPoller{srv: srv, epfd: fd, rc: rc, file: f}
	go p.loop()
	return p, nil
}

// add puts the session's socket in the set.
func (p *udpPoller) add(s *udpSession, c *upstream.PacketConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(uint32(s.id)), Pad: int32(uint32(s.id >> 32))}
		serr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("udp poller: adding session socket: %w", err)
	}
	return nil
}

func (p *udpPoller) close() {
	p.mu.Lock()
	p.done = true
	p.mu.Unlock()
	p.file.Close()
}

func (p *udpPoller) loop() {
	events := make([]unix.EpollEvent, 128)
	buf := make([]byte, 64<<10)
	ready := make([]*udpSession, 0, len(events))
	srv := p.srv
	collect := func(fd uintptr) bool {
		n, err := unix.EpollWait(int(fd), events, 0)
		if err != nil || n <= 0 {
			return false // wait until the set is readable
		}
		srv.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if s := srv.byID[id]; s != nil {
				ready = append(ready, s)
			}
		}
		srv.mu.Unlock()
		return true
	}
	for {
		if err := p.rc.Read(collect); err != nil {
			return // closed
		}
		for i, s := range ready {
			s.receive(buf)
			ready[i] = nil
		}
		ready = ready[:0]
	}
}

// receive reads what the session's socket holds (up to a few datagrams, so
// one busy session cannot starve the others; the set is level-triggered)
// and sends each on to the client.
func (s *udpSession) receive(buf []byte) {
	out := s.out.Load()
	if out == nil {
		return
	}
	c := out.Conn
	var ferr error
	err := c.ReadNow(func(fd uintptr) {
		for range 32 {
			n, err := rawRecv(int(fd), buf)
			if err != nil {
				if err != unix.EAGAIN {
					ferr = err
				}
				return
			}
			if p, ok := c.Unwrap(buf[:n]); ok {
				s.down(p)
			}
		}
	})
	if err == nil {
		err = ferr
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		s.failed(fmt.Errorf("receiving: %w", err))
	}
}

func rawRecv(fd int, b []byte) (int, error) {
	r, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func isAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }
