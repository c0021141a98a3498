// Package socksudp reads and writes the header SOCKS5 puts in front of
// every UDP datagram (RFC 1928 §7), for both ends detour plays: the proxy
// port's relay (a client's requests, its replies) and an upstream
// association (the relay's replies). It checks the header's form only;
// what a name or a port may be is left to the caller.
package socksudp

import (
	"errors"
	"fmt"
	"net/netip"
)

// Parse reads the header at the start of b: RSV (2 bytes, zero), FRAG,
// ATYP, DST.ADDR, DST.PORT. It returns the address (ATYP IPv4 or IPv6,
// unmapped) or the name (ATYP domain: a slice of b, which may be empty),
// the port, and where the payload starts. Fragments (FRAG not 0) are
// refused, as most servers do. It allocates only for an error.
func Parse(b []byte) (addr netip.Addr, name []byte, port uint16, payload int, err error) {
	if len(b) < 4 {
		return netip.Addr{}, nil, 0, 0, errors.New("datagram shorter than a SOCKS5 UDP header")
	}
	if b[0] != 0 || b[1] != 0 {
		return netip.Addr{}, nil, 0, 0, errors.New("SOCKS5 UDP header: reserved bytes not zero")
	}
	if b[2] != 0 {
		return netip.Addr{}, nil, 0, 0, fmt.Errorf("SOCKS5 UDP fragment %d (fragments are not supported)", b[2])
	}
	i := 4
	switch b[3] {
	case 1:
		if len(b) < i+4+2 {
			return netip.Addr{}, nil, 0, 0, errors.New("SOCKS5 UDP header: short IPv4 address")
		}
		addr = netip.AddrFrom4([4]byte(b[i : i+4]))
		i += 4
	case 4:
		if len(b) < i+16+2 {
			return netip.Addr{}, nil, 0, 0, errors.New("SOCKS5 UDP header: short IPv6 address")
		}
		addr = netip.AddrFrom16([16]byte(b[i : i+16])).Unmap()
		i += 16
	case 3:
		if len(b) < i+1 || len(b) < i+1+int(b[i])+2 {
			return netip.Addr{}, nil, 0, 0, errors.New("SOCKS5 UDP header: short domain name")
		}
		l := int(b[i])
		name = b[i+1 : i+1+l]
		i += 1 + l
	default:
		return netip.Addr{}, nil, 0, 0, fmt.Errorf("SOCKS5 UDP header: address type %d", b[3])
	}
	return addr, name, uint16(b[i])<<8 | uint16(b[i+1]), i + 2, nil
}

// Append appends the header of a datagram from or to ap (ATYP IPv4 for an
// IPv4 or IPv4-mapped address, else IPv6).
func Append(b []byte, ap netip.AddrPort) []byte {
	a := ap.Addr().Unmap()
	if a.Is4() {
		b = append(b, 0, 0, 0, 1)
	} else {
		b = append(b, 0, 0, 0, 4)
	}
	b = append(b, a.AsSlice()...)
	return append(b, byte(ap.Port()>>8), byte(ap.Port()))
}
