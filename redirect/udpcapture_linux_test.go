//go:build linux

package redirect

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inNewNetns runs fn on a goroutine locked to a thread in a new network
// namespace with lo up, and throws that thread away afterwards (the
// goroutine ends locked), so no other goroutine ever runs there.
func inNewNetns(t *testing.T, fn func()) {
	t.Helper()
	requireRootUDP(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.New()
		if err != nil {
			t.Errorf("new network namespace: %v", err)
			return
		}
		defer ns.Close()
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			t.Errorf("lo up: %v", err)
			return
		}
		fn()
	}()
	<-done
}

// With UDP set, TPROXY mode captures UDP too, in both backends: a
// datagram the host itself sends (--output: marked in output, rerouted
// through lo by the policy route) reaches a transparent UDP listener with
// its original destination, over IPv4 and IPv6. Everything happens in a
// namespace of the test's own, whose only other link is a veth pair
// there (the default route, never used: the policy route takes the datagrams).
func TestUDPCapture(t *testing.T) {
	for _, fw := range []Firewall{FirewallIptables, FirewallNftables} {
		t.Run(string(fw), func(t *testing.T) {
			if _, err := exec.LookPath("iptables"); err != nil && fw == FirewallIptables {
				t.Skip("no iptables command")
			}
			inNewNetns(t, func() { testUDPCapture(t, fw) })
		})
	}
}

func testUDPCapture(t *testing.T, fw Firewall) {
	dummy := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "dt0"}, PeerName: "dt1"}
	if err := netlink.LinkAdd(dummy); err != nil {
		t.Errorf("ip link add dt0 type veth peer name dt1: %v", err)
		return
	}
	if peer, err := netlink.LinkByName("dt1"); err != nil || netlink.LinkSetUp(peer) != nil {
		t.Errorf("ip link set dt1 up: %v", err)
		return
	}
	for _, a := range []string{"198.18.0.1/24", "fd00::1/64"} {
		addr, _ := netlink.ParseAddr(a)
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(dummy, addr); err != nil {
			t.Errorf("ip addr add %s dev dt0: %v", a, err)
			return
		}
	}
	if err := netlink.LinkSetUp(dummy); err != nil {
		t.Error(err)
		return
	}
	for _, dst := range []string{"0.0.0.0/0", "::/0"} {
		_, n, _ := net.ParseCIDR(dst)
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: dummy.Attrs().Index, Dst: n}); err != nil {
			t.Errorf("ip route add %s dev dt0: %v", dst, err)
			return
		}
	}

	ln, err := ListenUDP(context.Background(), "[::]:0")
	if err != nil {
		t.Error(err)
		return
	}
	defer ln.Close()
	o := RuleOptions{Mode: TProxy, Port: uint16(ln.LocalAddr().(*net.UDPAddr).Port), Output: true, UDP: true, Bypass: []netip.Prefix{}}
	var in interface {
		Install(RuleOptions) (bool, []Problem, error)
		Remove() error
		Close()
	}
	if fw == FirewallNftables {
		in, err = NewNFTInstaller()
	} else {
		in, err = NewInstaller()
	}
	if err != nil {
		t.Error(err)
		return
	}
	defer in.Close()
	if _, _, err := in.Install(o); err != nil {
		t.Errorf("install: %v", err)
		return
	}
	defer func() {
		if err := in.Remove(); err != nil {
			t.Errorf("remove: %v", err)
		}
	}()

	for _, to := range []string{"198.18.99.7:53", "[fd00:99::7]:53"} {
		dst := netip.MustParseAddrPort(to)
		c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			t.Errorf("dial %s: %v", dst, err)
			return
		}
		defer c.Close()
		if _, err := c.Write([]byte("query")); err != nil {
			t.Errorf("send to %s: %v", dst, err)
			return
		}
		b, oob := make([]byte, 2048), make([]byte, OOBSize)
		ln.Conn().SetReadDeadline(time.Now().Add(5 * time.Second))
		n, client, got, err := ln.ReadDatagram(b, oob)
		if err != nil || got != dst || string(b[:n]) != "query" {
			t.Errorf("datagram to %s: %q from %v, original destination %v, %v; want it captured", dst, b[:n], client, got, err)
			if errors.Is(err, ErrNotRedirected) {
				t.Error("the datagram came to the listener's own address: not captured")
			}
			return
		}
		if want := c.LocalAddr().(*net.UDPAddr).AddrPort(); client.Port() != want.Port() {
			t.Errorf("client %v, want port %d", client, want.Port())
		}
	}
}
