//go:build linux

package redirect

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TPROXY's policy routing, through a netlink.Handle. Every rule and route
// detour adds carries proto RouteProtocol, by which Remove finds them again.

// routing adds, finds and removes detour's policy routing; both rules
// backends use it.
type routing struct {
	nl routingAPI
}

// routingAPI is the part of *netlink.Handle the installer uses.
type routingAPI interface {
	RuleAdd(*netlink.Rule) error
	RuleDel(*netlink.Rule) error
	RuleListFiltered(family int, filter *netlink.Rule, mask uint64) ([]netlink.Rule, error)
	RouteAdd(*netlink.Route) error
	RouteDel(*netlink.Route) error
	RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error)
	LinkByName(name string) (netlink.Link, error)
}

func nlFamily(f Family) int {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

func famOf(nlf int) Family {
	if nlf == netlink.FAMILY_V6 {
		return IPv6
	}
	return IPv4
}

func allAddrs(f Family) *net.IPNet {
	if f == IPv6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// addRoute adds pr's rule and route.
func (in *routing) addRoute(pr PolicyRoute) error {
	cmds := pr.Commands()
	mask := pr.Mark
	rule := netlink.NewRule()
	rule.Family = nlFamily(pr.Family)
	rule.Mark, rule.Mask = pr.Mark, &mask
	rule.Table = pr.Table
	rule.Protocol = RouteProtocol
	// ip rule add fwmark MARK/MARK lookup TABLE proto 45
	if err := in.nl.RuleAdd(rule); err != nil {
		return fmt.Errorf("%s: %w", cmds[0], err)
	}
	// ip link show lo
	lo, err := in.nl.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("%s: finding lo: %w", cmds[1], err)
	}
	// ip route add local 0.0.0.0/0 dev lo table TABLE proto 45 (or ::/0)
	err = in.nl.RouteAdd(&netlink.Route{
		Family:    nlFamily(pr.Family),
		LinkIndex: lo.Attrs().Index,
		Dst:       allAddrs(pr.Family),
		Table:     pr.Table,
		Type:      unix.RTN_LOCAL,
		Scope:     netlink.SCOPE_HOST,
		Protocol:  netlink.RouteProtocol(RouteProtocol),
	})
	if err != nil {
		return fmt.Errorf("%s: %w", cmds[1], err)
	}
	return nil
}

// ownedRouting lists detour's ip rules and routes of family f (or of both,
// with netlink.FAMILY_ALL).
func (in *routing) ownedRouting(nlf int) ([]netlink.Rule, []netlink.Route, error) {
	// ip rule show (all of them: the filter cannot select a protocol)
	all, err := in.nl.RuleListFiltered(nlf, nil, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("listing ip rules: %w", err)
	}
	var rules []netlink.Rule
	for _, r := range all {
		if r.Protocol == RouteProtocol {
			rules = append(rules, r)
		}
	}
	// ip route show table all proto 45
	routes, err := in.nl.RouteListFiltered(nlf,
		&netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: netlink.RouteProtocol(RouteProtocol)},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, nil, fmt.Errorf("listing routes: %w", err)
	}
	return rules, routes, nil
}

// routeMatches reports whether detour's ip rules and routes of family f
// are exactly want (none, when want is nil).
func (in *routing) routeMatches(f Family, want *PolicyRoute) (bool, string, error) {
	rules, routes, err := in.ownedRouting(nlFamily(f))
	if err != nil {
		return false, "", err
	}
	if want == nil {
		if len(rules)+len(routes) > 0 {
			return false, fmt.Sprintf("%s: %d stale ip rules and %d routes of detour's", f, len(rules), len(routes)), nil
		}
		return true, "", nil
	}
	cmds := want.Commands()
	if len(rules) != 1 || rules[0].Mark != want.Mark || rules[0].Mask == nil || *rules[0].Mask != want.Mark || rules[0].Table != want.Table {
		return false, cmds[0] + ": missing or different", nil
	}
	// ip link show lo
	lo, err := in.nl.LinkByName("lo")
	if err != nil {
		return false, "", fmt.Errorf("finding lo: %w", err)
	}
	if len(routes) != 1 {
		return false, cmds[1] + ": missing or different", nil
	}
	rt := routes[0]
	if rt.Table != want.Table || rt.Type != unix.RTN_LOCAL || rt.LinkIndex != lo.Attrs().Index || (rt.Dst != nil && rt.Dst.String() != allAddrs(f).String()) {
		return false, cmds[1] + ": missing or different", nil
	}
	return true, "", nil
}

// removeRoutes deletes detour's ip rules and routes of both families.
func (in *routing) removeRoutes() error {
	rules, routes, err := in.ownedRouting(netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range rules {
		// ip rule del fwmark MARK/MASK lookup TABLE proto 45 (as listed)
		if err := in.nl.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("ip rule del %s: %w", ruleString(r), err))
		}
	}
	for _, rt := range routes {
		// ip route del local 0.0.0.0/0 dev lo table TABLE proto 45 (as listed)
		if err := in.nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("ip route del %s: %w", routeString(rt), err))
		}
	}
	return errors.Join(errs...)
}

// tableUsers lists the ip rules and routes of family f that use table and
// are not detour's.
func (in *routing) tableUsers(f Family, table int) ([]string, error) {
	// ip rule show table TABLE
	rules, err := in.nl.RuleListFiltered(nlFamily(f), &netlink.Rule{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing ip rules: %w", err)
	}
	var out []string
	for _, r := range rules {
		if r.Protocol != RouteProtocol {
			out = append(out, "ip rule "+ruleString(r))
		}
	}
	// ip route show table TABLE
	routes, err := in.nl.RouteListFiltered(nlFamily(f), &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing routes of table %d: %w", table, err)
	}
	for _, rt := range routes {
		if rt.Protocol != netlink.RouteProtocol(RouteProtocol) {
			out = append(out, "ip route "+routeString(rt))
		}
	}
	return out, nil
}

// tableProblems is the fatal problem, if any, of taking policy-routing
// table for family f: someone else uses it, or it cannot be listed.
func (in *routing) tableProblems(f Family, table int) []Problem {
	users, err := in.tableUsers(f, table)
	switch {
	case err != nil:
		return []Problem{{Fatal: true, Msg: err.Error()}}
	case len(users) > 0:
		return []Problem{{Fatal: true, Msg: fmt.Sprintf(
			"policy-routing table %d is already used by someone else (%s): choose another with --table",
			table, strings.Join(users, "; "))}}
	}
	return nil
}

// showRoutes ends an installer's Show: detour's ip rules and routes, and a
// note that nothing is installed when neither they nor the rules shown
// before (empty is false then) are there.
func (in *routing) showRoutes(w io.Writer, empty bool) error {
	lines, err := in.routeLines()
	if err != nil {
		return err
	}
	for _, l := range lines {
		fmt.Fprintln(w, l)
		empty = false
	}
	if empty {
		fmt.Fprintln(w, "# none of detour's rules is installed")
	}
	return nil
}

// routeLines lists detour's ip rules and routes like `ip rule` and
// `ip route show table all` would.
func (in *routing) routeLines() ([]string, error) {
	rules, routes, err := in.ownedRouting(netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range rules {
		out = append(out, fmt.Sprintf("%s rule %s", ipCmd(famOf(r.Family)), ruleString(r)))
	}
	for _, rt := range routes {
		out = append(out, fmt.Sprintf("%s route %s", ipCmd(famOf(rt.Family)), routeString(rt)))
	}
	return out, nil
}

func ipCmd(f Family) string {
	if f == IPv6 {
		return "ip -6"
	}
	return "ip"
}

func ruleString(r netlink.Rule) string {
	s := fmt.Sprintf("pref %d", r.Priority)
	if r.Src != nil {
		s += " from " + r.Src.String()
	}
	if r.Mark != 0 || r.Mask != nil {
		s += " fwmark " + hex(r.Mark)
		if r.Mask != nil {
			s += "/" + hex(*r.Mask)
		}
	}
	return s + fmt.Sprintf(" lookup %d proto %d", r.Table, r.Protocol)
}

func routeString(rt netlink.Route) string {
	kind := ""
	if rt.Type == unix.RTN_LOCAL {
		kind = "local "
	}
	dst := "default"
	if rt.Dst != nil {
		dst = rt.Dst.String()
	}
	s := kind + dst
	if rt.Gw != nil {
		s += " via " + rt.Gw.String()
	}
	if rt.LinkIndex > 0 {
		if name, err := net.InterfaceByIndex(rt.LinkIndex); err == nil {
			s += " dev " + name.Name
		}
	}
	return s + fmt.Sprintf(" table %d proto %d", rt.Table, rt.Protocol)
}

// MarkLoops lists the ip rules, not detour's own, that send packets
// carrying mark (detour's socket mark) to a table whose default route is
// `local`: there detour's outbound connections are delivered back to this
// host instead of leaving it, and a TPROXY rule without a mark exemption
// hands them to detour again, a routing loop. A rule matches when
// (mark & mask) == (fwmark & mask), the kernel's test. Each Problem names
// the rule and the fix. It opens a netlink socket in the calling thread's
// network namespace.
func MarkLoops(mark uint32) ([]Problem, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening a netlink socket: %w", err)
	}
	defer h.Close()
	return markLoops(h, mark)
}

func markLoops(nl routingAPI, mark uint32) ([]Problem, error) {
	var out []Problem
	for _, f := range []Family{IPv4, IPv6} {
		// ip rule show
		rules, err := nl.RuleListFiltered(nlFamily(f), nil, 0)
		if err != nil {
			return nil, fmt.Errorf("listing ip rules: %w", err)
		}
		for _, r := range rules {
			if r.Protocol == RouteProtocol || (r.Mark == 0 && r.Mask == nil) || r.Table <= 0 {
				continue // detour's own, no fwmark selector, or no table lookup
			}
			mask := ^uint32(0)
			if r.Mask != nil {
				mask = *r.Mask
			}
			if (mark&mask == r.Mark&mask) == r.Invert {
				continue
			}
			// ip route show table TABLE
			routes, err := nl.RouteListFiltered(nlFamily(f), &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return nil, fmt.Errorf("listing routes of table %d: %w", r.Table, err)
			}
			for _, rt := range routes {
				if rt.Type != unix.RTN_LOCAL || (rt.Dst != nil && !isDefault(rt.Dst)) {
					continue
				}
				fix := fmt.Sprintf("give detour a mark this rule does not match (--mark %s: (mark & %s) must differ from %s)",
					hex(mark^(mask&-mask)), hex(mask), hex(r.Mark&mask))
				if mark^(mask&-mask) == 0 || mask == 0 {
					fix = "give detour a mark this rule does not match (--mark)"
				}
				out = append(out, Problem{Msg: fmt.Sprintf(
					"%s rule %s matches detour's mark %s and its table holds %s: detour's own connections would be delivered back to this host (a routing loop once a TPROXY rule without a mark exemption takes them); %s, or narrow the rule's mask so it leaves %s alone",
					ipCmd(f), ruleString(r), hex(mark), routeString(rt), fix, hex(mark))})
				break
			}
		}
	}
	return out, nil
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}
