package test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The Debian package, end to end: `make deb`'s script builds the same
// bytes twice, lintian finds no error, `dpkg -i` installs and starts
// nothing, the installed binary runs (version, doctor, its commented
// config), removing it stops detour and removes its rules, and purging
// leaves nothing behind.
//
// It installs into this machine's root filesystem, so it runs only where
// that is meant to happen (CI, or DETOUR_TEST_DEB=1) and where no detour
// package or /usr/bin/detour is there already; it purges the package
// whatever happens. The kernel side (doctor, rules) runs in a namespace of
// its own.
func TestDebPackage(t *testing.T) {
	requireRoot(t)
	if os.Getenv("CI") != "true" && os.Getenv("DETOUR_TEST_DEB") != "1" {
		t.Skip("installs a .deb into this machine's root filesystem: runs in CI (CI=true) or with DETOUR_TEST_DEB=1")
	}
	for _, tool := range []string{"dpkg", "dpkg-deb", "lintian", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found (scripts/install-deps.sh installs it): %v", tool, err)
		}
	}
	paths := []string{"/usr/bin/detour", "/usr/lib/systemd/system/detour.service", "/etc/detour", "/usr/share/doc/detour"}
	if exec.Command("dpkg", "-s", "detour").Run() == nil {
		t.Skip("a detour package is installed on this machine; not touching it")
	}
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			t.Skipf("%s exists on this machine; not touching it", p)
		}
	}
	run := func(name string, args ...string) (string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		return string(out), err
	}
	must := func(name string, args ...string) string {
		t.Helper()
		out, err := run(name, args...)
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return out
	}

	// Built twice, the same bytes.
	var debs []string
	for range 2 {
		out := must("bash", "../scripts/build-deb.sh", t.TempDir())
		debs = append(debs, strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]))
	}
	deb := debs[0]
	if a, b := fileSum(t, debs[0]), fileSum(t, debs[1]); a != b {
		t.Errorf("two builds differ: %s %s, %s %s", a, debs[0], b, debs[1])
	}
	base := filepath.Base(deb)
	version, ok := strings.CutPrefix(strings.TrimSuffix(base, "_amd64.deb"), "detour_")
	if !ok || !strings.HasSuffix(base, "_amd64.deb") {
		t.Fatalf("package file %s, want detour_VERSION_amd64.deb", base)
	}
	contents := must("dpkg-deb", "-c", deb)
	for _, want := range []string{"./usr/bin/detour", "./usr/lib/systemd/system/detour.service", "./etc/detour/config.yaml",
		"./usr/share/doc/detour/copyright", "./usr/share/doc/detour/changelog.gz"} {
		if !strings.Contains(contents, want) {
			t.Errorf("the package lacks %s:\n%s", want, contents)
		}
	}
	out, err := run("lintian", "--fail-on", "error", deb)
	t.Logf("lintian:\n%s", out)
	if err != nil || strings.Contains(out, "\nE: ") || strings.HasPrefix(out, "E: ") {
		t.Fatalf("lintian reports errors (%v)", err)
	}

	// A namespace for what touches the kernel.
	b := make([]byte, 4)
	rand.Read(b)
	ns := "dt" + hex.EncodeToString(b) + "-deb"
	must("ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	must("ip", "-n", ns, "link", "set", "lo", "up")

	t.Cleanup(func() {
		if out, err := run("dpkg", "--purge", "detour"); err != nil {
			t.Errorf("dpkg --purge detour: %v\n%s", err, out)
		}
	})
	must("dpkg", "-i", deb)
	if out := must("dpkg-query", "-W", "-f", "${Status} ${Version}\n${Conffiles}\n", "detour"); !strings.HasPrefix(out, "install ok installed "+version) ||
		!strings.Contains(out, "/etc/detour/config.yaml") {
		t.Fatalf("dpkg-query after install:\n%s", out)
	}
	if out := must("/usr/bin/detour", "version"); !strings.Contains(out, version) {
		t.Errorf("detour version = %q, want %s", out, version)
	}
	// Installing starts nothing.
	if running := detourProcesses(t); len(running) > 0 {
		t.Errorf("detour runs after install: pids %v", running)
	}
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		if out, _ := run("systemctl", "is-enabled", "detour.service"); strings.TrimSpace(out) == "enabled" {
			t.Error("detour.service is enabled by the install")
		}
	}
	unit, _ := os.ReadFile("/usr/lib/systemd/system/detour.service")
	if !strings.Contains(string(unit), "ExecStart=/usr/bin/detour run --config /etc/detour/config.yaml --install-rules") ||
		strings.Contains(string(unit), "/usr/local") {
		t.Errorf("the unit does not run the packaged binary with the packaged config:\n%s", unit)
	}
	if out := must("/usr/bin/detour", "run", "--check", "--config", "/etc/detour/config.yaml"); !strings.Contains(out, "configuration OK") {
		t.Errorf("the packaged config: %s", out)
	}
	out, err = run("ip", "netns", "exec", ns, "/usr/bin/detour", "doctor", "--firewall", "nftables")
	t.Logf("detour doctor:\n%s", out)
	if err != nil || !strings.Contains(out, "firewall: nftables") || !strings.Contains(out, "tproxy mode: the kernel has every match and target") {
		t.Fatalf("detour doctor (installed): %v", err)
	}

	// Removing stops detour and takes its rules away: prerm runs in the
	// namespace dpkg runs in.
	must("ip", "netns", "exec", ns, "/usr/bin/detour", "rules", "install", "--firewall", "nftables", "--mode", "tproxy", "--bypass", "none")
	if out := must("ip", "netns", "exec", ns, "nft", "list", "ruleset"); !strings.Contains(out, "table inet detour") {
		t.Fatalf("rules not installed:\n%s", out)
	}
	must("ip", "netns", "exec", ns, "dpkg", "-r", "detour")
	if out := must("ip", "netns", "exec", ns, "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Errorf("detour's rules are left after dpkg -r:\n%s", out)
	}
	if out := must("ip", "netns", "exec", ns, "ip", "rule"); strings.Contains(out, "proto 45") {
		t.Errorf("detour's ip rules are left after dpkg -r:\n%s", out)
	}
	if _, err := os.Stat("/usr/bin/detour"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/usr/bin/detour after dpkg -r: %v", err)
	}
	if _, err := os.Stat("/etc/detour/config.yaml"); err != nil {
		t.Errorf("the conffile went with dpkg -r (it goes with --purge): %v", err)
	}

	must("dpkg", "--purge", "detour")
	for _, p := range paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is left after purge (%v)", p, err)
		}
	}
	if out, err := run("dpkg-query", "-W", "-f", "${Status}", "detour"); err == nil && strings.TrimSpace(out) != "" && !strings.Contains(out, "not-installed") {
		t.Errorf("dpkg still knows detour after purge: %q", out)
	}
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// detourProcesses lists the processes running /usr/bin/detour.
func detourProcesses(t *testing.T) []string {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var out []string
	for _, d := range dirs {
		if exe, err := os.Readlink(d + "/exe"); err == nil && exe == "/usr/bin/detour" {
			out = append(out, filepath.Base(d))
		}
	}
	return out
}
