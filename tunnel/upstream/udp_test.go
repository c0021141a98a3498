package upstream

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// Send puts the association's header in front of the payload, in the room
// before it, and nothing in front of a direct datagram.
func TestPacketConnHeaderRoom(t *testing.T) {
	p := &PacketConn{header: []byte{0, 0, 0, 3, 9, 's', 'i', 't', 'e', '.', 't', 'e', 's', 't', 1, 187}}
	buf := make([]byte, MaxHeader+4)
	copy(buf[MaxHeader:], "quic")
	if err := p.Send(buf, 3, 4); err == nil {
		t.Fatal("Send with 3 bytes of room for a 16-byte header succeeded")
	}
}

// A direct UDP way out: the Forward template's Control sees the socket
// (the mark goes there), datagrams reach the destination, and after Close
// the descriptor is not used again.
func TestDirectDialUDP(t *testing.T) {
	dst, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	var saw []string
	d := &Direct{Forward: &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		saw = append(saw, network+" "+address)
		return c.Control(func(uintptr) {})
	}}}
	p, err := d.DialUDP(context.Background(), "", dst.LocalAddr().(*net.UDPAddr).AddrPort())
	if err != nil {
		t.Fatal(err)
	}
	if want := "udp4 " + dst.LocalAddr().String(); len(saw) != 1 || saw[0] != want {
		t.Fatalf("Control saw %q, want [%q]", saw, want)
	}
	buf := make([]byte, MaxHeader+5)
	copy(buf[MaxHeader:], "hello")
	if err := p.Send(buf, MaxHeader, 5); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 16)
	dst.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, err := dst.ReadFromUDP(got)
	if err != nil || string(got[:n]) != "hello" {
		t.Fatalf("destination got %q (%v)", got[:n], err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Send(buf, MaxHeader, 5); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Send after Close = %v, want net.ErrClosed", err)
	}
	if err := p.Control(func(uintptr) { t.Fatal("Control ran after Close") }); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Control after Close = %v", err)
	}
}
