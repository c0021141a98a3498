package proxyport

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func socks(in string, users Users) (*SOCKSRequest, string, error) {
	var out bytes.Buffer
	req, err := ReadSOCKS(reader(in), &out, users, false)
	return req, out.String(), err
}

func TestSOCKS5(t *testing.T) {
	// curl --socks5-hostname: no auth, ATYP domain.
	req, out, err := socks("\x05\x02\x00\x01"+"\x05\x01\x00\x03\x09Site.Test\x01\xbb", nil)
	if err != nil || out != "\x05\x00" || req.Host != "site.test" || req.Port != 443 || req.Cmd != CmdConnect {
		t.Fatalf("%+v %q %v", req, out, err)
	}
	// IPv4, IPv6, and an IP literal sent as a name.
	req, _, err = socks("\x05\x01\x00"+"\x05\x01\x00\x01\xc6\x12\x00\x01\x00\x50", nil)
	if err != nil || req.Addr != netip.MustParseAddr("198.18.0.1") || req.Port != 80 {
		t.Fatalf("%+v %v", req, err)
	}
	req, _, err = socks("\x05\x01\x00"+"\x05\x01\x00\x04"+string(netip.MustParseAddr("fd00::1").AsSlice())+"\x00\x50", nil)
	if err != nil || req.Addr != netip.MustParseAddr("fd00::1") {
		t.Fatalf("%+v %v", req, err)
	}
	req, _, err = socks("\x05\x01\x00"+"\x05\x01\x00\x03\x0a198.18.0.1\x00\x50", nil)
	if err != nil || req.Host != "" || req.Addr != netip.MustParseAddr("198.18.0.1") {
		t.Fatalf("%+v %v", req, err)
	}
}

func TestSOCKS5Auth(t *testing.T) {
	users := Users{"alice": "secret"}
	req, out, err := socks("\x05\x02\x00\x02"+"\x01\x05alice\x06secret"+"\x05\x01\x00\x03\x01a\x00\x50", users)
	if err != nil || out != "\x05\x02\x01\x00" || req.User != "alice" {
		t.Fatalf("%+v %q %v", req, out, err)
	}
	_, out, err = socks("\x05\x01\x02"+"\x01\x05alice\x07badpass"+"\x05\x01\x00\x03\x01a\x00\x50", users)
	var se *SOCKSError
	if !errors.As(err, &se) || !se.AuthFailed || se.User != "alice" || out != "\x05\x02\x01\x01" || strings.Contains(err.Error(), "badpass") {
		t.Fatalf("wrong password: %q %v", out, err)
	}
	_, out, err = socks("\x05\x01\x00", users)
	if err == nil || out != "\x05\xff" {
		t.Fatalf("no auth offered: %q %v", out, err)
	}
}

func TestSOCKS5Refused(t *testing.T) {
	all := make([]byte, 255)
	for i := range all {
		all[i] = byte(3 + i%252) // 255 methods, none acceptable
	}
	for _, tc := range []struct{ name, in, out string }{
		{"255 methods, none known", "\x05\xff" + string(all), "\x05\xff"},
		{"no methods", "\x05\x00", "\x05\xff"},
		{"BIND", "\x05\x01\x00\x05\x02\x00\x01\x00\x00\x00\x00\x00\x50", "\x05\x00\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"},
		{"UDP ASSOCIATE", "\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x50", "\x05\x00\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"},
		{"address type 9", "\x05\x01\x00\x05\x01\x00\x09", "\x05\x00\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"},
		{"bad name", "\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x50", "\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"},
		{"port 0", "\x05\x01\x00\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00", "\x05\x00\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"},
	} {
		if _, out, err := socks(tc.in, nil); err == nil || out != tc.out {
			t.Errorf("%s: wrote %q, want %q (err %v)", tc.name, out, tc.out, err)
		}
	}
	// A greeting with 255 methods that include no-auth is fine.
	all[200] = 0
	if _, _, err := socks("\x05\xff"+string(all)+"\x05\x01\x00\x03\x01a\x00\x50", nil); err != nil {
		t.Errorf("255 methods with no-auth: %v", err)
	}
}

// Every prefix of a good handshake is an error, never a request or a panic.
func TestSOCKSTruncated(t *testing.T) {
	for _, full := range []string{
		"\x05\x02\x00\x02" + "\x05\x01\x00\x03\x09site.test\x01\xbb",
		"\x04\x01\x00\x50\x00\x00\x00\x01user\x00site.test\x00",
	} {
		for i := 0; i < len(full); i++ {
			if req, _, err := socks(full[:i], nil); err == nil {
				t.Errorf("prefix %q: got %+v", full[:i], req)
			}
		}
	}
}

func TestSOCKS4(t *testing.T) {
	req, _, err := socks("\x04\x01\x00\x50\xc6\x12\x00\x01user\x00", nil)
	if err != nil || req.Version != 4 || req.Addr != netip.MustParseAddr("198.18.0.1") || req.Port != 80 {
		t.Fatalf("%+v %v", req, err)
	}
	req, _, err = socks("\x04\x01\x01\xbb\x00\x00\x00\x01\x00Site.Test\x00", nil)
	if err != nil || req.Host != "site.test" || req.Port != 443 {
		t.Fatalf("4a: %+v %v", req, err)
	}
	if _, out, err := socks("\x04\x01\x00\x50\xc6\x12\x00\x01\x00", Users{"a": "b"}); err == nil || out != "\x00\x5b\x00\x00\x00\x00\x00\x00" {
		t.Fatalf("with users: %q %v", out, err)
	}
	if _, _, err := socks("\x04\x01\x00\x50\xc6\x12\x00\x01"+strings.Repeat("u", 300)+"\x00", nil); err == nil {
		t.Fatal("300-byte user id accepted")
	}
}

func TestWriteSOCKSReply(t *testing.T) {
	var b bytes.Buffer
	WriteSOCKSReply(&b, 5, RepSucceeded, netip.MustParseAddrPort("[fd00::1]:1080"))
	if b.Len() != 22 || b.Bytes()[3] != 4 {
		t.Fatalf("%x", b.Bytes())
	}
}
