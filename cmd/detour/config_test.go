package main

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

const fullConfig = `
listen: "[::]:7777"
mode: tproxy
mark: 0x2d
idle_timeout: 2m
log_format: json
sniff:
  timeout: 200ms
  skip_ports: [22, 25, 3306]
  max_bytes: 32768
  silent_ttl: 5m
  silent_entries: 100
groups:
  - name: proxies
    strategy: weighted
    upstreams:
      - socks5://user:pass@198.18.3.2:1080?weight=3
      - url: http://198.18.3.2:3128
        weight: 2
    probe: {interval: 10s, timeout: 2s}
  - name: sticky
    strategy: consistent-hash
    hash_key: client
    upstreams: [socks5://198.18.3.2:1081]
rules:
  - domain_suffix: [example.com, "*.example.org"]
    action: proxies
  - domain: exact.test
    action: sticky
    send_name: verify
  - cidr: [10.0.0.0/8, "fd00::/8"]
    action: direct
  - port: ["25", "6000-7000"]
    action: reject
  - protocol: http
    action: proxies
    send_name: route-only
default: direct
`

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "detour.yaml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigFull(t *testing.T) {
	p := writeConfig(t, fullConfig)
	cfg, err := parseRunFlags([]string{"--config", p, "--idle-timeout", "30s", "--sniff-silent-ttl", "1m"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.listen != "[::]:7777" || cfg.mode.String() != "tproxy" || cfg.logFormat != "json" {
		t.Errorf("file settings not applied: %+v", cfg)
	}
	if cfg.idleTimeout != 30*time.Second {
		t.Errorf("idle timeout = %v; the flag must override the file's 2m", cfg.idleTimeout)
	}
	if cfg.sniff.Timeout != 200*time.Millisecond || len(cfg.sniff.SkipPorts) != 3 || cfg.sniff.MaxBytes != 32768 ||
		cfg.sniff.SilentEntries != 100 || cfg.sniff.SilentTTL != time.Minute {
		t.Errorf("sniff settings = %+v; want the file's, and --sniff-silent-ttl over its 5m", cfg.sniff)
	}
	rt, err := buildRouting(cfg.upstreams, cfg.strategy, cfg.file, &net.Dialer{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if len(rt.groups) != 2 || len(rt.router.Rules) != 5 || rt.router.Default.Kind != tunnel.ActionDirect {
		t.Fatalf("routing = %d groups, %d rules, default %v", len(rt.groups), len(rt.router.Rules), rt.router.Default)
	}
	if g := rt.groups[0]; g.Upstreams[0].Weight != 3 || g.Upstreams[1].Weight != 2 || g.Probe.Interval != 10*time.Second {
		t.Errorf("group proxies = %+v", g)
	}
	if rt.groups[1].Key != upstream.HashClient {
		t.Errorf("hash_key not applied")
	}
	if r := rt.router.Rules[0]; r.Suffixes[1] != "example.org" || r.Action.Group != rt.groups[0] {
		t.Errorf("rule 0 = %+v", r)
	}
	if r := rt.router.Rules[1]; r.Action.Name != tunnel.Verify {
		t.Errorf("rule 1 send_name = %v", r.Action.Name)
	}
}

func TestConfigErrorsNameFieldAndLine(t *testing.T) {
	for _, tc := range []struct {
		text string
		want []string
	}{
		{"listen: nope\n", []string{"listen (line 1)", "host:port"}},
		{"mode: nat\n", []string{"mode (line 1)", "nat"}},
		{"idle_timeout: soon\n", []string{"line 1", "duration"}},
		{"bogus: 1\n", []string{"line 1", `unknown field "bogus"`}},
		{"rules:\n  - cidrs: [10.0.0.0/8]\n    action: direct\n", []string{"line 2", `unknown field "cidrs"`}},
		{"rules:\n  - cidr: 10.0.0/33\n    action: direct\n", []string{"rules[0] (line 2)", "10.0.0/33"}},
		{"rules:\n  - port: 99999\n    action: direct\n", []string{"rules[0] (line 2)", "port"}},
		{"rules:\n  - domain: a.test\n    action: nowhere\n", []string{"rules[0] (line 2)", `"nowhere"`}},
		{"rules:\n  - domain: a.test\n", []string{"rules[0] (line 2)", "action is missing"}},
		{"rules:\n  - action: direct\n", []string{"rules[0] (line 2)", "no condition"}},
		{"groups:\n  - name: g\n    upstreams: [ftp://x:1]\n", []string{"groups[0].upstreams[0] (line 3)", "ftp"}},
		{"groups:\n  - name: g\n    strategy: random\n    upstreams: [socks5://a:1]\n", []string{"groups[0] (line 2)", "random"}},
		{"groups:\n  - name: g\n", []string{"groups[0] (line 2)", "no upstreams"}},
		{"groups:\n  - name: direct\n    upstreams: [socks5://a:1]\n", []string{"reserved"}},
		{"default: elsewhere\n", []string{"default", "elsewhere"}},
		{"sniff:\n  timeout: 0s\n", []string{"sniff (line 2)", "timeout"}},
		{"rules: [\n", []string{"line"}},
	} {
		p := writeConfig(t, tc.text)
		var stdout, stderr bytes.Buffer
		status := detour([]string{"run", "--check", "--config", p}, &stdout, &stderr)
		msg := stderr.String()
		if status != exitUsage || strings.Count(strings.TrimSpace(msg), "\n") != 0 {
			t.Errorf("config %q: status %d, stderr %q; want 2 and one line", tc.text, status, msg)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(msg, w) {
				t.Errorf("config %q: message %q lacks %q", tc.text, msg, w)
			}
		}
	}
}

func TestCheckAcceptsGoodConfig(t *testing.T) {
	p := writeConfig(t, fullConfig)
	var stdout, stderr bytes.Buffer
	if status := detour([]string{"run", "--check", "--config", p}, &stdout, &stderr); status != exitOK {
		t.Fatalf("--check = %d: %s", status, stderr.String())
	}
	if !strings.Contains(stdout.String(), "2 upstream groups, 5 routing rules") {
		t.Errorf("--check said %q", stdout.String())
	}
}

func TestUpstreamFlags(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		status int
		want   string
	}{
		{[]string{"--upstream", "socks5://198.18.3.2:1080", "--upstream", "http://u:p@198.18.3.2:3128?weight=2", "--strategy", "weighted"}, exitOK, "1 upstream groups"},
		{[]string{"--upstream", "gopher://x:70"}, exitUsage, "--upstream"},
		{[]string{"--upstream", "socks5://x"}, exitUsage, "--upstream"},
		{[]string{"--upstream", "socks5://x:1?weight=0"}, exitUsage, "--upstream"},
		{[]string{"--upstream", "socks5://x:1", "--strategy", "fastest"}, exitUsage, "--strategy"},
		{[]string{"--strategy", "weighted"}, exitUsage, "--strategy"},
		{[]string{"--sniff-timeout", "0s"}, exitUsage, "--sniff-timeout"},
		{[]string{"--sniff-skip-ports", "22,x"}, exitUsage, "--sniff-skip-ports"},
		{[]string{"--sniff-max-bytes", "0"}, exitUsage, "--sniff-max-bytes"},
		{[]string{"--sniff-max-bytes", "2000000"}, exitUsage, "--sniff-max-bytes"},
		{[]string{"--sniff-silent-ttl", "0s"}, exitUsage, "--sniff-silent-ttl"},
		{[]string{"--sniff-silent-entries", "0"}, exitUsage, "--sniff-silent-entries"},
		{[]string{"--sniff-max-bytes", "4096", "--sniff-silent-ttl", "30s", "--sniff-silent-entries", "10"}, exitOK, "configuration OK"},
		{[]string{"--config", "/nonexistent/detour.yaml"}, exitUsage, "--config"},
	} {
		var stdout, stderr bytes.Buffer
		status := detour(append([]string{"run", "--check"}, tc.args...), &stdout, &stderr)
		if status != tc.status || !strings.Contains(stdout.String()+stderr.String(), tc.want) {
			t.Errorf("run --check %q = %d, %q %q; want %d mentioning %q", tc.args, status, stdout.String(), stderr.String(), tc.status, tc.want)
		}
	}
}
