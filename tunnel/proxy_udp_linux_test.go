package tunnel

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/socksudp"
	"github.com/detour-proxy/detour/tunnel/proxyport"
)

// A SOCKS5 client's UDP association: datagrams with the SOCKS5 header go
// to an echo server and come back with a header naming it; closing the TCP
// connection ends the association.
func TestProxyUDPAssociate(t *testing.T) {
	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			echo.WriteToUDPAddrPort(append([]byte("echo:"), buf[:n]...), from)
		}
	}()
	echoAddr := echo.LocalAddr().(*net.UDPAddr).AddrPort()
	port := &ProxyPort{IsLocal: notLocal}
	addr, logs := startProxy(t, port, nil)
	t.Cleanup(port.ShutdownUDP)

	c, br := dialProxyPort(t, addr)
	c.Write([]byte{5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0})
	rep := make([]byte, 12) // method, then the reply
	if _, err := io.ReadFull(br, rep); err != nil || rep[1] != 0 || rep[3] != 0 || rep[5] != 1 {
		t.Fatalf("UDP ASSOCIATE: %x %v", rep, err)
	}
	relay := netip.AddrPortFrom(netip.AddrFrom4([4]byte(rep[6:10])), uint16(rep[10])<<8|uint16(rep[11]))
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(5 * time.Second))
	for i := range 3 {
		msg := fmt.Sprintf("ping %d", i)
		dg := append(socksudp.Append(nil, echoAddr), msg...)
		if _, err := uc.WriteToUDPAddrPort(dg, relay); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		n, _, err := uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		src, host, p, off, err := proxyport.ParseUDPHeader(buf[:n])
		if err != nil || host != "" || netip.AddrPortFrom(src, p) != echoAddr || string(buf[off:n]) != "echo:"+msg {
			t.Fatalf("reply %d: %v %q %d %q %v", i, src, host, p, buf[off:n], err)
		}
	}
	// A datagram from another address is not the association's.
	other, _ := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)})
	if other != nil {
		defer other.Close()
		other.WriteToUDPAddrPort(append(socksudp.Append(nil, echoAddr), "stranger"...), relay)
		other.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, _, err := other.ReadFromUDPAddrPort(make([]byte, 100)); err == nil {
			t.Error("a datagram from another address was relayed")
		}
	}
	c.Close()
	logs.WaitFor(t, "request=socks5-udp")
	port.ShutdownUDP()
	logs.WaitFor(t, "msg=udp")
	logs.WaitFor(t, "inbound=proxy")
}
