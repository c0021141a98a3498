package testkit

import (
	"strings"
	"testing"
)

// ReadSOCKSAddr reads each address type to host:port and stops at the port.
func TestReadSOCKSAddr(t *testing.T) {
	for _, c := range []struct {
		atyp     byte
		in, want string
	}{
		{1, "\xc6\x12\x02\x02\x01\xbbrest", "198.18.2.2:443"},
		{4, "\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x50rest", "[fd00::2]:80"},
		{3, "\x09site.test\x00\x50rest", "site.test:80"},
	} {
		r := strings.NewReader(c.in)
		got, err := ReadSOCKSAddr(r, c.atyp)
		if err != nil || got != c.want || r.Len() != len("rest") {
			t.Errorf("ATYP %d: %q, %v, %d bytes left; want %q and 4 left", c.atyp, got, err, r.Len(), c.want)
		}
	}
	if _, err := ReadSOCKSAddr(strings.NewReader("\x00\x50"), 2); err == nil {
		t.Error("ATYP 2 was read")
	}
	if _, err := ReadSOCKSAddr(strings.NewReader("\xc6\x12"), 1); err == nil {
		t.Error("a short IPv4 address was read")
	}
}
