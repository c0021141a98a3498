package tunnel

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/sniff"
)

// BenchmarkAccessLine is one connection's access line, as detour writes it
// (JSON), to io.Discard: the per-connection cost of the log.
func BenchmarkAccessLine(b *testing.B) {
	client, _ := testkit.TCPPair(b)
	t := &Tunnel{Mode: "redirect", Log: slog.New(slog.NewJSONHandler(io.Discard, nil))}
	info := &connInfo{start: time.Now(), peer: addrPort(client.RemoteAddr()), dst: netip.MustParseAddrPort("198.18.2.2:80"),
		found: sniff.Result{Proto: sniff.HTTP, Host: "site.test"}, outcome: "found", sniffTook: time.Millisecond,
		route: Action{Kind: ActionDirect}}
	b.ReportAllocs()
	for b.Loop() {
		t.logConn(info, 100, 200, nil)
	}
}

// nopHandler takes every record and writes nothing.
type nopHandler struct{}

func (nopHandler) Enabled(context.Context, slog.Level) bool  { return true }
func (nopHandler) Handle(context.Context, slog.Record) error { return nil }
func (h nopHandler) WithAttrs([]slog.Attr) slog.Handler      { return h }
func (h nopHandler) WithGroup(string) slog.Handler           { return h }

// BenchmarkAccessLineRecord is BenchmarkAccessLine without the handler's
// work: what logConn costs before the line is written.
func BenchmarkAccessLineRecord(b *testing.B) {
	client, _ := testkit.TCPPair(b)
	t := &Tunnel{Mode: "redirect", Log: slog.New(nopHandler{})}
	info := &connInfo{start: time.Now(), peer: addrPort(client.RemoteAddr()), dst: netip.MustParseAddrPort("198.18.2.2:80"),
		found: sniff.Result{Proto: sniff.HTTP, Host: "site.test"}, outcome: "found", sniffTook: time.Millisecond,
		route: Action{Kind: ActionDirect}}
	b.ReportAllocs()
	for b.Loop() {
		t.logConn(info, 100, 200, nil)
	}
}
