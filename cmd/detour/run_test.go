package main

import (
	"bytes"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/detour-proxy/detour/redirect"
)

func TestParseRunFlagsDefaults(t *testing.T) {
	cfg, err := parseRunFlags(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.listen != ":7777" || cfg.mode != redirect.Redirect || cfg.mark != 0x2d ||
		cfg.idleTimeout != 5*time.Minute || cfg.logFormat != "text" {
		t.Fatalf("defaults = %+v", cfg)
	}
}

func TestParseRunFlags(t *testing.T) {
	cfg, err := parseRunFlags([]string{"--listen", "[::]:8080", "--mode", "tproxy", "--mark", "0x100",
		"--idle-timeout", "30s", "--grace", "0s", "--log-format", "json"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.listen != "[::]:8080" || cfg.mode != redirect.TProxy || cfg.mark != 0x100 ||
		cfg.idleTimeout != 30*time.Second || cfg.grace != 0 || cfg.logFormat != "json" {
		t.Fatalf("parsed = %+v", cfg)
	}
}

func TestDetourExitStatus(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		status int
		want   string // in the one line of stderr
	}{
		{[]string{}, exitUsage, "usage"},
		{[]string{"version"}, exitOK, ""},
		{[]string{"run", "--mode", "bridge"}, exitUsage, "--mode"},
		{[]string{"run", "--listen", "7777"}, exitUsage, "--listen"},
		{[]string{"run", "--listen", ":0"}, exitUsage, "--listen"},
		{[]string{"run", "--mark", "0x1g"}, exitUsage, "--mark"},
		{[]string{"run", "--dial-timeout", "0s"}, exitUsage, "--dial-timeout"},
		{[]string{"run", "--metrics", "9090"}, exitUsage, "--metrics"},
		{[]string{"run", "--pprof", "localhost:http"}, exitUsage, "--pprof"},
		{[]string{"run", "--bogus"}, exitUsage, "unknown flag --bogus"},
		{[]string{"run", "extra"}, exitUsage, "unexpected argument"},
		{[]string{"launch"}, exitUsage, "unknown command"},
	} {
		var stdout, stderr bytes.Buffer
		if got := detour(tc.args, &stdout, &stderr); got != tc.status {
			t.Errorf("detour %q = %d, want %d (stderr %q)", tc.args, got, tc.status, stderr.String())
			continue
		}
		if tc.want != "" && !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("detour %q: stderr %q does not mention %q", tc.args, stderr.String(), tc.want)
		}
		if tc.status == exitUsage && len(tc.args) > 0 && strings.Count(strings.TrimSpace(stderr.String()), "\n") != 0 {
			t.Errorf("detour %q: want one line, got %q", tc.args, stderr.String())
		}
	}
}

// --pprof serves the runtime's profiles, and nothing else.
func TestPprofServes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	srv := servePprof(ln, slog.New(slog.DiscardHandler))
	defer srv.Close()
	for path, want := range map[string]int{
		"/debug/pprof/":                  http.StatusOK,
		"/debug/pprof/goroutine?debug=1": http.StatusOK,
		"/metrics":                       http.StatusNotFound,
	} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s = %d, want %d", path, resp.StatusCode, want)
		}
	}
}
