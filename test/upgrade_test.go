package test

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// startUpgradable runs detour from bin, a copy of the binary the test may
// replace, with stderr on a pipe that the process and the successors it
// starts on SIGUSR2 share: d.done closes when the first process exits, and
// the log holds every process's lines. Cleanup stops every detour process
// that logged its PID and waits until each is gone.
func startUpgradable(t *testing.T, tp *topo, bin string, args ...string) *detourProc {
	t.Helper()
	argv := append([]string{"netns", "exec", tp.G, bin, "run", "--log-format", "json"}, args...)
	d := &detourProc{cmd: exec.Command("ip", argv...), done: make(chan struct{})}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	d.cmd.Stderr = w
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting detour: %v", err)
	}
	w.Close()
	go d.read(r)
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		for _, pid := range d.pids() {
			syscall.Kill(pid, syscall.SIGTERM)
		}
		deadline := time.Now().Add(15 * time.Second)
		for _, pid := range d.pids() {
			for !gone(pid) && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if !gone(pid) {
				t.Errorf("detour pid %d still runs 15s after SIGTERM; killing it", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		<-d.done
		if t.Failed() {
			t.Logf("detour log:\n%s", d.rawLog())
		}
		if log := d.rawLog(); strings.Contains(strings.ToLower(log), "panic") {
			t.Errorf("detour's log mentions a panic:\n%s", log)
		}
	})
	d.waitLog(t, 10*time.Second, "listening", nil)
	return d
}

// pids are the PIDs of the detour processes that said they listen.
func (d *detourProc) pids() []int {
	var out []int
	for _, rec := range d.find("listening", nil) {
		if pid := toInt(rec["pid"]); pid > 0 {
			out = append(out, pid)
		}
	}
	return out
}

// gone reports whether pid has exited (a zombie counts: its parent, an
// exited detour, no longer waits for it).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(rest, "Z")
}

// copyBinary puts a copy of detourBin at path, written beside it and
// renamed into place, as a package manager replaces a binary in use.
func copyBinary(t *testing.T, src, path string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := path + ".new"
	if err := os.WriteFile(tmp, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// buildVersion builds detour with main.version set to v.
func buildVersion(t *testing.T, v string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "detour-"+v)
	build := exec.Command("go", "build", "-ldflags", "-X main.version="+v, "-o", out, "github.com/detour-proxy/detour/cmd/detour")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building detour %s: %v\n%s", v, err, b)
	}
	return out
}

// echoOnce makes one new connection through detour to the echo server and
// checks the answer.
func echoOnce(tp *topo, t *testing.T) error {
	c, err := dialIn(t, tp.C, net.JoinHostPort(families[0].server, fmt.Sprint(bulkPort)))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("Eping")); err != nil {
		return err
	}
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(got) != "ping" {
		return fmt.Errorf("echo = %q, want ping", got)
	}
	return nil
}

// Replacing the binary and sending SIGUSR2 under load: a 100 MB download
// runs across the handover and 20 new connections a second come in. None
// fails, the download is byte-exact, detour's rules are there in every
// sample taken every 50 ms, the old process exits once its download ended,
// and the new one (the new binary: its version) serves on, and upgrades
// again on its own SIGUSR2; only the last process out removes the rules.
func TestUpgradeUnderLoad(t *testing.T) {
	newBin := buildVersion(t, "upgrade-test")
	for _, mode := range []string{"redirect", "tproxy"} {
		t.Run(mode, func(t *testing.T) { testUpgradeUnderLoad(t, mode, newBin) })
	}
}

func testUpgradeUnderLoad(t *testing.T, mode, newBin string) {
	tp := newTopo(t)
	startServers(t, tp)
	bin := filepath.Join(t.TempDir(), "detour")
	copyBinary(t, detourBin, bin)
	d := startUpgradable(t, tp, bin, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--mode", mode, "--grace", "60s",
		"--metrics", "127.0.0.1:9090", "--pprof", "127.0.0.1:9091", "--proxy-listen", fmt.Sprintf("[::]:%d", proxyPortPort)}, capture...)...)
	oldPID := d.cmd.Process.Pid
	server := net.JoinHostPort(families[0].server, fmt.Sprint(bulkPort))

	// The rules, sampled every 50 ms until the end of the handover.
	stopSampling, stopChurn := make(chan struct{}), make(chan struct{})
	var stopOnce sync.Once
	var sampling, churning sync.WaitGroup
	stopLoad := func() {
		stopOnce.Do(func() { close(stopChurn); close(stopSampling) })
		churning.Wait()
		sampling.Wait()
	}
	t.Cleanup(stopLoad) // before the topology goes, also on failure
	var samples, missing atomic.Int32
	var firstMissing atomic.Value
	sampling.Add(1)
	go func() {
		defer sampling.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			out, _ := exec.Command("ip", "netns", "exec", tp.G, "sh", "-c", "iptables-save; ip6tables-save; ip rule; ip -6 rule").CombinedOutput()
			samples.Add(1)
			if countIn(string(out), jumpRule) != 2 || (mode == "tproxy" && countIn(string(out), "lookup 100 proto 45") != 2) {
				if missing.Add(1) == 1 {
					firstMissing.Store(string(out))
				}
			}
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	}()

	// 20 new connections a second, each an echo.
	var churned, failed atomic.Int32
	var churnErrs sync.Map
	churning.Add(1)
	go func() {
		defer churning.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		var wg sync.WaitGroup
		defer wg.Wait()
		for i := 0; ; i++ {
			select {
			case <-stopChurn:
				return
			case <-tick.C:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				churned.Add(1)
				if err := echoOnce(tp, t); err != nil {
					failed.Add(1)
					churnErrs.Store(i, err.Error())
				}
			}()
		}
	}()

	// The download, read at no more than 16 MB/s (at least 6 s), and its
	// last tenth not before the handover, so that it spans it however long
	// the new process takes to start (rules adopted under a contended
	// xtables lock took 5 s on a loaded machine).
	const n = 100 << 20
	handedOver := make(chan struct{})
	handOver := sync.OnceFunc(func() { close(handedOver) })
	t.Cleanup(handOver)
	dl := dial(t, tp, server)
	var req [9]byte
	req[0] = 'D'
	binary.BigEndian.PutUint64(req[1:], n)
	dl.Write(req[:])
	dlDone := make(chan string, 1)
	var dlEnd time.Time
	go func() {
		h := sha256.New()
		buf := make([]byte, 256<<10)
		total := 0
		start := time.Now()
		dl.SetReadDeadline(start.Add(2 * time.Minute))
		for {
			k, err := dl.Read(buf)
			h.Write(buf[:k])
			total += k
			if err != nil {
				break
			}
			if ahead := time.Duration(float64(total)/16e6*float64(time.Second)) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
			if total >= n/10*9 {
				select {
				case <-handedOver:
				case <-time.After(time.Minute):
				}
			}
		}
		dl.Close()
		dlEnd = time.Now()
		dlDone <- fmt.Sprintf("%d %s", total, hex.EncodeToString(h.Sum(nil)))
	}()

	time.Sleep(500 * time.Millisecond)
	copyBinary(t, newBin, bin)
	d.cmd.Process.Signal(syscall.SIGUSR2)
	handed := d.waitLog(t, 45*time.Second, "upgrade: handed over", nil)
	newPID := toInt(handed["new_pid"])
	handOver()
	select {
	case r := <-dlDone:
		t.Fatalf("the download (%s) ended before the handover; it must span it", r)
	default:
	}
	d.waitLog(t, 5*time.Second, "listening", map[string]string{"version": "upgrade-test", "inherited": "true"})
	if pids := d.pids(); len(pids) != 2 || pids[0] != oldPID || pids[1] != newPID {
		t.Fatalf("listening PIDs %v, want old %d then new %d", pids, oldPID, newPID)
	}
	d.waitLog(t, 5*time.Second, "rules adopted", nil)

	var dlResult string
	select {
	case dlResult = <-dlDone:
	case <-time.After(90 * time.Second):
		t.Fatal("the download did not end within 90s")
	}
	if want := fmt.Sprintf("%d %s", n, streamSum(n)); dlResult != want {
		t.Fatalf("download = %s, want %s (byte-exact)", dlResult, want)
	}
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the old detour (pid %d) still runs 30s after its download ended", oldPID)
	}
	oldExit := time.Now()
	if d.err != nil {
		t.Errorf("old detour exited with %v, want status 0", d.err)
	}
	if oldExit.Before(dlEnd) {
		t.Errorf("old detour exited before its download ended")
	}
	if len(d.find("grace period over; reset the connections left", nil)) > 0 {
		t.Error("the old detour cut connections at the end of its grace period")
	}
	d.waitLog(t, 5*time.Second, "rules left installed: another detour process serves with them", nil)

	// The new process serves on: connections, metrics and profiles.
	time.Sleep(time.Second)
	stopLoad()
	if err := echoOnce(tp, t); err != nil {
		t.Fatalf("connection through the new detour: %v", err)
	}
	for _, url := range []string{"http://127.0.0.1:9090/metrics", "http://127.0.0.1:9091/debug/pprof/"} {
		if out, err := tp.exec(t, tp.G, "curl", "-sSf", "-m", "5", "-o", "/dev/null", url); err != nil {
			t.Errorf("%s after the old process left: %v\n%s", url, err, out)
		}
	}
	if gone(newPID) {
		t.Fatalf("the new detour (pid %d) is gone", newPID)
	}
	// The proxy port was handed over too (a new listen would have failed
	// while the old process held the port): it serves from the new one.
	proxy := net.JoinHostPort(families[0].gateway, fmt.Sprint(proxyPortPort))
	if out, err := tp.exec(t, tp.C, "curl", "-sSf", "-m", "5", "-x", "http://"+proxy, "http://"+families[0].server+"/"); err != nil {
		t.Errorf("the proxy port after the old process left: %v\n%s", err, out)
	}
	if recs := d.find("upgrade: not using an inherited listener; listening anew", nil); len(recs) > 0 {
		t.Errorf("an inherited listener was not used: %v", recs)
	}

	t.Logf("%d connections during the upgrade, %d failed; %d rule samples, %d without the rules", churned.Load(), failed.Load(), samples.Load(), missing.Load())
	if failed.Load() > 0 {
		churnErrs.Range(func(k, v any) bool { t.Errorf("connection %v: %v", k, v); return true })
	}
	if churned.Load() < 40 {
		t.Errorf("only %d connections during the upgrade, want at least 40", churned.Load())
	}
	if missing.Load() > 0 {
		t.Errorf("%d of %d samples without detour's rules; first:\n%v", missing.Load(), samples.Load(), firstMissing.Load())
	}

	// A process started by an upgrade upgrades in turn (its successor
	// gets what it inherited); the second one leaves at once, idle.
	syscall.Kill(newPID, syscall.SIGUSR2)
	waitFor(t, 45*time.Second, "a second handover", func() bool { return len(d.find("upgrade: handed over", nil)) == 2 })
	third := toInt(d.find("upgrade: handed over", nil)[1]["new_pid"])
	waitFor(t, 15*time.Second, "the second detour to exit", func() bool { return gone(newPID) })
	if err := echoOnce(tp, t); err != nil {
		t.Fatalf("connection through the third detour: %v", err)
	}

	// The last process out removes the rules.
	syscall.Kill(third, syscall.SIGTERM)
	waitFor(t, 15*time.Second, "the third detour to exit", func() bool { return gone(third) })
	d.waitLog(t, 5*time.Second, "rules removed", nil)
	if n := len(d.find("rules removed", nil)); n != 1 {
		t.Errorf("%d processes removed the rules, want the last one only", n)
	}
	if st := tp.kernelState(t); countIn(st, "detour:") > 0 {
		t.Errorf("rules left after the last detour exited:\n%s", st)
	}
}

// A new binary that fails (exits at once; refuses a configuration broken
// meanwhile; serves and then crashes within its probation) leaves the old
// process serving with its rules, and the log says why.
func TestUpgradeFailedKeepsServing(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	bin := filepath.Join(t.TempDir(), "detour")
	copyBinary(t, detourBin, bin)
	config := filepath.Join(t.TempDir(), "detour.yaml")
	writeConfig := func(s string) {
		if err := os.WriteFile(config, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("default: direct\n")
	d := startUpgradable(t, tp, bin, append([]string{"--listen", fmt.Sprintf(":%d", listenPort), "--config", config}, capture...)...)
	real := filepath.Join(t.TempDir(), "detour-real")
	copyBinary(t, detourBin, real)

	for i, tc := range []struct {
		name, script, reason string
		crash                bool // SIGKILL the new process once it listens
	}{
		{"exits at once", "#!/bin/sh\necho 'broken build' >&2\nexit 1\n", "exited before it served: exit status 1", false},
		// The real binary, with the configuration broken meanwhile: it
		// refuses to start (exit 2) and says why.
		{"bad configuration", "", "exit status 2 (bad flags or configuration", false},
		// The real binary, killed once it says it listens: just before it
		// serves, or during its probation. (Killed at a fixed time after
		// its start instead, a loaded machine let the probation end first,
		// and the crash was a successful upgrade.)
		{"crashes", "#!/bin/sh\nexec " + real + " \"$@\"\n", "killed by signal 9 (killed)", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.script == "" {
				copyBinary(t, detourBin, bin)
				writeConfig("default: nowhere\n")
				defer writeConfig("default: direct\n")
			} else {
				tmp := bin + ".new"
				if err := os.WriteFile(tmp, []byte(tc.script), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Rename(tmp, bin); err != nil {
					t.Fatal(err)
				}
			}
			d.cmd.Process.Signal(syscall.SIGUSR2)
			if tc.crash {
				waitFor(t, 10*time.Second, "new binary started", func() bool { return len(d.find("upgrade: started the new binary", nil)) > i })
				pid := toInt(d.find("upgrade: started the new binary", nil)[i]["new_pid"])
				waitFor(t, 30*time.Second, "listening line of the new process", func() bool {
					for _, rec := range d.find("listening", nil) {
						if toInt(rec["pid"]) == pid {
							return true
						}
					}
					return false
				})
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatalf("killing the new process %d: %v", pid, err)
				}
			}
			waitFor(t, 40*time.Second, "upgrade failed", func() bool { return len(d.find("upgrade failed", nil)) > i })
			rec := d.find("upgrade failed", nil)[i]
			if reason := fmt.Sprint(rec["reason"]); !strings.Contains(reason, tc.reason) {
				t.Errorf("upgrade failed: reason %q, want it to say %q", reason, tc.reason)
			}
			if tc.script == "" && !strings.Contains(d.rawLog(), "nowhere") {
				t.Errorf("the new process's own error line, naming the bad field, is not in the log")
			}
			if rec["kept"] != "this process serves on" {
				t.Errorf("upgrade failed line %v: want kept=this process serves on", rec)
			}
			for range 5 {
				if err := echoOnce(tp, t); err != nil {
					t.Fatalf("connection after the failed upgrade: %v", err)
				}
			}
			if st := tp.kernelState(t); countIn(st, jumpRule) != 2 {
				t.Fatalf("detour's rules gone after the failed upgrade:\n%s", st)
			}
			select {
			case <-d.done:
				t.Fatalf("old detour exited: %v", d.err)
			default:
			}
		})
	}
	// It stops as usual and removes its rules.
	d.cmd.Process.Signal(syscall.SIGTERM)
	waitExit(t, d, 15*time.Second)
	d.waitLog(t, 5*time.Second, "rules removed", nil)
}
