package main

import (
	"testing"
	"time"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/relay"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// BenchmarkMetricsPerConn is what the metrics cost one transparent
// connection: accepted, sniffed, dialled, closed.
func BenchmarkMetricsPerConn(b *testing.B) {
	m := newMetrics(func() int { return 0 }, func() relay.Stats { return relay.Stats{} }, func() []*upstream.Group { return nil })
	obs := m.inbound("transparent")
	found := sniff.Result{Proto: sniff.HTTP, Host: "site.test"}
	b.ReportAllocs()
	for b.Loop() {
		obs.Accepted()
		obs.Sniffed(found, "found", 100*time.Microsecond)
		obs.Dialed("direct", time.Millisecond, nil)
		obs.Closed("direct", 100, 200)
	}
}
