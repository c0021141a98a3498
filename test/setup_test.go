package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runScript runs one of scripts/ in namespace ns ("" for this one) and returns
// its output.
func runScript(t *testing.T, ns string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	argv := append([]string{"../scripts/" + name}, args...)
	if ns != "" {
		argv = append([]string{"ip", "netns", "exec", ns}, argv...)
	}
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

func mustContain(t *testing.T, what, s string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, s)
		}
	}
}

// The dry runs print the plan and write nothing.
func TestSetupTeardownDryRun(t *testing.T) {
	_, unitErr := os.Stat("/etc/systemd/system/detour.service")
	_, binErr := os.Stat("/usr/local/bin/detour")
	out := runScript(t, "", "setup.sh", "--dry-run", "--binary", detourBin, "--sysctl", "--",
		"--mode", "tproxy", "--bypass", "none", "--grace", "5s")
	mustContain(t, "setup.sh --dry-run", out,
		"+ "+detourBin+" rules check --mode tproxy --bypass none",
		"+ sysctl -qw net.ipv4.ip_forward=1",
		"+ sysctl -qw net.ipv6.conf.all.forwarding=1",
		"+ write /etc/sysctl.d/90-detour.conf",
		"+ install -D -m 0755 "+detourBin+" /usr/local/bin/detour",
		"+ write /etc/systemd/system/detour.service",
		"ExecStart=/usr/local/bin/detour run --install-rules --mode tproxy --bypass none --grace 5s",
		"Restart=on-failure",
		"AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
		"systemctl daemon-reload",
		"dry run: nothing was changed")
	out = runScript(t, "", "teardown.sh", "--dry-run")
	mustContain(t, "teardown.sh --dry-run", out,
		"systemctl disable --now detour.service", "/etc/systemd/system/detour.service",
		"/usr/local/bin/detour", "/etc/sysctl.d/90-detour.conf", "dry run: nothing was changed")
	if _, err := os.Stat("/etc/systemd/system/detour.service"); (err == nil) != (unitErr == nil) {
		t.Error("a dry run changed /etc/systemd/system/detour.service")
	}
	if _, err := os.Stat("/usr/local/bin/detour"); (err == nil) != (binErr == nil) {
		t.Error("a dry run changed /usr/local/bin/detour")
	}
}

// The real thing, in the gateway namespace of a topology with a temporary
// root for the files: setup sets the namespace's sysctls and writes the
// files, teardown takes all of it back.
func TestSetupTeardownInNamespace(t *testing.T) {
	tp := newTopo(t)
	tp.operatorFirewall(t)
	// A gateway not set up yet: forwarding off, one strict interface.
	if out, err := tp.exec(t, tp.G, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0",
		"net.ipv4.conf.gc.rp_filter=1"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	sysctls := func() string {
		out, err := tp.exec(t, tp.G, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.rp_filter")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return strings.Join(strings.Fields(out), " ")
	}
	hostForward, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	beforeSysctls := sysctls()
	beforeKernel := tp.kernelState(t)
	root := t.TempDir()

	out := runScript(t, tp.G, "setup.sh", "--root", root, "--binary", detourBin, "--sysctl", "--",
		"--mode", "tproxy", "--bypass", "none", "--interface", "gc")
	mustContain(t, "setup.sh", out, "warning: net.ipv4.ip_forward is 0", "warning: rp_filter is strict (1) on gc",
		"skipped (--root "+root+")")
	if got := sysctls(); got != "1 1 2" {
		t.Errorf("sysctls in the gateway after setup = %q, want forwarding on and rp_filter loose", got)
	}
	if now, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); string(now) != string(hostForward) {
		t.Errorf("setup changed the host's own ip_forward: %q → %q", hostForward, now)
	}
	read := func(path string) string {
		b, err := os.ReadFile(filepath.Join(root, path))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	mustContain(t, "sysctl.d", read("etc/sysctl.d/90-detour.conf"),
		"net.ipv4.ip_forward=1\n", "net.ipv6.conf.all.forwarding=1\n", "net.ipv4.conf.all.rp_filter=2\n")
	mustContain(t, "saved sysctls", read("var/lib/detour/sysctl.saved"), "net.ipv4.ip_forward=0\n")
	mustContain(t, "unit", read("etc/systemd/system/detour.service"),
		"\nExecStart=/usr/local/bin/detour run --install-rules --mode tproxy --bypass none --interface gc\n",
		"\nRestart=on-failure\n", "\nAmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n")
	if st, err := os.Stat(filepath.Join(root, "usr/local/bin/detour")); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v %v", st, err)
	}

	// What the unit runs, with the installed binary: rules in, then a
	// crash (kill -9) left for teardown to clean.
	installed := filepath.Join(root, "usr/local/bin/detour")
	if out, err := tp.exec(t, tp.G, installed, "rules", "install", "--mode", "tproxy", "--bypass", "none", "--interface", "gc"); err != nil {
		t.Fatalf("installed binary: %v\n%s", err, out)
	}

	out = runScript(t, tp.G, "teardown.sh", "--root", root)
	mustContain(t, "teardown.sh", out, "detour rules removed", "skipped (--root "+root+")")
	for _, path := range []string{"etc/systemd/system/detour.service", "usr/local/bin/detour", "etc/sysctl.d/90-detour.conf", "var/lib/detour"} {
		if _, err := os.Stat(filepath.Join(root, path)); err == nil {
			t.Errorf("teardown left %s", path)
		}
	}
	if got := sysctls(); got != beforeSysctls {
		t.Errorf("sysctls after teardown = %q, want %q as before setup", got, beforeSysctls)
	}
	tp.sameState(t, beforeKernel, "after setup and teardown")
	// Twice is harmless.
	mustContain(t, "second teardown.sh", runScript(t, tp.G, "teardown.sh", "--root", root), "already gone")
}
