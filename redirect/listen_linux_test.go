//go:build linux

package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
)

// A connection made straight to the listener (no redirection rule) is
// recognised in both modes; without root only REDIRECT mode can listen.
func TestOriginalDstRefusesDirectConnection(t *testing.T) {
	for _, mode := range []Mode{Redirect, TProxy} {
		t.Run(mode.String(), func(t *testing.T) {
			if mode == TProxy && os.Geteuid() != 0 {
				t.Skip("TPROXY listener needs CAP_NET_ADMIN; run as root")
			}
			ln, err := Listen(context.Background(), mode, "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ac, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer ac.Close()
			dst, err := ln.OriginalDst(ac)
			// REDIRECT: no conntrack NAT entry, or one whose original
			// destination is the listener; TPROXY: the local address.
			if err == nil {
				t.Fatalf("OriginalDst of a direct connection = %v, nil; want an error", dst)
			}
			if mode == TProxy && !errors.Is(err, ErrNotRedirected) {
				t.Fatalf("OriginalDst error = %v, want ErrNotRedirected", err)
			}
		})
	}
}

func TestIsSelf(t *testing.T) {
	wild := &Listener{addr: netip.MustParseAddrPort("[::]:7777")}
	bound := &Listener{addr: netip.MustParseAddrPort("127.0.0.1:7777")}
	for _, tc := range []struct {
		l    *Listener
		dst  string
		self bool
	}{
		{wild, "127.0.0.1:7777", true},
		{wild, "[::1]:7777", true},
		{wild, "127.0.0.1:80", false},
		{wild, "198.18.2.2:7777", false}, // a redirected connection that happens to use the port
		{bound, "127.0.0.1:7777", true},
		{bound, "198.18.2.2:7777", false},
	} {
		if got := tc.l.isSelf(netip.MustParseAddrPort(tc.dst)); got != tc.self {
			t.Errorf("listener %v: isSelf(%s) = %v, want %v", tc.l.addr, tc.dst, got, tc.self)
		}
	}
}

// A listening socket handed over as a file serves on in the new Listener;
// one bound elsewhere than asked is refused.
func TestListenFile(t *testing.T) {
	ln, err := Listen(context.Background(), Redirect, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	dup := func() *os.File {
		f, err := ln.ln.File()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	if _, err := ListenFile(dup(), Redirect, "127.0.0.2:1"); err == nil {
		t.Fatal("ListenFile accepted a socket bound elsewhere")
	}
	ln2, err := ListenFile(dup(), Redirect, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	ln.Close() // the socket lives on in ln2
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial after the first listener closed: %v", err)
	}
	defer c.Close()
	ac, err := ln2.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ac.Close()
}

func TestSameAddr(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		bound string
		addr  string
		want  bool
	}{
		{"[::]:7777", ":7777", true},
		{"[::]:7777", "[::]:7777", true},
		{"[::]:7777", "0.0.0.0:7777", false},
		{"0.0.0.0:7777", "0.0.0.0:7777", true},
		{"0.0.0.0:7777", ":7777", false},
		{"127.0.0.1:9090", "127.0.0.1:9090", true},
		{"127.0.0.1:9090", "localhost:9090", true},
		{"127.0.0.1:9090", "127.0.0.1:9091", false},
		{"[::ffff:127.0.0.1]:9090", "127.0.0.1:9090", true},
	} {
		if got := SameAddr(ap(tc.bound), tc.addr); got != tc.want {
			t.Errorf("SameAddr(%s, %q) = %v, want %v", tc.bound, tc.addr, got, tc.want)
		}
	}
}
