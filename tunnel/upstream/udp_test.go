package upstream

import (
	"bytes"
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// FuzzUDPUnwrap: a datagram from a SOCKS5 relay either yields a payload
// that is the datagram's tail after a whole header (RSV 0, FRAG 0, an
// address of the length its ATYP says, a port), or is dropped; never a
// panic. A direct socket's datagrams pass unchanged.
func FuzzUDPUnwrap(f *testing.F) {
	f.Add([]byte("\x00\x00\x00\x01\xc6\x12\x02\x02\x00\x35reply"))
	f.Add([]byte("\x00\x00\x00\x04\xfd\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x01\xbbquic"))
	f.Add([]byte("\x00\x00\x00\x03\x09site.test\x01\xbbquic"))
	f.Add([]byte("\x00\x00\x01\x01\x01\x02\x03\x04\x00\x35fragment"))
	f.Add([]byte("\x00\x00\x00\x03"))
	socks := &PacketConn{header: []byte{0, 0, 0, 1, 0, 0, 0, 0, 0, 0}}
	direct := &PacketConn{}
	f.Fuzz(func(t *testing.T, b []byte) {
		if p, ok := direct.Unwrap(b); !ok || !bytes.Equal(p, b) {
			t.Fatalf("direct Unwrap changed the datagram")
		}
		p, ok := socks.Unwrap(b)
		if !ok {
			return
		}
		h := len(b) - len(p)
		if !bytes.Equal(b[h:], p) || h < 4 || b[0] != 0 || b[1] != 0 || b[2] != 0 {
			t.Fatalf("Unwrap(%x) = %x: not the tail after a whole header", b, p)
		}
		want := map[byte]int{1: 10, 4: 22}[b[3]]
		if b[3] == 3 {
			if b[4] == 0 {
				t.Fatalf("Unwrap(%x) took an empty name", b)
			}
			want = 4 + 1 + int(b[4]) + 2
		}
		if h != want {
			t.Fatalf("Unwrap(%x): header of %d bytes, ATYP %d says %d", b, h, b[3], want)
		}
	})
}

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
