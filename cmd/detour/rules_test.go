package main

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/redirect"
)

func TestRunRuleFlags(t *testing.T) {
	cfg, err := parseRunFlags([]string{"--install-rules", "--mode", "tproxy", "--listen", "0.0.0.0:8080",
		"--interface", "lan0", "--interface", "wg0,wg1", "--source", "192.168.1.0/24", "--bypass", "198.18.3.0/24",
		"--bypass", "default", "--ports", "80,443", "--ports", "8000-9000", "--table", "200", "--tproxy-mark", "0x4000",
		"--output", "--rules-recheck", "1s"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	o := cfg.capture.opts
	if !cfg.capture.install || cfg.capture.recheck != time.Second {
		t.Errorf("install %v recheck %v", cfg.capture.install, cfg.capture.recheck)
	}
	if o.Mode != redirect.TProxy || o.Port != 8080 || o.ListenIP != netip.IPv4Unspecified() || o.Mark != 0x2d ||
		o.TProxyMark != 0x4000 || o.Table != 200 || !o.Output || o.NoIPv6 {
		t.Errorf("options = %+v", o)
	}
	if !slices.Equal(o.Interfaces, []string{"lan0", "wg0", "wg1"}) {
		t.Errorf("interfaces = %v", o.Interfaces)
	}
	if !slices.Equal(o.Ports, []ports.Range{{Lo: 80, Hi: 80}, {Lo: 443, Hi: 443}, {Lo: 8000, Hi: 9000}}) {
		t.Errorf("ports = %v", o.Ports)
	}
	// The default list plus one, once each (198.18.3.0/24 is inside the
	// default 198.18.0.0/15 but listed on its own).
	if len(o.Bypass) != len(redirect.DefaultBypass())+1 || !slices.Contains(o.Bypass, netip.MustParsePrefix("198.18.3.0/24")) {
		t.Errorf("bypass = %v", o.Bypass)
	}
}

func TestRuleFlagDefaults(t *testing.T) {
	cfg, err := parseRunFlags([]string{"--install-rules"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	o := cfg.capture.opts
	if o.Bypass != nil || o.NoIPv6 || o.Port != 7777 || o.ListenIP.IsValid() || cfg.capture.recheck != 10*time.Second {
		t.Errorf("defaults = %+v", o)
	}
	cfg, err = parseRunFlags([]string{"--install-rules", "--bypass", "none", "--ipv6=false"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o := cfg.capture.opts; o.Bypass == nil || len(o.Bypass) != 0 || !o.NoIPv6 {
		t.Errorf("--bypass none --ipv6=false = %+v", o)
	}
	// Without --install-rules the rules are someone else's: a TPROXY mark
	// that would clash with detour's is not detour's business.
	if _, err := parseRunFlags([]string{"--mode", "tproxy", "--mark", "0x100"}, &bytes.Buffer{}); err != nil {
		t.Errorf("run --mode tproxy --mark 0x100: %v", err)
	}
}

// dryRun runs `detour rules install --dry-run ARGS` and returns what it
// printed, failing unless it exits 0 and prints each of wants.
func dryRun(t *testing.T, args []string, wants ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := detour(append([]string{"rules", "install", "--dry-run"}, args...), &stdout, &stderr); code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	out := stdout.String()
	for _, want := range wants {
		if !strings.Contains(out, want) {
			t.Errorf("dry run lacks %q:\n%s", want, out)
		}
	}
	return out
}

func TestRulesDryRun(t *testing.T) {
	out := dryRun(t, []string{"--firewall", "iptables", "--mode", "tproxy", "--listen", ":9000",
		"--bypass", "none", "--ipv6=false", "--table", "7"},
		"iptables -t mangle -N DETOUR_TPROXY\n",
		"-j TPROXY --on-port 9000 --tproxy-mark 0x100/0x100\n",
		"ip rule add fwmark 0x100/0x100 lookup 7 proto 45\n",
		"ip route add local 0.0.0.0/0 dev lo table 7 proto 45\n",
		// --udp is on in tproxy mode: UDP is captured too, so the jump
		// takes every protocol.
		"-p udp -m comment --comment detour:capture -j TPROXY --on-port 9000 --tproxy-mark 0x100/0x100\n",
		"iptables -t mangle -I PREROUTING 1 -m comment --comment detour:jump -j DETOUR_TPROXY\n",
	)
	if strings.Contains(out, "ip6tables") || strings.Contains(out, "-d ") {
		t.Errorf("dry run with --ipv6=false --bypass none:\n%s", out)
	}
}

// With nftables the dry run is an nft script of detour's table and the
// policy routes as comments.
func TestRulesDryRunNftables(t *testing.T) {
	out := dryRun(t, []string{"--firewall", "nftables", "--mode", "tproxy", "--listen", ":9000",
		"--bypass", "none", "--ipv6=false", "--table", "7", "--ports", "443"},
		"# firewall nftables (--firewall nftables)\n",
		"table inet detour {\n\tchain mangle_prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n",
		"\t\tmeta nfproto ipv4 meta l4proto tcp tcp flags & (fin | syn | rst | ack) syn th dport 443 tproxy ip to :9000 meta mark set meta mark | 0x00000100 accept comment \"detour:capture\"\n",
		"# ip rule add fwmark 0x100/0x100 lookup 7 proto 45\n",
	)
	if strings.Contains(out, "iptables") || strings.Contains(out, "ipv6") {
		t.Errorf("dry run with nftables --ipv6=false:\n%s", out)
	}
}

func TestFirewallFlagAndField(t *testing.T) {
	cfg, err := parseRunFlags([]string{"--install-rules", "--firewall", "nftables"}, &bytes.Buffer{})
	if err != nil || cfg.capture.firewall != redirect.FirewallNftables {
		t.Fatalf("--firewall nftables: %v, %q", err, cfg.capture.firewall)
	}
	cfg, err = parseRunFlags([]string{"--install-rules"}, &bytes.Buffer{})
	if err != nil || cfg.capture.firewall != redirect.FirewallAuto {
		t.Fatalf("default: %v, %q", err, cfg.capture.firewall)
	}
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg, err = parseRunFlags([]string{"--install-rules", "--config", write("firewall: iptables\n")}, &bytes.Buffer{})
	if err != nil || cfg.capture.firewall != redirect.FirewallIptables {
		t.Fatalf("firewall: iptables in the file: %v, %q", err, cfg.capture.firewall)
	}
	// The flag overrides the file.
	cfg, err = parseRunFlags([]string{"--install-rules", "--firewall", "nftables", "--config", write("firewall: iptables\n")}, &bytes.Buffer{})
	if err != nil || cfg.capture.firewall != redirect.FirewallNftables {
		t.Fatalf("--firewall over the file: %v, %q", err, cfg.capture.firewall)
	}
	_, err = parseRunFlags([]string{"--install-rules", "--config", write("\nfirewall: ipchains\n")}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "firewall (line 2)") || !strings.Contains(err.Error(), "ipchains") {
		t.Fatalf("bad firewall in the file: %v", err)
	}
}

func TestRuleFlagErrorsExit2(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--interface", "lan0"}, "--interface: only with --install-rules"},
		{[]string{"run", "--rules-recheck", "1s"}, "--rules-recheck: only with --install-rules"},
		{[]string{"run", "--install-rules", "--rules-recheck", "-1s"}, "--rules-recheck"},
		{[]string{"run", "--install-rules", "--mode", "tproxy", "--mark", "0x100"}, "--tproxy-mark"},
		{[]string{"run", "--install-rules", "--mode", "tproxy", "--tproxy-mark", "0x2d"}, "--tproxy-mark"},
		{[]string{"run", "--install-rules", "--table", "5"}, "--table: only with --mode tproxy"},
		{[]string{"run", "--install-rules", "--mode", "tproxy", "--table", "254"}, "--table"},
		{[]string{"run", "--install-rules", "--mode", "tproxy", "--table", "x"}, "--table"},
		{[]string{"run", "--install-rules", "--ports", "0"}, "--ports"},
		{[]string{"run", "--install-rules", "--ports", "90-80"}, "--ports"},
		{[]string{"run", "--install-rules", "--bypass", "10.0.0.0/33"}, "--bypass"},
		{[]string{"run", "--install-rules", "--bypass", "none", "--bypass", "10.0.0.0/8"}, "--bypass none"},
		{[]string{"run", "--install-rules", "--source", "lan"}, "--source"},
		{[]string{"run", "--install-rules", "--interface", "a-very-long-interface"}, "--interface"},
		{[]string{"run", "--install-rules", "--ipv6=false", "--listen", "[fd00::1]:7777"}, "--ipv6"},
		{[]string{"run", "--install-rules", "--ipv6=false", "--source", "fd00::/8"}, "--source"},
		{[]string{"rules", "install", "--listen", "127.0.0.1:7777"}, "--listen"},
		{[]string{"rules"}, "usage"},
		{[]string{"rules", "frobnicate"}, "unknown command \"frobnicate\""},
		{[]string{"rules", "install", "extra"}, "unexpected argument"},
		{[]string{"rules", "remove", "--dry-run"}, "--dry-run: only with install"},
		{[]string{"rules", "install", "--mode", "nat"}, "--mode"},
		{[]string{"rules", "install", "--listen", "nohost"}, "--listen"},
		{[]string{"rules", "install", "--install-rules"}, "unknown flag --install-rules"},
		{[]string{"rules", "install", "--firewall", "nft"}, "--firewall"},
		{[]string{"rules", "show", "--firewall", ""}, "--firewall"},
		{[]string{"run", "--install-rules", "--firewall", "ipchains"}, "--firewall"},
		{[]string{"run", "--firewall", "nftables"}, "--firewall: only with --install-rules"},
		{[]string{"doctor", "--firewall", "pf"}, "--firewall"},
	} {
		var stdout, stderr bytes.Buffer
		code := detour(tc.args, &stdout, &stderr)
		msg := strings.TrimSpace(stderr.String())
		if code != exitUsage {
			t.Errorf("detour %q = %d, want 2 (stderr %q)", tc.args, code, msg)
			continue
		}
		if !strings.Contains(msg, tc.want) {
			t.Errorf("detour %q: stderr %q does not mention %q", tc.args, msg, tc.want)
		}
		if tc.args[len(tc.args)-1] != "rules" && strings.Contains(msg, "\n") {
			t.Errorf("detour %q: want one line, got %q", tc.args, msg)
		}
	}
}
