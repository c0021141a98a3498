package test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// echoConn opens a connection through detour to the echo server and checks
// that it works.
func echoConn(t *testing.T, tp *topo) *net.TCPConn {
	t.Helper()
	c := dial(t, tp, net.JoinHostPort(families[0].server, fmt.Sprint(bulkPort)))
	c.Write([]byte("Eping"))
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("echo through detour: %v", err)
	}
	return c
}

func waitExit(t *testing.T, d *detourProc, within time.Duration) {
	t.Helper()
	select {
	case <-d.done:
		if d.err != nil {
			t.Fatalf("detour exited with %v, want status 0; log:\n%s", d.err, d.rawLog())
		}
	case <-time.After(within):
		t.Fatalf("detour still running %v after SIGTERM; log:\n%s", within, d.rawLog())
	}
}

func TestSIGTERMDrainsLiveConnections(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--grace", "20s"}, capture...)...)
	live := echoConn(t, tp)

	d.cmd.Process.Signal(syscall.SIGTERM)
	d.waitLog(t, 5*time.Second, "shutting down", nil)

	// No new connections…
	if c, err := dialIn(t, tp.C, net.JoinHostPort(families[0].server, fmt.Sprint(bulkPort))); err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("Eping"))
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if err == nil {
			t.Fatal("a new connection was served after SIGTERM")
		}
	}
	// …but the live one goes on until it ends by itself.
	live.Write([]byte("more"))
	live.CloseWrite()
	if got, err := io.ReadAll(live); err != nil || string(got) != "more" {
		t.Fatalf("live connection after SIGTERM: %q, %v", got, err)
	}
	waitExit(t, d, 5*time.Second)
	if len(d.find("stopped", nil)) == 0 {
		t.Errorf("no 'stopped' line; log:\n%s", d.rawLog())
	}
}

func TestSIGTERMCutsAfterGrace(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--grace", "500ms"}, capture...)...)
	stuck := echoConn(t, tp)

	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, d, 5*time.Second)
	if took := time.Since(start); took < 500*time.Millisecond {
		t.Errorf("detour exited after %v, before the 500ms grace period", took)
	}
	stuck.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := stuck.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection cut at the end of the grace period: read %v, want reset", err)
	}
}

func TestIdleTimeoutClosesSilentConnection(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--idle-timeout", "1s"}, capture...)...)
	c := echoConn(t, tp) // then silence
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	took := time.Since(start)
	if err != io.EOF {
		t.Fatalf("silent connection: read %v, want EOF from the idle timeout", err)
	}
	if took < time.Second || took > 3*time.Second {
		t.Fatalf("silent connection closed after %v, want between 1s and 3s", took)
	}
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"error": "idle timeout"})
}

func TestBadFlagsExit2(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--mode", "nat"}, "--mode"},
		{[]string{"run", "--listen", "nohost"}, "--listen"},
		{[]string{"run", "--listen", "1.2.3.4:99999"}, "--listen"},
		{[]string{"run", "--listen", "example.com:80"}, "--listen"},
		{[]string{"run", "--mark", "blue"}, "--mark"},
		{[]string{"run", "--mark", "0"}, "--mark"},
		{[]string{"run", "--idle-timeout", "soon"}, "--idle-timeout"},
		{[]string{"run", "--log-format", "xml"}, "--log-format"},
		{[]string{"run", "--no-such-flag"}, "--no-such-flag"},
		{[]string{"frobnicate"}, "frobnicate"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, err := exec.Command(detourBin, tc.args...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Fatalf("exit = %v, want status 2; output: %s", err, out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("output %q: want one line naming %s", out, tc.want)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	out, err := exec.Command(detourBin, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "detour ") {
		t.Fatalf("detour version = %q, %v", out, err)
	}
}
