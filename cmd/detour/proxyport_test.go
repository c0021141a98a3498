package main

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/detour-proxy/detour/tunnel"
)

func TestProxyFlagsAndFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "detour.yaml")
	os.WriteFile(path, []byte(`proxy:
  listen: ["[::]:3128", "127.0.0.1:1080"]
  allow: [10.0.0.0/8, "fd00::1"]
  users: ["alice:pa:ss"]
rules:
  - inbound: proxy
    domain: a.test
    action: reject
`), 0o600)
	cfg, err := parseRunFlags([]string{"--config", path}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.proxy.listen, " ") != "[::]:3128 127.0.0.1:1080" || len(cfg.proxy.allow) != 2 ||
		cfg.proxy.allow[1] != netip.MustParsePrefix("fd00::1/128") || cfg.proxy.users["alice"] != "pa:ss" {
		t.Fatalf("from the file: %+v", cfg.proxy)
	}
	rt, err := buildRouting(nil, "", cfg.file, nil, nil)
	if err != nil || len(rt.router.Rules) != 1 || len(rt.router.Rules[0].Inbounds) != 1 || rt.router.Rules[0].Inbounds[0] != tunnel.ProxyInbound {
		t.Fatalf("inbound rule: %+v %v", rt.router, err)
	}
	// Flags override the file, field by field.
	cfg, err = parseRunFlags([]string{"--config", path, "--proxy-listen", ":8080", "--proxy-allow", "192.168.0.0/16"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.proxy.listen, " ") != ":8080" || len(cfg.proxy.allow) != 1 || cfg.proxy.users["alice"] != "pa:ss" {
		t.Fatalf("with flags: %+v", cfg.proxy)
	}
	// No proxy: no port, the default allow list.
	cfg, _ = parseRunFlags(nil, &bytes.Buffer{})
	if cfg.proxy.listen != nil || cfg.proxy.allow != nil || cfg.proxy.users != nil {
		t.Fatalf("defaults: %+v", cfg.proxy)
	}
}

func TestProxyFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		file string
		want string
	}{
		{args: []string{"--proxy-listen", "8080"}, want: "--proxy-listen"},
		{args: []string{"--proxy-allow", "10.0.0.0/33"}, want: "--proxy-allow"},
		{args: []string{"--proxy-users", "nopassword"}, want: "--proxy-users"},
		{args: []string{"--proxy-users", "a:1", "--proxy-users", "a:2"}, want: `user "a" given twice`},
		{file: "proxy:\n  allow: [nonsense]\n", want: "proxy (line 2): allow"},
		{file: "proxy:\n  listen: [\"1.2.3.4\"]\n", want: "proxy (line 2): listen"},
		{file: "proxy:\n  user: [a:b]\n", want: `unknown field "user" in proxy`},
		{file: "rules:\n  - inbound: [both]\n    action: direct\n", want: "inbound"},
	} {
		args := tc.args
		if tc.file != "" {
			path := filepath.Join(t.TempDir(), "detour.yaml")
			os.WriteFile(path, []byte(tc.file), 0o600)
			args = []string{"run", "--check", "--config", path}
		} else {
			args = append([]string{"run", "--check"}, args...)
		}
		var stdout, stderr bytes.Buffer
		if got := detour(args, &stdout, &stderr); got != exitUsage || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%q: status %d, stderr %q; want %d and %q", args, got, stderr.String(), exitUsage, tc.want)
		}
		if strings.Contains(stderr.String(), "nopassword") {
			t.Errorf("%q: the message repeats what may be a password: %q", args, stderr.String())
		}
	}
}

func TestCheckNamesProxyPort(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if got := detour([]string{"run", "--check", "--proxy-listen", ":3128", "--proxy-allow", "10.0.0.0/8", "--proxy-users", "a:b"}, &stdout, &stderr); got != exitOK {
		t.Fatalf("status %d: %s", got, stderr.String())
	}
	if want := "proxy port on :3128 (clients: 10.0.0.0/8, 1 users)"; !strings.Contains(stdout.String(), want) {
		t.Fatalf("--check said %q, want %q in it", stdout.String(), want)
	}
}
