package tunnel

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/detour-proxy/detour/sniff"
)

func TestParsePorts(t *testing.T) {
	got, err := ParsePorts("80, 443,8000-9000")
	if err != nil || len(got) != 3 || got[2] != (PortRange{8000, 9000}) || got[0] != (PortRange{80, 80}) {
		t.Fatalf("ParsePorts = %v, %v", got, err)
	}
	for _, bad := range []string{"", "0", "70000", "9000-8000", "http", "1-", "-5", "80,,443"} {
		if _, err := ParsePorts(bad); err == nil {
			t.Errorf("ParsePorts(%q) accepted", bad)
		}
	}
}

func TestRouterFirstMatchWins(t *testing.T) {
	proxies := &Group{Name: "proxies"}
	backup := &Group{Name: "backup"}
	r := &Router{
		Rules: []Rule{
			{Suffixes: []string{"example.com"}, Action: Action{Kind: ActionProxy, Group: proxies}},
			{Domains: []string{"exact.test"}, Action: Action{Kind: ActionProxy, Group: backup}},
			{Keywords: []string{"tracker"}, Action: Action{Kind: ActionReject}},
			{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.2.0/24"), netip.MustParsePrefix("fd00:2::/64")}, Ports: []PortRange{{22, 22}}, Action: Action{Kind: ActionDirect}},
			{Ports: []PortRange{{25, 25}, {6000, 7000}}, Action: Action{Kind: ActionReject}},
			{Protos: []sniff.Proto{sniff.HTTP}, Action: Action{Kind: ActionProxy, Group: backup}},
		},
		Default: Action{Kind: ActionProxy, Group: proxies},
	}
	for _, tc := range []struct {
		host  string
		proto sniff.Proto
		dst   string
		want  string
		rule  int
	}{
		{"example.com", sniff.TLS, "1.2.3.4:443", "proxies", 0},
		{"www.example.com", sniff.TLS, "1.2.3.4:443", "proxies", 0},
		{"notexample.com", sniff.TLS, "1.2.3.4:443", "proxies", -1}, // suffix is label-aligned
		{"exact.test", sniff.TLS, "1.2.3.4:443", "backup", 1},
		{"www.exact.test", sniff.TLS, "1.2.3.4:443", "proxies", -1},
		{"ads.tracker.net", sniff.TLS, "1.2.3.4:443", "reject", 2},
		{"", sniff.Unknown, "198.18.2.2:22", "direct", 3},
		{"", sniff.Unknown, "[fd00:2::2]:22", "direct", 3},
		{"", sniff.Unknown, "[::ffff:198.18.2.2]:22", "direct", 3},
		{"", sniff.Unknown, "198.18.2.2:23", "proxies", -1},
		{"", sniff.Unknown, "9.9.9.9:6500", "reject", 4},
		{"plain.test", sniff.HTTP, "9.9.9.9:80", "backup", 5},
		{"", sniff.TLS, "9.9.9.9:443", "proxies", -1}, // domain rules never match without a host
	} {
		a, i := r.Route(tc.host, tc.proto, netip.MustParseAddrPort(tc.dst))
		if a.String() != tc.want || i != tc.rule {
			t.Errorf("Route(%q, %v, %s) = %s (rule %d), want %s (rule %d)", tc.host, tc.proto, tc.dst, a, i, tc.want, tc.rule)
		}
	}
	var none *Router
	if a, i := none.Route("x", sniff.TLS, netip.MustParseAddrPort("1.1.1.1:1")); a.Kind != ActionDirect || i != -1 {
		t.Errorf("nil router = %v %d, want direct", a, i)
	}
}

func TestNormalizeDomain(t *testing.T) {
	for in, want := range map[string]string{"*.Example.COM.": "example.com", ".foo.test": "foo.test", " bar ": "bar"} {
		if got := NormalizeDomain(in); got != want {
			t.Errorf("NormalizeDomain(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseNameMode(t *testing.T) {
	for in, want := range map[string]NameMode{"": Override, "override": Override, "route-only": RouteOnly, "verify": Verify} {
		if got, err := ParseNameMode(in); err != nil || got != want {
			t.Errorf("ParseNameMode(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseNameMode("trust"); err == nil {
		t.Error("ParseNameMode accepted a bad mode")
	}
}

// BenchmarkRoute1000 matches against 1,000 rules of mixed kinds, with the
// connection matching only the default (the worst case: every rule tried).
func BenchmarkRoute1000(b *testing.B) {
	r := &Router{Default: Action{Kind: ActionDirect}}
	for i := range 1000 {
		var ru Rule
		switch i % 4 {
		case 0:
			ru.Suffixes = []string{fmt.Sprintf("site%d.example", i)}
		case 1:
			ru.Domains = []string{fmt.Sprintf("host%d.example", i)}
		case 2:
			ru.CIDRs = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)}
		case 3:
			ru.Ports = []PortRange{{uint16(10000 + i), uint16(10000 + i)}}
		}
		ru.Action = Action{Kind: ActionReject}
		r.Rules = append(r.Rules, ru)
	}
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	b.ReportAllocs()
	for b.Loop() {
		if a, _ := r.Route("www.nomatch.test", sniff.TLS, dst); a.Kind != ActionDirect {
			b.Fatal("matched")
		}
	}
}

// The name sent upstream: the sniffed name only when the route trusts it
// and it names the destination itself.
func TestProxyTarget(t *testing.T) {
	var tun Tunnel
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	for _, tc := range []struct {
		mode  NameMode
		found sniff.Result
		want  string
	}{
		{Override, sniff.Result{Proto: sniff.TLS, Host: "site.test"}, "site.test:443"},
		{RouteOnly, sniff.Result{Proto: sniff.TLS, Host: "site.test"}, "198.18.2.2:443"},
		{Override, sniff.Result{Proto: sniff.TLS, Host: "public.test", ECH: true}, "198.18.2.2:443"},
		{Override, sniff.Result{Proto: sniff.HTTP, Host: "next.test", ViaProxy: true}, "198.18.2.2:443"},
		{Override, sniff.Result{Proto: sniff.Unknown}, "198.18.2.2:443"},
	} {
		if got := tun.proxyTarget(t.Context(), tc.mode, dst, tc.found); got != tc.want {
			t.Errorf("proxyTarget(%v, %+v) = %s, want %s", tc.mode, tc.found, got, tc.want)
		}
	}
}
