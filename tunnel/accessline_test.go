package tunnel

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/sniff"
)

// BenchmarkAccessLine is one connection's access line, as detour writes it
// (JSON), to io.Discard: the per-connection cost of the log.
func BenchmarkAccessLine(b *testing.B) {
	benchAccessLine(b, slog.NewJSONHandler(io.Discard, nil))
}

// benchAccessLine writes one connection's access line through h.
func benchAccessLine(b *testing.B, h slog.Handler) {
	client, _ := testkit.TCPPair(b)
	t := &Tunnel{Mode: "redirect", Log: slog.New(h)}
	info := &connInfo{start: time.Now(), peer: addrPort(client.RemoteAddr()), dst: netip.MustParseAddrPort("198.18.2.2:80"),
		found: sniff.Result{Proto: sniff.HTTP, Host: "site.test"}, outcome: "found", sniffTook: time.Millisecond,
		route: Action{Kind: ActionDirect}}
	b.ReportAllocs()
	for b.Loop() {
		t.logConn(info, 100, 200, nil)
	}
}

// nopHandler takes every record, also as its parts, and writes nothing.
type nopHandler struct{}

func (nopHandler) Enabled(context.Context, slog.Level) bool  { return true }
func (nopHandler) Handle(context.Context, slog.Record) error { return nil }
func (h nopHandler) WithAttrs([]slog.Attr) slog.Handler      { return h }
func (h nopHandler) WithGroup(string) slog.Handler           { return h }
func (nopHandler) HandleAttrs(context.Context, time.Time, slog.Level, string, []slog.Attr) error {
	return nil
}

// BenchmarkAccessLineRecord is BenchmarkAccessLine without the handler's
// work: what logConn costs before the line is written, handing it to a
// LineHandler as detour's is.
func BenchmarkAccessLineRecord(b *testing.B) {
	benchAccessLine(b, nopHandler{})
}

// partsHandler keeps the attributes of the lines it is given, as a
// Record or as parts.
type partsHandler struct {
	record, parts [][]slog.Attr
}

func (*partsHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *partsHandler) WithAttrs([]slog.Attr) slog.Handler     { return h }
func (h *partsHandler) WithGroup(string) slog.Handler          { return h }

func (h *partsHandler) Handle(_ context.Context, r slog.Record) error {
	var as []slog.Attr
	r.Attrs(func(a slog.Attr) bool {
		as = append(as, a)
		return true
	})
	h.record = append(h.record, as)
	return nil
}

type partsOnly struct{ *partsHandler }

func (h partsOnly) HandleAttrs(_ context.Context, _ time.Time, _ slog.Level, msg string, attrs []slog.Attr) error {
	h.parts = append(h.parts, slices.Clone(attrs))
	return nil
}

// A LineHandler is given the access line's attributes as a Record would
// hold them.
func TestAccessLineParts(t *testing.T) {
	infos := []*connInfo{
		{peer: netip.MustParseAddrPort("198.18.0.1:1"), found: sniff.Result{Proto: sniff.HTTP, Host: "site.test"}, outcome: "found", route: Action{Kind: ActionDirect}},
		{peer: netip.MustParseAddrPort("[fd00::1]:2"), dst: netip.MustParseAddrPort("[fd00::2]:443"), inbound: ProxyInbound, request: "connect", status: 200,
			sni: "other.test", found: sniff.Result{Proto: sniff.TLS, Host: "site.test", ECH: true}, route: Action{Kind: ActionProxy}, target: "site.test:443"},
		{inbound: ProxyInbound, noRoute: true, request: "http", status: 403},
	}
	rec := &partsHandler{}
	parts := &partsHandler{}
	for _, c := range infos {
		c.start = time.Now()
		(&Tunnel{Mode: "redirect", Log: slog.New(rec)}).logConn(c, 1, 2, errors.New("boom"))
		(&Tunnel{Mode: "redirect", Log: slog.New(partsOnly{parts})}).logConn(c, 1, 2, errors.New("boom"))
	}
	if len(rec.record) != len(infos) || len(parts.parts) != len(infos) || len(parts.record) != 0 {
		t.Fatalf("%d lines as records and %d as parts (%d records), want %d each", len(rec.record), len(parts.parts), len(parts.record), len(infos))
	}
	for i := range infos {
		a, b := rec.record[i], parts.parts[i]
		if len(a) != len(b) {
			t.Fatalf("line %d: %d attributes as a record, %d as parts", i, len(a), len(b))
		}
		for j := range a {
			if a[j].Key != b[j].Key || a[j].Key != "duration" && !a[j].Value.Equal(b[j].Value) {
				t.Errorf("line %d attribute %d: %v as a record, %v as parts", i, j, a[j], b[j])
			}
		}
	}
}
