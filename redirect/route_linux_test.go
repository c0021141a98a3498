//go:build linux

package redirect

import (
	"net"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// An ip rule whose fwmark/mask matches detour's mark and whose table holds
// a local default route is reported with its name and a fix; rules that
// miss the mark, lead to an ordinary table or are detour's own are not.
func TestMarkLoops(t *testing.T) {
	u32 := func(v uint32) *uint32 { return &v }
	v4 := netlink.FAMILY_V4
	local := func(table int) netlink.Route {
		return netlink.Route{Family: v4, Table: table, Type: unix.RTN_LOCAL, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}
	}
	rule := func(mark uint32, mask *uint32, table int) netlink.Rule {
		r := *netlink.NewRule()
		r.Family, r.Mark, r.Mask, r.Table, r.Priority = v4, mark, mask, table, 100
		return r
	}
	for _, tc := range []struct {
		name   string
		rules  []netlink.Rule
		routes []netlink.Route
		want   []string // substrings of the one problem; nil: none
	}{
		{"fwmark 0x1/0x1 to a local table", []netlink.Rule{rule(0x1, u32(0x1), 200)}, []netlink.Route{local(200)},
			[]string{"fwmark 0x1/0x1 lookup 200", "mark 0x2d", "local 0.0.0.0/0", "--mark 0x2c"}},
		{"inverted mask misses", []netlink.Rule{func() netlink.Rule { r := rule(0x1, u32(0x1), 200); r.Invert = true; return r }()}, []netlink.Route{local(200)}, nil},
		{"fwmark 0x1 (full mask) misses 0x2d", []netlink.Rule{rule(0x1, nil, 200)}, []netlink.Route{local(200)}, nil},
		{"fwmark 0x4/0x4 matches 0x2d", []netlink.Rule{rule(0x4, u32(0x4), 201)}, []netlink.Route{local(201)}, []string{"fwmark 0x4/0x4 lookup 201", "--mark 0x29"}},
		{"table without a local route", []netlink.Rule{rule(0x1, u32(0x1), 200)}, []netlink.Route{{Family: v4, Table: 200, Type: unix.RTN_UNICAST}}, nil},
		{"detour's own rule", []netlink.Rule{func() netlink.Rule { r := rule(0x2d, u32(0x2d), 100); r.Protocol = RouteProtocol; return r }()}, []netlink.Route{local(100)}, nil},
		{"no fwmark", []netlink.Rule{rule(0, nil, 254)}, []netlink.Route{local(254)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nl := &fakeNL{rules: tc.rules, routes: tc.routes}
			got, err := markLoops(nl, DefaultMark)
			if err != nil {
				t.Fatal(err)
			}
			if tc.want == nil {
				if len(got) != 0 {
					t.Fatalf("problems %v, want none", got)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("problems %v, want one", got)
			}
			for _, w := range tc.want {
				if !strings.Contains(got[0].Msg, w) {
					t.Errorf("problem %q does not mention %q", got[0].Msg, w)
				}
			}
		})
	}
}
