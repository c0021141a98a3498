package tunnel

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

func TestRouterFirstMatchWins(t *testing.T) {
	proxies := &upstream.Group{Name: "proxies"}
	backup := &upstream.Group{Name: "backup"}
	r := &Router{
		Rules: []Rule{
			{Suffixes: []string{"example.com"}, Action: Action{Kind: ActionProxy, Group: proxies}},
			{Domains: []string{"exact.test"}, Action: Action{Kind: ActionProxy, Group: backup}},
			{Keywords: []string{"tracker"}, Action: Action{Kind: ActionReject}},
			{CIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.2.0/24"), netip.MustParsePrefix("fd00:2::/64")}, Ports: []ports.Range{{Lo: 22, Hi: 22}}, Action: Action{Kind: ActionDirect}},
			{Ports: []ports.Range{{Lo: 25, Hi: 25}, {Lo: 6000, Hi: 7000}}, Action: Action{Kind: ActionReject}},
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

// RouteByAddr is final only when nothing the client could send changes the
// route, and then it agrees with Route for any host and protocol.
func TestRouteByAddr(t *testing.T) {
	proxies := &upstream.Group{Name: "proxies"}
	direct := Action{Kind: ActionDirect}
	lan := netip.MustParsePrefix("198.18.2.0/24")
	for _, tc := range []struct {
		name  string
		rules []Rule
		def   Action
		dst   string
		want  string // "" when not final
	}{
		{"no rules", nil, direct, "1.2.3.4:443", "direct"},
		{"default proxy", nil, Action{Kind: ActionProxy, Group: proxies}, "1.2.3.4:443", "proxies"},
		{"domain rule first", []Rule{
			{Suffixes: []string{"example.com"}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, direct, "1.2.3.4:443", ""},
		{"keyword rule first", []Rule{
			{Keywords: []string{"ads"}, Action: Action{Kind: ActionReject}},
		}, direct, "1.2.3.4:443", ""},
		{"exact domain rule first", []Rule{
			{Domains: []string{"a.test"}, Action: Action{Kind: ActionReject}},
		}, direct, "1.2.3.4:443", ""},
		{"protocol rule first", []Rule{
			{Protos: []sniff.Proto{sniff.HTTP}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, direct, "1.2.3.4:80", ""},
		{"protocol rule matching nothing sniffed", []Rule{
			{Protos: []sniff.Proto{sniff.Unknown}, Action: Action{Kind: ActionReject}},
		}, direct, "1.2.3.4:80", ""},
		{"address rule before domain rule", []Rule{
			{CIDRs: []netip.Prefix{lan}, Action: direct},
			{Suffixes: []string{"example.com"}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, Action{Kind: ActionProxy, Group: proxies}, "198.18.2.2:443", "direct"},
		{"address rule not matching, then domain rule", []Rule{
			{CIDRs: []netip.Prefix{lan}, Action: direct},
			{Suffixes: []string{"example.com"}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, direct, "9.9.9.9:443", ""},
		{"port rule decides", []Rule{
			{Ports: []ports.Range{{Lo: 6000, Hi: 7000}}, Action: Action{Kind: ActionReject}},
			{Protos: []sniff.Proto{sniff.TLS}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, direct, "9.9.9.9:6500", "reject"},
		{"domain rule restricted to other ports is passed over", []Rule{
			{Suffixes: []string{"example.com"}, Ports: []ports.Range{{Lo: 443, Hi: 443}}, Action: Action{Kind: ActionProxy, Group: proxies}},
			{Keywords: []string{"x"}, CIDRs: []netip.Prefix{lan}, Action: Action{Kind: ActionReject}},
		}, direct, "9.9.9.9:80", "direct"},
		{"domain rule restricted to this port", []Rule{
			{Suffixes: []string{"example.com"}, Ports: []ports.Range{{Lo: 443, Hi: 443}}, Action: Action{Kind: ActionProxy, Group: proxies}},
		}, direct, "9.9.9.9:443", ""},
		{"CIDR and port both needed", []Rule{
			{CIDRs: []netip.Prefix{lan}, Ports: []ports.Range{{Lo: 22, Hi: 22}}, Action: Action{Kind: ActionReject}},
		}, direct, "198.18.2.2:23", "direct"},
		{"v4-mapped destination", []Rule{
			{CIDRs: []netip.Prefix{lan}, Action: Action{Kind: ActionReject}},
		}, direct, "[::ffff:198.18.2.2]:443", "reject"},
		{"empty rule matches everything", []Rule{
			{Action: Action{Kind: ActionReject}},
			{Suffixes: []string{"example.com"}, Action: direct},
		}, direct, "1.2.3.4:443", "reject"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &Router{Rules: tc.rules, Default: tc.def}
			dst := netip.MustParseAddrPort(tc.dst)
			a, final := r.RouteByAddr(dst)
			got := ""
			if final {
				got = a.String()
			}
			if got != tc.want {
				t.Fatalf("RouteByAddr(%s) = %q (final %v), want %q", dst, a, final, tc.want)
			}
			if !final {
				return
			}
			for _, host := range []string{"", "example.com", "www.example.com", "a.test", "ads.x"} {
				for _, proto := range []sniff.Proto{sniff.Unknown, sniff.TLS, sniff.HTTP} {
					if b, _ := r.Route(host, proto, dst); b != a {
						t.Errorf("final RouteByAddr(%s) = %s, but Route(%q, %v) = %s", dst, a, host, proto, b)
					}
				}
			}
		})
	}
	var none *Router
	if a, final := none.RouteByAddr(netip.MustParseAddrPort("1.1.1.1:1")); a.Kind != ActionDirect || !final {
		t.Errorf("nil router = %v %v, want direct, final", a, final)
	}
}

func TestRouteByAddrAllocs(t *testing.T) {
	r := &Router{Rules: []Rule{
		{CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, Action: Action{Kind: ActionReject}},
		{Suffixes: []string{"example.com"}, Ports: []ports.Range{{Lo: 80, Hi: 80}}, Action: Action{Kind: ActionReject}},
	}}
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	if n := testing.AllocsPerRun(100, func() { r.RouteByAddr(dst) }); n != 0 {
		t.Errorf("RouteByAddr allocates %v times", n)
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
	r := benchRouter(1000, 4)
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	b.ReportAllocs()
	for b.Loop() {
		if a, _ := r.Route("www.nomatch.test", sniff.TLS, dst); a.Kind != ActionDirect {
			b.Fatal("matched")
		}
	}
}

// BenchmarkRouteByAddr1000 decides by address against 1,000 address rules
// none of which matches (the worst case: every rule tried, then the default).
func BenchmarkRouteByAddr1000(b *testing.B) {
	r := benchRouter(1000, 2)
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	b.ReportAllocs()
	for b.Loop() {
		if a, final := r.RouteByAddr(dst); !final || a.Kind != ActionDirect {
			b.Fatal("matched")
		}
	}
}

// benchRouter has n reject rules, none matching 198.18.2.2:443 or
// www.nomatch.test, cycling through the first kinds of: CIDR, port,
// suffix, domain (2: address rules only).
func benchRouter(n, kinds int) *Router {
	r := &Router{Default: Action{Kind: ActionDirect}}
	for i := range n {
		var ru Rule
		switch i % kinds {
		case 0:
			ru.CIDRs = []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)}
		case 1:
			ru.Ports = []ports.Range{{Lo: uint16(10000 + i), Hi: uint16(10000 + i)}}
		case 2:
			ru.Suffixes = []string{fmt.Sprintf("site%d.example", i)}
		case 3:
			ru.Domains = []string{fmt.Sprintf("host%d.example", i)}
		}
		ru.Action = Action{Kind: ActionReject}
		r.Rules = append(r.Rules, ru)
	}
	return r
}

// The name sent upstream: the sniffed name only when the route trusts it
// and it names the destination itself (an ECH outer name does).
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
		{Override, sniff.Result{Proto: sniff.TLS, Host: "public.test", ECH: true}, "public.test:443"},
		{RouteOnly, sniff.Result{Proto: sniff.TLS, Host: "public.test", ECH: true}, "198.18.2.2:443"},
		{Override, sniff.Result{Proto: sniff.HTTP, Host: "next.test", ViaProxy: true}, "198.18.2.2:443"},
		{Override, sniff.Result{Proto: sniff.Unknown}, "198.18.2.2:443"},
	} {
		if got := tun.proxyTarget(t.Context(), tc.mode, netip.MustParseAddr("198.18.1.2"), dst, tc.found); got != tc.want {
			t.Errorf("proxyTarget(%v, %+v) = %s, want %s", tc.mode, tc.found, got, tc.want)
		}
	}
}
