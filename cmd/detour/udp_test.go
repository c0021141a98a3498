package main

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// --udp is on by default in tproxy mode, off in redirect mode, where asking
// for it is refused; the file's udp is taken unless the flag is given.
func TestUDPFlag(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		config string
		want   bool
		err    string
	}{
		{args: []string{"--mode", "tproxy"}, want: true},
		{args: []string{"--mode", "tproxy", "--udp=false"}, want: false},
		{args: []string{"--mode", "redirect"}, want: false},
		{args: []string{"--mode", "redirect", "--udp"}, err: "--udp: only with --mode tproxy"},
		{args: []string{"--mode", "tproxy"}, config: "udp: false\n", want: false},
		{args: []string{"--mode", "tproxy", "--udp"}, config: "udp: false\n", want: true},
		{args: []string{"--mode", "redirect"}, config: "udp: true\n", err: "--udp: only with --mode tproxy"},
		{args: []string{"--max-udp-sessions", "-1"}, err: "--max-udp-sessions -1"},
		{args: []string{"--udp-dns-timeout", "0s"}, err: "--udp-dns-timeout 0s"},
		{args: []string{"--upstream-udp", "maybe"}, err: "--upstream-udp"},
		{args: []string{"--mode", "tproxy"}, config: "udp_quic_timeout: 0s\n", err: "udp_quic_timeout (line 1): must be positive"},
		{args: []string{"--mode", "tproxy"}, config: "max_udp_sessions: 5\nudp_idle_timeout: 3s\n", want: true},
	} {
		args := tc.args
		if tc.config != "" {
			args = append(args, "--config", writeConfig(t, tc.config))
		}
		cfg, err := parseRunFlags(args, io.Discard)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v %q: err = %v, want one naming %q", tc.args, tc.config, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%v %q: %v", tc.args, tc.config, err)
			continue
		}
		if cfg.capture.udp.on != tc.want {
			t.Errorf("%v %q: udp = %v, want %v", tc.args, tc.config, cfg.capture.udp.on, tc.want)
		}
		if tc.config == "max_udp_sessions: 5\nudp_idle_timeout: 3s\n" && (cfg.udp.opts.MaxSessions != 5 || cfg.udp.opts.IdleTimeout != 3*time.Second) {
			t.Errorf("file's UDP settings not taken: %+v", cfg.udp.opts)
		}
	}
}

// Groups name their UDP fallback, rules their networks; a group of HTTP
// CONNECT upstreams only is warned about.
func TestUDPRouting(t *testing.T) {
	fc, err := parseConfig([]byte(`
groups:
  - name: web
    udp: direct
    upstreams: [http://198.18.3.2:3128]
  - name: mixed
    upstreams: [http://198.18.3.2:3128, socks5://198.18.3.2:1080]
rules:
  - network: udp
    port: ["53"]
    action: web
  - network: [tcp, udp]
    protocol: [quic]
    action: mixed
  - network: tcp
    action: reject
`))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	rt, err := buildRouting(nil, "", fc, &net.Dialer{}, log)
	if err != nil {
		t.Fatal(err)
	}
	if fb := rt.groups[0].UDPFallback; fb != upstream.UDPDirect {
		t.Errorf("group web udp = %v, want direct", fb)
	}
	r := rt.router.Rules
	if r[0].Networks != tunnel.NetUDP || r[1].Networks != tunnel.NetTCP|tunnel.NetUDP || r[2].Networks != tunnel.NetTCP {
		t.Errorf("networks = %v %v %v", r[0].Networks, r[1].Networks, r[2].Networks)
	}
	if r[1].Protos[0] != sniff.QUIC {
		t.Errorf("protocol quic = %v", r[1].Protos)
	}
	warns := strings.Join(udpWarnings(rt), "\n")
	if !strings.Contains(warns, `group "web" has only HTTP CONNECT upstreams`) || !strings.Contains(warns, "sent direct") ||
		!strings.Contains(warns, `group "mixed": its UDP sessions use only its 1 SOCKS5`) {
		t.Errorf("warnings:\n%s", warns)
	}
	for _, bad := range []struct{ text, want string }{
		{"groups: [{name: g, udp: maybe, upstreams: [direct]}]\n", "udp:"},
		{"rules: [{network: icmp, action: direct}]\n", "network:"},
	} {
		fc, err := parseConfig([]byte(bad.text))
		if err == nil {
			_, err = buildRouting(nil, "", fc, &net.Dialer{}, log)
		}
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: err = %v, want one naming %q", bad.text, err, bad.want)
		}
	}
}
