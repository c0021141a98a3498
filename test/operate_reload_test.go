package test

// Reloading routes on SIGHUP, with broken configurations among them.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeFileAtomic replaces path with text at once, as an operator's editor
// or config management would.
func writeFileAtomic(t *testing.T, path, text string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// reloadConfig: connections to the bulk port go through group a (v1) or b
// (v2); everything else goes direct.
func reloadConfig(group string, a, b *socks5Server) string {
	return fmt.Sprintf(`groups:
  - name: a
    upstreams: [%q]
  - name: b
    upstreams: [%q]
rules:
  - port: "%d"
    action: %s
default: direct
`, a.url, b.url, bulkPort, group)
}

// TestOperateReload: SIGHUP with a changed rule moves new connections to the
// new route while a 100 MB download started before it goes on, byte-exact,
// on the old one; a broken configuration changes nothing.
func TestOperateReload(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	a, b := startSOCKS5(t, tp, socksPortA), startSOCKS5(t, tp, socksPortB)
	cfg := filepath.Join(t.TempDir(), "detour.yaml")
	writeFileAtomic(t, cfg, reloadConfig("a", a, b))
	d := startOp(t, tp, "--config", cfg)
	bulkAddr := net.JoinHostPort(families[0].server, strconv.Itoa(bulkPort))
	web := net.JoinHostPort(families[0].server, strconv.Itoa(httpPort))
	m0 := scrape(t, tp)

	// echoVia makes one echo connection to the bulk port and returns its
	// access line.
	echoVia := func(t *testing.T) map[string]any {
		t.Helper()
		c := opDial(t, tp, bulkAddr)
		key := connKey(c)
		c.Write([]byte("Ereload"))
		c.CloseWrite()
		if got, err := io.ReadAll(c); err != nil || string(got) != "reload" {
			t.Fatalf("echo: %q, %v", got, err)
		}
		c.Close()
		return d.waitLog(t, 5*time.Second, "conn", key)
	}
	wantRoute := func(t *testing.T, rec map[string]any, route string, up *socks5Server) {
		t.Helper()
		if rec["route"] != route || rec["upstream"] != up.url || rec["error"] != "" {
			t.Errorf("access line = %v; want route %s via %s, no error", rec, route, up.url)
		}
	}
	wantRoute(t, echoVia(t), "a", a)

	// The download starts on v1's route and stalls half-way (the client
	// stops reading) while the configuration changes.
	const n = 100 << 20
	dl := opDial(t, tp, bulkAddr)
	dkey := connKey(dl)
	var req [9]byte
	req[0] = 'D'
	binary.BigEndian.PutUint64(req[1:], n)
	dl.Write(req[:])
	h := sha256.New()
	if _, err := io.CopyN(h, dl, n/2); err != nil {
		t.Fatalf("first half of the download: %v", err)
	}
	if a.active.Load() != 1 {
		t.Fatalf("upstream a carries %d connections, want the download", a.active.Load())
	}

	writeFileAtomic(t, cfg, reloadConfig("b", a, b))
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog(t, 5*time.Second, "reloaded", nil)
	for range 3 {
		wantRoute(t, echoVia(t), "b", b)
	}
	// The rest of the traffic keeps its route.
	if _, _, key, err := httpGet(tp, web, "web.test"); err != nil {
		t.Errorf("web request after the reload: %v", err)
	} else if rec := d.waitLog(t, 5*time.Second, "conn", key); rec["route"] != "direct" {
		t.Errorf("web request after the reload: route %v, want direct", rec["route"])
	}

	// Broken configurations: refused, with a reason, and the routes stay.
	for i, broken := range []string{
		"rules: [\n",                  // not YAML
		reloadConfig("nowhere", a, b), // an action naming no group
		strings.Replace(reloadConfig("b", a, b), "socks5://", "gopher://", 1), // a bad upstream
	} {
		writeFileAtomic(t, cfg, broken)
		before := len(d.findPrefix("reload failed"))
		d.cmd.Process.Signal(syscall.SIGHUP)
		if waitCount(5*time.Second, before+1, func() int { return len(d.findPrefix("reload failed")) }) <= before {
			t.Fatalf("broken config %d: no \"reload failed\" line within 5s; log:\n%s", i, d.rawLog())
		}
		rec := d.findPrefix("reload failed")[before]
		if rec["msg"] != "reload failed" {
			// The documented message (README: msg="reload failed"), which
			// operators' alerts match exactly.
			t.Errorf("broken config %d: logged msg %q, want exactly \"reload failed\"", i, rec["msg"])
		}
		if rec["error"] == nil || rec["error"] == "" {
			t.Errorf("broken config %d: reload failed without a reason: %v", i, rec)
		}
		d.alive(t)
		wantRoute(t, echoVia(t), "b", b)
	}
	if n := len(d.find("reloaded", nil)); n != 1 {
		t.Errorf("%d \"reloaded\" lines, want 1 (the broken configurations must not reload)", n)
	}

	// The download started before the reload finishes byte-exact on its
	// route.
	dl.SetReadDeadline(time.Now().Add(60 * time.Second))
	got, err := io.Copy(h, dl)
	if err != nil || got != n-n/2 || hex.EncodeToString(h.Sum(nil)) != streamSum(n) {
		t.Fatalf("download across the reloads: %d+%d bytes (%v), checksum match %v", n/2, got, err, hex.EncodeToString(h.Sum(nil)) == streamSum(n))
	}
	dl.Close()
	rec := d.waitLog(t, 5*time.Second, "conn", dkey)
	wantRoute(t, rec, "a", a)
	if toInt(rec["down"]) != n {
		t.Errorf("access line of the download: down %v, want %d", rec["down"], n)
	}
	if a.served.Load() != 2 || b.served.Load() != 6 {
		t.Errorf("upstream a carried %d connections (want 2: before the reload), b %d (want 6: after)", a.served.Load(), b.served.Load())
	}

	t.Logf("upstream a carried %d connections (before the reload), b %d (after); the download's %d MB arrived whole across 1 reload and 3 refused ones",
		a.served.Load(), b.served.Load(), n>>20)
	m1 := scrape(t, tp)
	wantDelta(t, m0, m1, 1, "detour_reloads_total", "result", "ok")
	wantDelta(t, m0, m1, 3, "detour_reloads_total", "result", "error")
	wantDelta(t, m0, m1, 2, "detour_connections_closed_total", "route", "a")
	wantDelta(t, m0, m1, 6, "detour_connections_closed_total", "route", "b")
	if m1.sum("detour_upstream_up", "group", "b", "upstream", b.url) != 1 {
		t.Errorf("no live upstream of group b in the metrics after the reload:\n%s", m1.series("detour_upstream_up"))
	}
}
