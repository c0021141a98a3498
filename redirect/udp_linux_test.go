//go:build linux

package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func requireRootUDP(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("transparent UDP sockets need CAP_NET_ADMIN; run as root")
	}
}

// A dual-stack listener reads the original destination of IPv4 and IPv6
// datagrams from their control messages. Without a TPROXY rule the original
// destination is the listener itself, which ReadDatagram names.
func TestUDPListenerOrigDstBothFamilies(t *testing.T) {
	requireRootUDP(t)
	ln, err := ListenUDP(context.Background(), "[::]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.LocalAddr().(*net.UDPAddr).Port
	for _, to := range []string{"127.0.0.1", "::1"} {
		dst := netip.AddrPortFrom(netip.MustParseAddr(to), uint16(port))
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		b, oob := make([]byte, 64<<10), make([]byte, OOBSize)
		ln.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, client, got, err := ln.ReadDatagram(b, oob)
		if !errors.Is(err, ErrNotRedirected) {
			t.Fatalf("datagram to %s: err = %v, want ErrNotRedirected", dst, err)
		}
		if got != dst || n != 5 || string(b[:n]) != "hello" {
			t.Fatalf("datagram to %s: got %d bytes %q, dst %v", dst, n, b[:n], got)
		}
		if want := c.LocalAddr().(*net.UDPAddr).AddrPort(); client.Addr() != want.Addr().Unmap() || client.Port() != want.Port() {
			t.Fatalf("client = %v, want %v (unmapped)", client, want)
		}
		if !ln.IsSelf(dst) || ln.IsSelf(netip.AddrPortFrom(netip.MustParseAddr("198.18.2.2"), uint16(port))) {
			t.Fatal("IsSelf disagrees with ReadDatagram")
		}
	}
}

// A datagram larger than the buffer is reported, not passed on cut.
func TestUDPListenerTruncated(t *testing.T) {
	requireRootUDP(t)
	ln, err := ListenUDP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialUDP("udp", nil, ln.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(make([]byte, 100))
	ln.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, _, err := ln.ReadDatagram(make([]byte, 10), make([]byte, OOBSize)); !errors.Is(err, ErrTruncated) {
		t.Fatalf("err = %v, want ErrTruncated", err)
	}
}

// An inherited socket (as after a binary upgrade) gets the options again.
func TestNewUDPListenerFromConn(t *testing.T) {
	requireRootUDP(t)
	for _, network := range []string{"udp4", "udp6"} {
		addr := "127.0.0.1:0"
		if network == "udp6" {
			addr = "[::]:0"
		}
		pc, err := net.ListenPacket(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := NewUDPListener(pc.(*net.UDPConn))
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		var v int
		ln.rc.Control(func(fd uintptr) {
			if network == "udp4" {
				v, err = unix.GetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVORIGDSTADDR)
			} else {
				v, err = unix.GetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVORIGDSTADDR)
			}
		})
		if err != nil || v != 1 {
			t.Fatalf("%s: RECVORIGDSTADDR = %d, %v; want 1", network, v, err)
		}
		ln.Close()
	}
}

func cmsg(level, typ int32, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = level, typ
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func TestOrigDstFromCmsg(t *testing.T) {
	sa4 := unix.RawSockaddrInet4{Family: unix.AF_INET, Port: htons(53), Addr: [4]byte{198, 18, 2, 2}}
	v4 := unsafe.Slice((*byte)(unsafe.Pointer(&sa4)), unix.SizeofSockaddrInet4)
	sa6 := unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: htons(443), Addr: netip.MustParseAddr("fd00:2::2").As16()}
	v6 := unsafe.Slice((*byte)(unsafe.Pointer(&sa6)), unix.SizeofSockaddrInet6)
	other := cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMP, make([]byte, 16))
	for _, tc := range []struct {
		name string
		oob  []byte
		want string
	}{
		{"ipv4", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4), "198.18.2.2:53"},
		{"ipv6", cmsg(unix.SOL_IPV6, unix.IPV6_ORIGDSTADDR, v6), "[fd00:2::2]:443"},
		{"after another message", append(append([]byte{}, other...), cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4)...), "198.18.2.2:53"},
		{"none", other, ""},
		{"empty", nil, ""},
		{"short data", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4[:4]), ""},
		{"length beyond buffer", cmsg(unix.SOL_IP, unix.IP_ORIGDSTADDR, v4)[:12], ""},
	} {
		got, ok := origDstFromCmsg(tc.oob)
		if (tc.want == "") == ok || (ok && got.String() != tc.want) {
			t.Errorf("%s: got %v, %v; want %q", tc.name, got, ok, tc.want)
		}
	}
}

// Reply sockets: sent from the address they are bound to (a foreign one
// is allowed by IP_TRANSPARENT), shared per address, idle ones capped, and
// a bind that fails with EADDRINUSE fails only that address.
func TestReplyPool(t *testing.T) {
	requireRootUDP(t)
	client, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	to := client.LocalAddr().(*net.UDPAddr).AddrPort()
	p := &ReplyPool{MaxIdle: 1}
	defer p.Close()

	from := netip.MustParseAddrPort("127.0.0.2:5353")
	a, err := p.Acquire(from)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Acquire(from)
	if err != nil || a != b {
		t.Fatalf("second Acquire = %p, %v; want the same socket %p", b, err, a)
	}
	if err := a.WriteTo([]byte("reply"), to); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, src, err := client.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "reply" || src != from {
		t.Fatalf("client got %q from %v (%v), want \"reply\" from %v", buf[:n], src, err, from)
	}

	other := netip.MustParseAddrPort("127.0.0.3:5353")
	c, err := p.Acquire(other)
	if err != nil {
		t.Fatal(err)
	}
	a.Release()
	b.Release()
	c.Release()
	if got := p.Open(); got != 1 {
		t.Fatalf("open reply sockets after releasing 2 with MaxIdle 1 = %d, want 1", got)
	}
	if err := a.WriteTo([]byte("x"), to); err == nil {
		t.Fatal("the least recently released socket is still open")
	}

	// Something else holds 127.0.0.4:PORT without SO_REUSEADDR.
	holder, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 4)})
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if _, err := p.Acquire(holder.LocalAddr().(*net.UDPAddr).AddrPort()); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Acquire of an address in use = %v, want EADDRINUSE", err)
	}
	if p.AddrInUse() != 1 {
		t.Fatalf("AddrInUse = %d, want 1", p.AddrInUse())
	}
	if d, err := p.Acquire(netip.MustParseAddrPort("127.0.0.5:5353")); err != nil {
		t.Fatalf("Acquire after an EADDRINUSE elsewhere: %v", err)
	} else {
		d.Release()
	}

	// IPv6.
	client6, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	defer client6.Close()
	from6 := netip.MustParseAddrPort("[::1]:5354")
	s6, err := p.Acquire(from6)
	if err != nil {
		t.Fatal(err)
	}
	defer s6.Release()
	if err := s6.WriteTo([]byte("six"), client6.LocalAddr().(*net.UDPAddr).AddrPort()); err != nil {
		t.Fatal(err)
	}
	client6.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, src, err = client6.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "six" || src != from6 {
		t.Fatalf("IPv6 client got %q from %v (%v)", buf[:n], src, err)
	}
}

// The listener's receive buffer is raised past rmem_max for bursts.
func TestUDPListenerBuffer(t *testing.T) {
	requireRootUDP(t)
	ln, err := ListenUDP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var v int
	ln.rc.Control(func(fd uintptr) { v, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) })
	if err != nil || v < udpListenBuffer {
		t.Fatalf("SO_RCVBUF = %d (%v), want at least %d", v, err, udpListenBuffer)
	}
}
