package testkit

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
)

// ReadSOCKSAddr reads the rest of a SOCKS5 address whose ATYP byte was atyp
// (RFC 1928 §5: 1 IPv4, 3 a name, 4 IPv6), then the port, as the test
// SOCKS5 servers do after a request's VER CMD RSV ATYP; it returns the
// target as host:port. Another ATYP is an error, read no further.
func ReadSOCKSAddr(r io.Reader, atyp byte) (string, error) {
	var host string
	switch atyp {
	case 1, 4:
		a := make([]byte, map[byte]int{1: 4, 4: 16}[atyp])
		if _, err := io.ReadFull(r, a); err != nil {
			return "", err
		}
		ip, _ := netip.AddrFromSlice(a)
		host = ip.String()
	case 3:
		var l [1]byte
		if _, err := io.ReadFull(r, l[:]); err != nil {
			return "", err
		}
		name := make([]byte, l[0])
		if _, err := io.ReadFull(r, name); err != nil {
			return "", err
		}
		host = string(name)
	default:
		return "", fmt.Errorf("address type %d", atyp)
	}
	var port [2]byte
	if _, err := io.ReadFull(r, port[:]); err != nil {
		return "", err
	}
	return net.JoinHostPort(host, strconv.Itoa(int(port[0])<<8|int(port[1]))), nil
}
