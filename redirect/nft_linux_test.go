//go:build linux

package redirect

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/detour-proxy/detour/ports"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

func nftLines(t *testing.T, o RuleOptions) []string {
	t.Helper()
	s, err := o.NFTScript()
	if err != nil {
		t.Fatal(err)
	}
	head := "table inet detour\ndelete table inet detour\n"
	if !strings.HasPrefix(s, head) {
		t.Fatalf("the script does not replace an earlier table first:\n%s", s)
	}
	return strings.Split(strings.TrimSpace(strings.TrimPrefix(s, head)), "\n")
}

func TestNFTRedirect(t *testing.T) {
	o := RuleOptions{Mode: Redirect, Port: 7777, Output: true, Interfaces: []string{"lan0", "wg+"},
		Sources: []netip.Prefix{netip.MustParsePrefix("198.18.1.0/24")}, Ports: []ports.Range{{Lo: 80, Hi: 80}, {Lo: 8000, Hi: 9000}},
		Bypass: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}
	got := nftLines(t, o)
	want := []string{
		"table inet detour {",
		"\tset bypass4 {",
		"\t\ttype ipv4_addr",
		"\t\tflags constant,interval",
		"\t\telements = { 10.0.0.0/8 }",
		"\t}",
		"",
		"\tchain nat_prerouting {",
		"\t\ttype nat hook prerouting priority dstnat; policy accept;",
		`		meta mark 0x0000002d return comment "detour:own-mark"`,
		`		fib daddr type local return comment "detour:local"`,
		`		meta nfproto ipv4 ip daddr @bypass4 return comment "detour:bypass"`,
		// IPv6 has no source listed: not captured, so not bypassed either.
		`		meta nfproto ipv4 iifname "lan0" ip saddr 198.18.1.0/24 meta l4proto tcp th dport 80 redirect to :7777 comment "detour:capture"`,
		`		meta nfproto ipv4 iifname "lan0" ip saddr 198.18.1.0/24 meta l4proto tcp th dport 8000-9000 redirect to :7777 comment "detour:capture"`,
		`		meta nfproto ipv4 iifname "wg*" ip saddr 198.18.1.0/24 meta l4proto tcp th dport 80 redirect to :7777 comment "detour:capture"`,
		`		meta nfproto ipv4 iifname "wg*" ip saddr 198.18.1.0/24 meta l4proto tcp th dport 8000-9000 redirect to :7777 comment "detour:capture"`,
		"\t}",
		"",
		"\tchain nat_output {",
		"\t\ttype nat hook output priority -100; policy accept;",
		`		meta mark 0x0000002d return comment "detour:own-mark"`,
		`		fib daddr type local return comment "detour:local"`,
		`		meta nfproto ipv4 ip daddr @bypass4 return comment "detour:bypass"`,
		`		meta nfproto ipv4 meta l4proto tcp th dport 80 redirect to :7777 comment "detour:output"`,
		`		meta nfproto ipv4 meta l4proto tcp th dport 8000-9000 redirect to :7777 comment "detour:output"`,
		"\t}",
		"}",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// A listener on one address is reached by DNAT, of its family only.
	o = RuleOptions{Mode: Redirect, Port: 7000, ListenIP: netip.MustParseAddr("fd00:1::1"), Bypass: []netip.Prefix{}}
	got = nftLines(t, o)
	if w := `		meta nfproto ipv6 meta l4proto tcp dnat ip6 to [fd00:1::1]:7000 comment "detour:capture"`; !slices.Contains(got, w) || strings.Contains(strings.Join(got, "\n"), "ipv4") {
		t.Fatalf("want %q and no IPv4 rule:\n%s", w, strings.Join(got, "\n"))
	}
}

func TestNFTTProxy(t *testing.T) {
	o := RuleOptions{Mode: TProxy, Port: 7777, Output: true, TProxyMark: 0x400, Mark: 0x1,
		Bypass: []netip.Prefix{netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("::1/128")}}
	got := strings.Join(nftLines(t, o), "\n")
	for _, w := range []string{
		"\tchain mangle_prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n" +
			`		meta l4proto tcp tcp flags & (fin | syn | rst | ack) != syn socket transparent 1 meta mark set meta mark | 0x00000400 return comment "detour:established"` + "\n" +
			`		ct direction reply return comment "detour:reply"` + "\n" +
			`		meta mark 0x00000001 return comment "detour:own-mark"` + "\n" +
			`		fib daddr type local return comment "detour:local"` + "\n" +
			`		meta nfproto ipv4 ip daddr @bypass4 return comment "detour:bypass"` + "\n" +
			`		meta nfproto ipv6 ip6 daddr @bypass6 return comment "detour:bypass"` + "\n" +
			`		meta nfproto ipv4 iifname "lo" meta mark & 0x00000400 == 0x00000400 meta l4proto tcp tproxy ip to :7777 meta mark set meta mark | 0x00000400 accept comment "detour:output"`,
		`		meta nfproto ipv6 meta l4proto tcp tcp flags & (fin | syn | rst | ack) syn tproxy ip6 to :7777 meta mark set meta mark | 0x00000400 accept comment "detour:capture"`,
		"\tset bypass4 {\n\t\ttype ipv4_addr\n\t\tflags constant,interval\n\t\telements = { 192.168.0.0/16 }\n\t}\n",
		"\tset bypass6 {\n\t\ttype ipv6_addr\n\t\tflags constant,interval\n\t\telements = { ::1 }\n\t}\n",
		"\tchain mangle_output {\n\t\ttype route hook output priority mangle; policy accept;\n" +
			`		ct direction reply return comment "detour:reply"`,
		`		meta nfproto ipv6 meta l4proto tcp meta mark set meta mark | 0x00000400 comment "detour:output"`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("lacks\n%s\nin\n%s", w, got)
		}
	}
	if strings.Contains(got, "udp") {
		t.Errorf("UDP captured without UDP set:\n%s", got)
	}

	o = RuleOptions{Mode: TProxy, Port: 7777, UDP: true, ListenIP: netip.MustParseAddr("198.18.1.1"), Bypass: []netip.Prefix{},
		Ports: []ports.Range{{Lo: 53, Hi: 53}}}
	got = strings.Join(nftLines(t, o), "\n")
	for _, w := range []string{
		`		meta nfproto ipv4 meta l4proto tcp tcp flags & (fin | syn | rst | ack) syn th dport 53 tproxy ip to 198.18.1.1:7777 meta mark set meta mark | 0x00000100 accept comment "detour:capture"`,
		`		ct direction reply return comment "detour:reply"`,
		`		meta nfproto ipv4 meta l4proto udp th dport 53 tproxy ip to 198.18.1.1:7777 meta mark set meta mark | 0x00000100 accept comment "detour:capture"`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("lacks\n%s\nin\n%s", w, got)
		}
	}
	if strings.Contains(got, "ipv6") {
		t.Errorf("IPv6 captured for an IPv4 listener:\n%s", got)
	}

	// TCP alone: SYNs are captured, the rest comes in as established, and
	// nothing turns connection tracking on.
	got = strings.Join(nftLines(t, RuleOptions{Mode: TProxy, Port: 7777, Bypass: []netip.Prefix{}}), "\n")
	if strings.Contains(got, "ct ") {
		t.Errorf("TCP-only TPROXY rules use conntrack:\n%s", got)
	}
	if !strings.Contains(got, `meta l4proto tcp tcp flags & (fin | syn | rst | ack) syn tproxy ip to :7777`) {
		t.Errorf("TCP capture does not take SYNs only:\n%s", got)
	}
}

// The bypass list becomes one interval set per family: sorted, overlaps
// and neighbours joined, and the elements the kernel gets (interval ends
// after each range, none past the last address) read back the same.
func TestBypassSets(t *testing.T) {
	var list []netip.Prefix
	for _, s := range []string{"10.1.0.0/16", "10.0.0.0/8", "11.0.0.0/8", "192.168.1.1/32", "192.168.1.2/32",
		"255.255.255.255/32", "240.0.0.0/4", "::1/128", "::/128", "fd00::/8", "fc00::/8"} {
		list = append(list, netip.MustParsePrefix(s))
	}
	nt, err := RuleOptions{Mode: TProxy, Port: 1, Bypass: list}.nftRules()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"bypass4": "10.0.0.0/7, 192.168.1.1-192.168.1.2, 240.0.0.0/4",
		"bypass6": "::/127, fc00::/7",
	}
	if len(nt.Sets) != 2 {
		t.Fatalf("sets %+v", nt.Sets)
	}
	for _, st := range nt.Sets {
		if got := rangesText(st.Ranges); got != want[st.Name] {
			t.Errorf("set %s = %s, want %s", st.Name, got, want[st.Name])
		}
		els := st.elements()
		if els[0].IntervalEnd != (st.Name == "bypass4") {
			t.Errorf("set %s: first element %+v; want a leading end only where the first range starts above zero", st.Name, els[0])
		}
		if last := els[len(els)-1]; st.Name == "bypass4" && last.IntervalEnd {
			t.Errorf("set %s ends with an interval end past 255.255.255.255: %+v", st.Name, last)
		}
		slices.Reverse(els) // the kernel's order is its own
		if got := rangesText(rangesOf(els)); got != want[st.Name] {
			t.Errorf("set %s read back as %s, want %s", st.Name, got, want[st.Name])
		}
	}
	// No bypass: no set, no bypass rule.
	nt, _ = RuleOptions{Mode: Redirect, Port: 1, Bypass: []netip.Prefix{}}.nftRules()
	if len(nt.Sets) != 0 || strings.Contains(nftScript(nt), "bypass") {
		t.Errorf("--bypass none:\n%s", nftScript(nt))
	}
}

func TestUDPOnlyTProxy(t *testing.T) {
	var oe *OptionError
	_, err := RuleOptions{Mode: Redirect, Port: 1, UDP: true}.nftRules()
	if !errors.As(err, &oe) || oe.Field != "UDP" {
		t.Fatalf("UDP in redirect mode: %v", err)
	}
}

// Every expression detour makes survives the trip through netlink: encoded
// by the library, decoded by dumpRules' decoder, printed the same.
func TestNFTDecodeRoundTrip(t *testing.T) {
	for _, o := range []RuleOptions{
		{Mode: TProxy, Port: 7777, Output: true, UDP: true, Interfaces: []string{"eth+"}, Ports: []ports.Range{{Lo: 80, Hi: 80}, {Lo: 1000, Hi: 2000}},
			Sources: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("fd00::/8")}},
		{Mode: TProxy, Port: 7777, ListenIP: netip.MustParseAddr("fd00::1")},
		{Mode: Redirect, Port: 7777, Output: true},
		{Mode: Redirect, Port: 7777, ListenIP: netip.MustParseAddr("198.18.0.1")},
	} {
		chains, err := o.nftRules()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range chains.Chains {
			for _, r := range c.Rules {
				var back []expr.Any
				for _, e := range r.Exprs {
					b, err := expr.Marshal(unix.NFPROTO_INET, e)
					if err != nil {
						t.Fatal(err)
					}
					d, err := decodeExpr(b)
					if err != nil {
						t.Fatalf("decoding %T: %v", e, err)
					}
					back = append(back, d)
				}
				if got, want := renderExprs(back), renderExprs(r.Exprs); got != want {
					t.Errorf("decoded %q, sent %q", got, want)
				}
			}
		}
	}
}

func TestChooseFirewall(t *testing.T) {
	notFound := errors.New(`exec: "iptables": executable file not found in $PATH`)
	iptNFT := []NFTTableName{{"ip", "nat"}, {"ip6", "mangle"}, {"ip", "filter"}, {"bridge", "filter"}}
	for _, tc := range []struct {
		name    string
		lookErr error
		tables  []NFTTableName
		tabErr  error
		want    Firewall
		why     string
	}{
		{"no iptables", notFound, nil, nil, FirewallNftables, "no iptables command"},
		{"only iptables-nft tables", nil, iptNFT, nil, FirewallIptables, "every nftables table is one iptables-nft makes"},
		{"empty ruleset", nil, nil, nil, FirewallIptables, "every nftables table is one iptables-nft makes"},
		{"nftables.service", nil, append(iptNFT, NFTTableName{"inet", "filter"}), nil, FirewallNftables, "table inet filter"},
		{"fw4", nil, []NFTTableName{{"inet", "fw4"}}, nil, FirewallNftables, "table inet fw4"},
		{"ip table of another name", nil, []NFTTableName{{"ip", "docker"}}, nil, FirewallNftables, "table ip docker"},
		{"detour's own table", nil, []NFTTableName{{"inet", "detour"}}, nil, FirewallNftables, "an earlier run used nftables"},
		{"ruleset unreadable", nil, nil, errors.New("operation not permitted"), FirewallIptables, "cannot be listed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := chooseFirewall("/usr/sbin/iptables", tc.lookErr, tc.tables, tc.tabErr)
			if got != tc.want || !strings.Contains(why, tc.why) {
				t.Fatalf("chooseFirewall = %s (%s), want %s (%s)", got, why, tc.want, tc.why)
			}
		})
	}
	for _, s := range []string{"auto", "iptables", "nftables"} {
		if f, err := ParseFirewall(s); err != nil || string(f) != s {
			t.Errorf("ParseFirewall(%q) = %q, %v", s, f, err)
		}
	}
	if _, err := ParseFirewall("nft"); err == nil {
		t.Error("ParseFirewall(nft) accepted")
	}
}

func TestIptablesUDP(t *testing.T) {
	sets, err := RuleOptions{Mode: TProxy, Port: 7777, UDP: true, NoIPv6: true, Bypass: []netip.Prefix{}, Ports: []ports.Range{{Lo: 53, Hi: 53}}}.RuleSets()
	if err != nil {
		t.Fatal(err)
	}
	c := sets[0].Chains[0]
	var udp []string
	for _, r := range c.Rules {
		if slices.Contains(r, "udp") {
			udp = append(udp, shellJoin(r))
		}
	}
	want := `-p udp -m multiport --dports 53 -m comment --comment detour:capture -j TPROXY --on-port 7777 --tproxy-mark 0x100/0x100`
	if len(udp) != 1 || udp[0] != want {
		t.Fatalf("UDP rules %q, want [%q]", udp, want)
	}
	if j := shellJoin(c.Jump()); j != "-m comment --comment detour:jump -j DETOUR_TPROXY" {
		t.Fatalf("jump with UDP = %q, want one for every protocol", j)
	}
	if _, err := (RuleOptions{Mode: Redirect, Port: 1, UDP: true}).RuleSets(); err == nil {
		t.Fatal("UDP in REDIRECT mode accepted")
	}
}
