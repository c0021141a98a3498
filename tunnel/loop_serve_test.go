package tunnel

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A listener whose connections all "were going" to the listener itself, as
// with a REDIRECT rule that captures detour's own connections: the first
// connection's dial comes straight back, is refused at accept as a routing
// loop (one line, Refused("loop")), and nothing more is dialled.
func TestServeRefusesLoop(t *testing.T) {
	for _, sniffing := range []bool{true, false} {
		name := "early dial"
		if !sniffing {
			name = "sniff off"
		}
		t.Run(name, func(t *testing.T) {
			ln := newFakeListener(t, netip.AddrPort{}, nil)
			ln.dst = ln.Addr().(*net.TCPAddr).AddrPort()
			obs := newCountingObserver()
			logs := startTunnel(t, ln, &Tunnel{Loops: &LoopGuard{Cause: "test cause"}, Observer: obs, Sniff: SniffOptions{Disabled: !sniffing}})

			// The client sees its connection reset, or closed; with no
			// sniffing the reset may come before its connect returns.
			c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
			if err == nil {
				defer c.Close()
				c.Write([]byte("hello"))
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.ReadAll(c)
			} else if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatal(err)
			}
			logs.WaitFor(t, "routing loop")
			deadline := time.Now().Add(5 * time.Second)
			for obs.get(func(o *countingObserver) int { return o.closed }) < 1 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			time.Sleep(100 * time.Millisecond) // a second loop would show by now
			if n := obs.get(func(o *countingObserver) int { return o.refused["loop"] }); n != 1 {
				t.Errorf("%d connections refused as loops, want 1", n)
			}
			if n := obs.get(func(o *countingObserver) int { return o.accepted }); n != 2 {
				t.Errorf("%d connections accepted, want 2 (the client and its one looped dial)", n)
			}
			if n := strings.Count(logs.String(), "routing loop"); n != 1 || !strings.Contains(logs.String(), "test cause") {
				t.Errorf("%d routing loop lines (want 1, with the cause): %s", n, logs.String())
			}
		})
	}
}
