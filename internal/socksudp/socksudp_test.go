package socksudp

import (
	"bytes"
	"net/netip"
	"testing"
)

// FuzzHeader: a datagram either parses to a destination and a payload
// that starts right after a whole header (RSV 0, FRAG 0, an address of the
// length its ATYP says, a port), and one written for an address parses
// back to it, or is refused; never a panic.
func FuzzHeader(f *testing.F) {
	f.Add([]byte("\x00\x00\x00\x01\xc6\x12\x02\x02\x00\x35payload"))
	f.Add([]byte("\x00\x00\x00\x04\xfd\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x01\xbbquic"))
	f.Add([]byte("\x00\x00\x00\x03\x09site.test\x00\x35q"))
	f.Add([]byte("\x00\x00\x01\x01\x01\x02\x03\x04\x00\x35fragment"))
	f.Add([]byte("\x00\x00\x00\x03"))
	f.Fuzz(func(t *testing.T, b []byte) {
		addr, name, port, off, err := Parse(b)
		if err != nil {
			return
		}
		if off > len(b) || off < 4 || b[0] != 0 || b[1] != 0 || b[2] != 0 {
			t.Fatalf("Parse(%x): payload at %d", b, off)
		}
		want := map[byte]int{1: 10, 4: 22}[b[3]]
		if b[3] == 3 {
			want = 4 + 1 + int(b[4]) + 2
			if addr.IsValid() || !bytes.Equal(name, b[5:5+int(b[4])]) {
				t.Fatalf("Parse(%x) = %v %q, want the name", b, addr, name)
			}
		} else if !addr.IsValid() || name != nil {
			t.Fatalf("Parse(%x) = %v %q, want an address", b, addr, name)
		}
		if off != want {
			t.Fatalf("Parse(%x): header of %d bytes, ATYP %d says %d", b, off, b[3], want)
		}
		if int(port) != int(b[off-2])<<8|int(b[off-1]) {
			t.Fatalf("Parse(%x): port %d", b, port)
		}
		if name != nil {
			return
		}
		h := Append(nil, netip.AddrPortFrom(addr, port))
		a2, n2, p2, off2, err := Parse(h)
		if err != nil || a2 != addr || n2 != nil || p2 != port || off2 != len(h) {
			t.Fatalf("round trip of %v:%d: %v %q %d %d %v", addr, port, a2, n2, p2, off2, err)
		}
	})
}

// Parse refuses what is not a whole header, and says what is wrong.
func TestParseErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"\x00\x00\x00", "datagram shorter than a SOCKS5 UDP header"},
		{"\x00\x01\x00\x01\x01\x02\x03\x04\x00\x35", "SOCKS5 UDP header: reserved bytes not zero"},
		{"\x00\x00\x02\x01\x01\x02\x03\x04\x00\x35", "SOCKS5 UDP fragment 2 (fragments are not supported)"},
		{"\x00\x00\x00\x01\x01\x02\x03\x04\x00", "SOCKS5 UDP header: short IPv4 address"},
		{"\x00\x00\x00\x04\x01\x02\x03\x04\x00\x35", "SOCKS5 UDP header: short IPv6 address"},
		{"\x00\x00\x00\x03", "SOCKS5 UDP header: short domain name"},
		{"\x00\x00\x00\x03\x09site.test\x00", "SOCKS5 UDP header: short domain name"},
		{"\x00\x00\x00\x02\x00\x35", "SOCKS5 UDP header: address type 2"},
	} {
		if _, _, _, _, err := Parse([]byte(c.in)); err == nil || err.Error() != c.want {
			t.Errorf("Parse(%q): %v, want %q", c.in, err, c.want)
		}
	}
}

// Parse takes an IPv4 header's address and port without allocating: it
// runs for every datagram a SOCKS5 relay sends back.
func TestParseNoAlloc(t *testing.T) {
	b := []byte("\x00\x00\x00\x01\xc6\x12\x02\x02\x00\x35reply")
	if n := testing.AllocsPerRun(100, func() { Parse(b) }); n != 0 {
		t.Fatalf("Parse allocates %v times", n)
	}
}
