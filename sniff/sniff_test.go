package sniff

import "testing"

func TestParseProtoInvertsString(t *testing.T) {
	for _, p := range []Proto{Unknown, TLS, HTTP, H2C, QUIC, DNS} {
		if got, err := ParseProto(p.String()); err != nil || got != p {
			t.Errorf("ParseProto(%q) = %v, %v; want %v", p.String(), got, err, p)
		}
	}
	for _, bad := range []string{"", "TLS", "QUIC", "udp", "https"} {
		if _, err := ParseProto(bad); err == nil {
			t.Errorf("ParseProto(%q) accepted", bad)
		}
	}
}
