package redirect

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/detour-proxy/detour/ports"
)

func prefixes(s ...string) []netip.Prefix {
	out := []netip.Prefix{}
	for _, p := range s {
		out = append(out, netip.MustParsePrefix(p))
	}
	return out
}

func mustSets(t *testing.T, o RuleOptions) []RuleSet {
	t.Helper()
	sets, err := o.RuleSets()
	if err != nil {
		t.Fatalf("RuleSets(%+v): %v", o, err)
	}
	return sets
}

func commands(sets []RuleSet) string {
	var out []string
	for _, rs := range sets {
		out = append(out, rs.Commands()...)
	}
	return strings.Join(out, "\n")
}

// The whole of two small sets, command by command: what an operator would
// type by hand.
func TestCommandsRedirect(t *testing.T) {
	got := commands(mustSets(t, RuleOptions{Port: 7777, Bypass: prefixes("198.18.3.0/24", "fd00:3::/64")}))
	want := `iptables -t nat -N DETOUR
iptables -t nat -A DETOUR -m mark --mark 0x2d -m comment --comment detour:own-mark -j RETURN
iptables -t nat -A DETOUR -m addrtype --dst-type LOCAL -m comment --comment detour:local -j RETURN
iptables -t nat -A DETOUR -d 198.18.3.0/24 -m comment --comment detour:bypass -j RETURN
iptables -t nat -A DETOUR -p tcp -m comment --comment detour:capture -j REDIRECT --to-ports 7777
iptables -t nat -I PREROUTING 1 -p tcp -m comment --comment detour:jump -j DETOUR
ip6tables -t nat -N DETOUR
ip6tables -t nat -A DETOUR -m mark --mark 0x2d -m comment --comment detour:own-mark -j RETURN
ip6tables -t nat -A DETOUR -m addrtype --dst-type LOCAL -m comment --comment detour:local -j RETURN
ip6tables -t nat -A DETOUR -d fd00:3::/64 -m comment --comment detour:bypass -j RETURN
ip6tables -t nat -A DETOUR -p tcp -m comment --comment detour:capture -j REDIRECT --to-ports 7777
ip6tables -t nat -I PREROUTING 1 -p tcp -m comment --comment detour:jump -j DETOUR`
	if got != want {
		t.Errorf("commands:\n%s\nwant:\n%s", got, want)
	}
}

func TestCommandsTProxy(t *testing.T) {
	got := commands(mustSets(t, RuleOptions{Mode: TProxy, Port: 7777, Bypass: []netip.Prefix{}, NoIPv6: true}))
	want := `iptables -t mangle -N DETOUR_TPROXY
iptables -t mangle -A DETOUR_TPROXY -p tcp ! --syn -m socket --transparent -m comment --comment detour:established -j MARK --set-xmark 0x100/0x100
iptables -t mangle -A DETOUR_TPROXY -p tcp ! --syn -m socket --transparent -m comment --comment detour:established -j RETURN
iptables -t mangle -A DETOUR_TPROXY -m mark --mark 0x2d -m comment --comment detour:own-mark -j RETURN
iptables -t mangle -A DETOUR_TPROXY -m addrtype --dst-type LOCAL -m comment --comment detour:local -j RETURN
iptables -t mangle -A DETOUR_TPROXY -p tcp --syn -m comment --comment detour:capture -j TPROXY --on-port 7777 --tproxy-mark 0x100/0x100
ip rule add fwmark 0x100/0x100 lookup 100 proto 45
ip route add local 0.0.0.0/0 dev lo table 100 proto 45
iptables -t mangle -I PREROUTING 1 -p tcp -m comment --comment detour:jump -j DETOUR_TPROXY`
	if got != want {
		t.Errorf("commands:\n%s\nwant:\n%s", got, want)
	}
	// TCP alone needs no connection tracking: the capture takes SYNs (no
	// reply is one), the rest of a connection comes in as established.
	if strings.Contains(got, "conntrack") {
		t.Errorf("TCP-only TPROXY rules use conntrack:\n%s", got)
	}

	// UDP has no SYN: replies of forwarded UDP are told apart by conntrack,
	// and its capture takes every datagram.
	got = commands(mustSets(t, RuleOptions{Mode: TProxy, Port: 7777, UDP: true, Bypass: []netip.Prefix{}, NoIPv6: true}))
	for _, want := range []string{
		"iptables -t mangle -A DETOUR_TPROXY -m conntrack --ctdir REPLY -m comment --comment detour:reply -j RETURN",
		"iptables -t mangle -A DETOUR_TPROXY -p tcp --syn -m comment --comment detour:capture -j TPROXY",
		"iptables -t mangle -A DETOUR_TPROXY -p udp -m comment --comment detour:capture -j TPROXY",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("UDP TPROXY commands lack %q:\n%s", want, got)
		}
	}
}

func TestDefaultsBothFamiliesDefaultBypass(t *testing.T) {
	sets := mustSets(t, RuleOptions{Port: 7777})
	if len(sets) != 2 || sets[0].Family != IPv4 || sets[1].Family != IPv6 {
		t.Fatalf("sets = %+v, want IPv4 and IPv6", sets)
	}
	v4 := commands(sets[:1])
	for _, want := range []string{"-d 10.0.0.0/8 ", "-d 192.168.0.0/16 ", "-d 198.18.0.0/15 ", "-d 127.0.0.0/8 ", "-d 224.0.0.0/4 "} {
		if !strings.Contains(v4, want) {
			t.Errorf("IPv4 rules lack default bypass %q", want)
		}
	}
	v6 := commands(sets[1:])
	for _, want := range []string{"-d fc00::/7 ", "-d fe80::/10 ", "-d ::1/128 ", "-d ff00::/8 "} {
		if !strings.Contains(v6, want) {
			t.Errorf("IPv6 rules lack default bypass %q", want)
		}
	}
	if strings.Contains(v4, "fc00::") || strings.Contains(v6, "10.0.0.0") {
		t.Error("a family's chain holds the other family's ranges")
	}
	for _, rs := range sets {
		c := rs.Chains[0]
		if rs.Route != nil || len(rs.Chains) != 1 || c.Table != "nat" || c.Hook != "PREROUTING" {
			t.Errorf("%v: %+v", rs.Family, rs)
		}
		// Exemptions first, capture last.
		kinds := []string{}
		for _, r := range c.Rules {
			kinds = append(kinds, r.Comment())
		}
		if kinds[0] != commentOwnMark || kinds[1] != commentLocal || kinds[len(kinds)-1] != commentCapture {
			t.Errorf("%v rule order %v", rs.Family, kinds)
		}
	}
}

func TestEveryRuleCarriesAComment(t *testing.T) {
	for _, o := range []RuleOptions{
		{Port: 1, Output: true, Interfaces: []string{"eth0"}, Ports: []ports.Range{{Lo: 80, Hi: 80}}},
		{Mode: TProxy, Port: 1, Output: true, Sources: prefixes("10.0.0.0/8", "fd00::/8")},
	} {
		for _, rs := range mustSets(t, o) {
			for _, c := range rs.Chains {
				for _, r := range append([]Rule{c.Jump()}, c.Rules...) {
					if !strings.HasPrefix(r.Comment(), CommentPrefix) {
						t.Errorf("rule %q in %s has no ownership comment", r, c.Name)
					}
				}
			}
		}
	}
}

func TestInterfacesSourcesPortsCrossProduct(t *testing.T) {
	sets := mustSets(t, RuleOptions{
		Port:       7777,
		Interfaces: []string{"lan0", "wg+"},
		Sources:    prefixes("192.168.1.0/24", "10.0.0.0/8"),
		Ports:      []ports.Range{{Lo: 80, Hi: 80}, {Lo: 443, Hi: 443}, {Lo: 8000, Hi: 9000}},
		Bypass:     []netip.Prefix{},
	})
	// Only IPv4 sources were listed: IPv6 is not captured at all.
	if len(sets) != 1 || sets[0].Family != IPv4 {
		t.Fatalf("families = %v, want IPv4 only", sets)
	}
	var capture []string
	for _, r := range sets[0].Chains[0].Rules {
		if r.Comment() == commentCapture {
			capture = append(capture, strings.Join(r, " "))
		}
	}
	want := []string{
		"-i lan0 -s 192.168.1.0/24 -p tcp -m multiport --dports 80,443,8000:9000 -m comment --comment detour:capture -j REDIRECT --to-ports 7777",
		"-i lan0 -s 10.0.0.0/8 -p tcp -m multiport --dports 80,443,8000:9000 -m comment --comment detour:capture -j REDIRECT --to-ports 7777",
		"-i wg+ -s 192.168.1.0/24 -p tcp -m multiport --dports 80,443,8000:9000 -m comment --comment detour:capture -j REDIRECT --to-ports 7777",
		"-i wg+ -s 10.0.0.0/8 -p tcp -m multiport --dports 80,443,8000:9000 -m comment --comment detour:capture -j REDIRECT --to-ports 7777",
	}
	if !slices.Equal(capture, want) {
		t.Errorf("capture rules:\n%s\nwant:\n%s", strings.Join(capture, "\n"), strings.Join(want, "\n"))
	}
}

func TestManyPortsSplitIntoMultiportRules(t *testing.T) {
	var rs []ports.Range
	for p := uint16(1); p <= 10; p++ {
		rs = append(rs, ports.Range{Lo: p * 100, Hi: p*100 + 5}) // ten ranges: twenty slots
	}
	o := RuleOptions{Port: 7777, Ports: rs, NoIPv6: true}
	var lists []string
	for _, m := range o.withDefaults().portMatches() {
		lists = append(lists, m[3])
		if n := strings.Count(m[3], ",") + 1 + strings.Count(m[3], ":"); n > 15 {
			t.Errorf("multiport list %q uses %d slots, more than 15", m[3], n)
		}
	}
	if len(lists) != 2 || !strings.HasPrefix(lists[1], "800:805") {
		t.Errorf("lists = %q, want two, the second from 800:805", lists)
	}
}

func TestListenAddressChoosesFamiliesAndTarget(t *testing.T) {
	for _, tc := range []struct {
		name   string
		o      RuleOptions
		fams   []Family
		target string
	}{
		{"any", RuleOptions{Port: 1}, []Family{IPv4, IPv6}, "-j REDIRECT --to-ports 1"},
		{"::", RuleOptions{Port: 1, ListenIP: netip.IPv6Unspecified()}, []Family{IPv4, IPv6}, "-j REDIRECT --to-ports 1"},
		{"0.0.0.0", RuleOptions{Port: 1, ListenIP: netip.IPv4Unspecified()}, []Family{IPv4}, "-j REDIRECT --to-ports 1"},
		{"no ipv6", RuleOptions{Port: 1, NoIPv6: true}, []Family{IPv4}, "-j REDIRECT --to-ports 1"},
		{"v4 address", RuleOptions{Port: 1, ListenIP: netip.MustParseAddr("10.0.0.1")}, []Family{IPv4}, "-j DNAT --to-destination 10.0.0.1:1"},
		{"v6 address", RuleOptions{Port: 1, ListenIP: netip.MustParseAddr("fd00::1")}, []Family{IPv6}, "-j DNAT --to-destination [fd00::1]:1"},
		{"tproxy v4 address", RuleOptions{Mode: TProxy, Port: 1, ListenIP: netip.MustParseAddr("10.0.0.1")}, []Family{IPv4},
			"-j TPROXY --on-port 1 --on-ip 10.0.0.1 --tproxy-mark 0x100/0x100"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sets := mustSets(t, tc.o)
			var fams []Family
			for _, rs := range sets {
				fams = append(fams, rs.Family)
				rules := rs.Chains[0].Rules
				if got := strings.Join(rules[len(rules)-1], " "); !strings.HasSuffix(got, tc.target) {
					t.Errorf("%v capture rule %q, want it to end in %q", rs.Family, got, tc.target)
				}
			}
			if !slices.Equal(fams, tc.fams) {
				t.Errorf("families %v, want %v", fams, tc.fams)
			}
		})
	}
}

func TestOutputRedirect(t *testing.T) {
	sets := mustSets(t, RuleOptions{Port: 7777, Output: true, Interfaces: []string{"lan0"}, Sources: prefixes("10.0.0.0/8"), Bypass: []netip.Prefix{}})
	if len(sets[0].Chains) != 2 {
		t.Fatalf("chains = %+v, want DETOUR and DETOUR_OUTPUT", sets[0].Chains)
	}
	out := sets[0].Chains[1]
	if out.Table != "nat" || out.Name != ChainNATOutput || out.Hook != "OUTPUT" {
		t.Fatalf("output chain = %+v", out)
	}
	// The gateway's own connections: no -i (there is none in OUTPUT) and no
	// -s; the mark exemption keeps detour's own dials out.
	got := commands(sets)
	want := `iptables -t nat -A DETOUR_OUTPUT -m mark --mark 0x2d -m comment --comment detour:own-mark -j RETURN
iptables -t nat -A DETOUR_OUTPUT -m addrtype --dst-type LOCAL -m comment --comment detour:local -j RETURN
iptables -t nat -A DETOUR_OUTPUT -p tcp -m comment --comment detour:output -j REDIRECT --to-ports 7777`
	if !strings.Contains(got, want) {
		t.Errorf("commands:\n%s\nwant them to hold:\n%s", got, want)
	}
	if !strings.Contains(got, "iptables -t nat -I OUTPUT 1 -p tcp -m comment --comment detour:jump -j DETOUR_OUTPUT") {
		t.Errorf("no jump from nat OUTPUT:\n%s", got)
	}
}

func TestOutputTProxy(t *testing.T) {
	sets := mustSets(t, RuleOptions{Mode: TProxy, Port: 7777, Output: true, Interfaces: []string{"lan0"}, Bypass: []netip.Prefix{}, NoIPv6: true})
	got := commands(sets)
	for _, want := range []string{
		// Replies of accepted connections go to their clients, not to lo.
		"iptables -t mangle -A DETOUR_TPROXY_OUT -m conntrack --ctdir REPLY -m comment --comment detour:reply -j RETURN",
		"iptables -t mangle -A DETOUR_TPROXY_OUT -m mark --mark 0x2d -m comment --comment detour:own-mark -j RETURN",
		"iptables -t mangle -A DETOUR_TPROXY_OUT -p tcp -m comment --comment detour:output -j MARK --set-xmark 0x100/0x100",
		// Rerouted to lo, they come back in on lo whatever --interface says.
		"iptables -t mangle -A DETOUR_TPROXY -i lo -p tcp -m mark --mark 0x100/0x100 -m comment --comment detour:output -j TPROXY --on-port 7777 --tproxy-mark 0x100/0x100",
		"iptables -t mangle -A DETOUR_TPROXY -i lan0 -p tcp --syn -m comment --comment detour:capture -j TPROXY",
		"iptables -t mangle -I OUTPUT 1 -p tcp -m comment --comment detour:jump -j DETOUR_TPROXY_OUT",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("commands lack %q:\n%s", want, got)
		}
	}
}

func TestTProxyRouteAndMarks(t *testing.T) {
	sets := mustSets(t, RuleOptions{Mode: TProxy, Port: 7777, Mark: 0x2, TProxyMark: 0x4000, Table: 1234})
	for _, rs := range sets {
		if rs.Route == nil || *rs.Route != (PolicyRoute{Family: rs.Family, Mark: 0x4000, Table: 1234}) {
			t.Errorf("%v route = %+v", rs.Family, rs.Route)
		}
		got := commands([]RuleSet{rs})
		if !strings.Contains(got, "--tproxy-mark 0x4000/0x4000") || !strings.Contains(got, "--mark 0x2 ") {
			t.Errorf("%v marks not used:\n%s", rs.Family, got)
		}
	}
	if got := commands(sets[1:]); !strings.Contains(got, "ip -6 route add local ::/0 dev lo table 1234 proto 45") {
		t.Errorf("IPv6 route:\n%s", got)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		o     RuleOptions
		field string
	}{
		{RuleOptions{}, "Port"},
		{RuleOptions{Mode: 7, Port: 1}, "Mode"},
		{RuleOptions{Mode: TProxy, Port: 1, Mark: 0x100}, "TProxyMark"},                // default TPROXY mark 0x100
		{RuleOptions{Mode: TProxy, Port: 1, Mark: 0x3, TProxyMark: 0x2}, "TProxyMark"}, // shares bit 0x2
		{RuleOptions{Mode: TProxy, Port: 1, Table: 254}, "Table"},
		{RuleOptions{Mode: TProxy, Port: 1, Table: -1}, "Table"},
		{RuleOptions{Port: 1, Interfaces: []string{"a/b"}}, "Interfaces"},
		{RuleOptions{Port: 1, Interfaces: []string{"abcdefghijklmnop"}}, "Interfaces"},
		{RuleOptions{Port: 1, Ports: []ports.Range{{Lo: 9, Hi: 8}}}, "Ports"},
		{RuleOptions{Port: 1, NoIPv6: true, ListenIP: netip.MustParseAddr("fd00::1")}, "NoIPv6"},
		{RuleOptions{Port: 1, NoIPv6: true, Sources: prefixes("fd00::/8")}, "Sources"},
		{RuleOptions{Port: 1, ListenIP: netip.MustParseAddr("127.0.0.1")}, "Port"},
	} {
		err := tc.o.Validate()
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Field != tc.field {
			t.Errorf("Validate(%+v) = %v, want an error about %s", tc.o, err, tc.field)
		}
	}
	// The mark in REDIRECT mode may be anything: there is no TPROXY mark.
	if err := (RuleOptions{Port: 1, Mark: 0x100}).Validate(); err != nil {
		t.Errorf("REDIRECT with mark 0x100: %v", err)
	}
}

func TestParsePrefix(t *testing.T) {
	for in, want := range map[string]string{
		"10.1.2.3/8":     "10.0.0.0/8",
		"10.1.2.3":       "10.1.2.3/32",
		"fd00::1":        "fd00::1/128",
		"fd00:1::/32":    "fd00:1::/32",
		"0.0.0.0/0":      "0.0.0.0/0",
		"::ffff:1.2.3.4": "1.2.3.4/32",
	} {
		p, err := ParsePrefix(in)
		if err != nil || p.String() != want {
			t.Errorf("ParsePrefix(%q) = %v, %v; want %s", in, p, err, want)
		}
	}
	for _, bad := range []string{"", "10.0.0.0/33", "example.com", "::ffff:1.2.3.0/120", "fe80::1%eth0"} {
		if _, err := ParsePrefix(bad); err == nil {
			t.Errorf("ParsePrefix(%q) accepted", bad)
		}
	}
}

func TestOwnedRule(t *testing.T) {
	for _, tc := range []struct {
		line string
		want []string
	}{
		{`-A PREROUTING -p tcp -m comment --comment "detour:jump" -j DETOUR`,
			[]string{"-p", "tcp", "-m", "comment", "--comment", "detour:jump", "-j", "DETOUR"}},
		{`-A OUTPUT -m comment --comment "detour:a \"b\" c" -j X`,
			[]string{"-m", "comment", "--comment", `detour:a "b" c`, "-j", "X"}},
		{`-A PREROUTING -m comment --comment "operator: not detour:jump" -j ACCEPT`, nil},
		{`-A OUTPUT -m mark --mark 0x2d -m comment --comment detour-marked`, nil},
		{`-A PREROUTING -j DETOUR_DEMO`, nil},
		{`-N DETOUR`, nil},
	} {
		r, ok := ownedRule(tc.line)
		if ok != (tc.want != nil) || !slices.Equal(r, tc.want) {
			t.Errorf("ownedRule(%q) = %q, %v; want %q", tc.line, r, ok, tc.want)
		}
	}
}

func TestSysctlProblems(t *testing.T) {
	sysctls := func(kv ...string) func(string) (string, bool) {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
	}
	ifaces := []string{"lo", "lan0", "wan0", "vlan.10"}
	msgs := func(ps []Problem) string {
		var s []string
		for _, p := range ps {
			if p.Fatal {
				t.Errorf("sysctl problem is fatal: %s", p)
			}
			s = append(s, p.Msg)
		}
		return strings.Join(s, "\n")
	}

	got := msgs(sysctlProblems(RuleOptions{Port: 1}, sysctls(
		"net/ipv4/ip_forward", "0", "net/ipv6/conf/all/forwarding", "0"), ifaces))
	if !strings.Contains(got, "net.ipv4.ip_forward is 0") || !strings.Contains(got, "net.ipv6.conf.all.forwarding is 0") {
		t.Errorf("forwarding off not reported:\n%s", got)
	}
	if got := msgs(sysctlProblems(RuleOptions{Port: 1, NoIPv6: true}, sysctls(
		"net/ipv4/ip_forward", "1", "net/ipv6/conf/all/forwarding", "0"), ifaces)); got != "" {
		t.Errorf("IPv6 forwarding reported with IPv6 off:\n%s", got)
	}

	// rp_filter: the larger of all and the interface; only TPROXY; only
	// the interfaces captured; never lo.
	rp := sysctls("net/ipv4/ip_forward", "1", "net/ipv6/conf/all/forwarding", "1",
		"net/ipv4/conf/all/rp_filter", "0", "net/ipv4/conf/lo/rp_filter", "1",
		"net/ipv4/conf/lan0/rp_filter", "1", "net/ipv4/conf/wan0/rp_filter", "2", "net/ipv4/conf/vlan.10/rp_filter", "1")
	got = msgs(sysctlProblems(RuleOptions{Mode: TProxy, Port: 1}, rp, ifaces))
	if !strings.Contains(got, "strict (1) on lan0") || !strings.Contains(got, "strict (1) on vlan.10") ||
		strings.Contains(got, "on wan0") || strings.Contains(got, "on lo") {
		t.Errorf("rp_filter problems:\n%s", got)
	}
	if got := msgs(sysctlProblems(RuleOptions{Mode: TProxy, Port: 1, Interfaces: []string{"wan+"}}, rp, ifaces)); got != "" {
		t.Errorf("rp_filter of an interface not captured reported:\n%s", got)
	}
	if got := msgs(sysctlProblems(RuleOptions{Port: 1}, rp, ifaces)); got != "" {
		t.Errorf("rp_filter reported in REDIRECT mode:\n%s", got)
	}
	all1 := sysctls("net/ipv4/conf/all/rp_filter", "1", "net/ipv4/conf/wan0/rp_filter", "0")
	if got := msgs(sysctlProblems(RuleOptions{Mode: TProxy, Port: 1, NoIPv6: true}, all1, ifaces)); !strings.Contains(got, "on wan0") {
		t.Errorf("all.rp_filter=1 makes wan0 strict; got:\n%s", got)
	}
}

func TestProbesCoverEveryExtension(t *testing.T) {
	for _, o := range []RuleOptions{
		{Port: 1, Ports: []ports.Range{{Lo: 80, Hi: 80}}, Output: true},
		{Port: 1, ListenIP: netip.MustParseAddr("10.0.0.1")},
		{Mode: TProxy, Port: 1, Ports: []ports.Range{{Lo: 80, Hi: 80}}, Output: true},
	} {
		for _, rs := range mustSets(t, o) {
			ps := probes(o, rs.Family)
			for _, c := range rs.Chains {
				probed := map[string]bool{}
				for _, p := range ps[c.Table] {
					for i, a := range p.rule {
						if a == "-m" || a == "-j" {
							probed[p.rule[i+1]] = true
						}
					}
				}
				for _, r := range c.Rules {
					for i, a := range r {
						if (a == "-m" || a == "-j") && r[i+1] != "RETURN" && !probed[r[i+1]] {
							t.Errorf("%v %s: %q is used but not probed", rs.Family, c.Name, r[i+1])
						}
					}
				}
			}
		}
	}
}
