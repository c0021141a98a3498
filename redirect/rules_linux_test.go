//go:build linux

package redirect

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/detour-proxy/detour/ports"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeIPT is an in-memory iptables of one family that records every call.
// Rules are kept as their `iptables -S` text after "-A CHAIN".
type fakeIPT struct {
	tables map[string]map[string][]string // table → chain → rules
	calls  []string
	failOn string // an Append whose rule holds this fails like a missing extension
	lose   string // a Delete whose rule holds this finds it already deleted by someone else
}

var builtinChains = []string{"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}

func newFakeIPT() *fakeIPT {
	f := &fakeIPT{tables: map[string]map[string][]string{}}
	for _, t := range []string{"nat", "mangle", "filter"} {
		f.tables[t] = map[string][]string{}
		for _, c := range builtinChains {
			f.tables[t][c] = nil
		}
	}
	return f
}

type fakeErr struct {
	msg      string
	notExist bool
}

func (e *fakeErr) Error() string    { return e.msg }
func (e *fakeErr) IsNotExist() bool { return e.notExist }

// text renders a rule the way `iptables -S` does: comments quoted.
func text(rule []string) string {
	out := slices.Clone(rule)
	for i := range out {
		if i > 0 && out[i-1] == "--comment" {
			out[i] = strconv.Quote(out[i])
		}
	}
	return strings.Join(out, " ")
}

func (f *fakeIPT) chain(table, chain string) ([]string, error) {
	rules, ok := f.tables[table][chain]
	if !ok {
		return nil, &fakeErr{"iptables: No chain/target/match by that name.", true}
	}
	return rules, nil
}

func (f *fakeIPT) Exists(table, chain string, rule ...string) (bool, error) {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -C %s %s", table, chain, text(rule)))
	rules, err := f.chain(table, chain)
	if err != nil {
		return false, nil
	}
	return slices.Contains(rules, text(rule)), nil
}

func (f *fakeIPT) Insert(table, chain string, pos int, rule ...string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -I %s %d %s", table, chain, pos, text(rule)))
	rules, err := f.chain(table, chain)
	if err != nil {
		return err
	}
	if target := rule[len(rule)-1]; !slices.Contains(builtinChains, target) {
		if _, ok := f.tables[table][target]; !ok {
			return &fakeErr{"Chain '" + target + "' does not exist", false}
		}
	}
	f.tables[table][chain] = slices.Insert(slices.Clone(rules), pos-1, text(rule))
	return nil
}

func (f *fakeIPT) Append(table, chain string, rule ...string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -A %s %s", table, chain, text(rule)))
	rules, err := f.chain(table, chain)
	if err != nil {
		return err
	}
	if f.failOn != "" && slices.Contains(rule, f.failOn) {
		return &fakeErr{"Couldn't load target `" + f.failOn + "':No such file or directory", false}
	}
	f.tables[table][chain] = append(slices.Clone(rules), text(rule))
	return nil
}

func (f *fakeIPT) Delete(table, chain string, rule ...string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -D %s %s", table, chain, text(rule)))
	rules, err := f.chain(table, chain)
	if err != nil {
		return err
	}
	if f.lose != "" && slices.Contains(rule, f.lose) {
		f.tables[table][chain] = slices.DeleteFunc(slices.Clone(rules), func(r string) bool { return r == text(rule) })
		return &fakeErr{"iptables: Bad rule (does a matching rule exist in that chain?).", true}
	}
	i := slices.Index(rules, text(rule))
	if i < 0 {
		return &fakeErr{"iptables: Bad rule (does a matching rule exist in that chain?).", true}
	}
	f.tables[table][chain] = slices.Delete(slices.Clone(rules), i, i+1)
	return nil
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -S %s", table, chain))
	rules, err := f.chain(table, chain)
	if err != nil {
		return nil, err
	}
	head := "-N " + chain
	if slices.Contains(builtinChains, chain) {
		head = "-P " + chain + " ACCEPT"
	}
	out := []string{head}
	for _, r := range rules {
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}

func (f *fakeIPT) ListChains(table string) ([]string, error) {
	f.calls = append(f.calls, "-t "+table+" -S")
	out := slices.Clone(builtinChains)
	for c := range f.tables[table] {
		if !slices.Contains(builtinChains, c) {
			out = append(out, c)
		}
	}
	slices.Sort(out[len(builtinChains):])
	return out, nil
}

func (f *fakeIPT) NewChain(table, chain string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -N %s", table, chain))
	if _, ok := f.tables[table][chain]; ok {
		return &fakeErr{"iptables: Chain already exists.", false}
	}
	f.tables[table][chain] = nil
	return nil
}

func (f *fakeIPT) ClearChain(table, chain string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -F %s", table, chain))
	f.tables[table][chain] = nil
	return nil
}

func (f *fakeIPT) DeleteChain(table, chain string) error {
	f.calls = append(f.calls, fmt.Sprintf("-t %s -X %s", table, chain))
	rules, err := f.chain(table, chain)
	if err != nil {
		return err
	}
	if len(rules) > 0 {
		return &fakeErr{"iptables: Directory not empty.", false}
	}
	for c, rs := range f.tables[table] {
		for _, r := range rs {
			if strings.HasSuffix(r, "-j "+chain) {
				return &fakeErr{"iptables: Too many links (referenced by " + c + ").", false}
			}
		}
	}
	delete(f.tables[table], chain)
	return nil
}

// writes are the calls that change something.
func (f *fakeIPT) writes() []string {
	var out []string
	for _, c := range f.calls {
		if !strings.Contains(c, " -S") && !strings.Contains(c, " -C ") {
			out = append(out, c)
		}
	}
	return out
}

// dump is the whole state, for comparisons (it records no call).
func (f *fakeIPT) dump() string {
	var out []string
	for _, t := range []string{"filter", "mangle", "nat"} {
		var chains []string
		for c := range f.tables[t] {
			chains = append(chains, c)
		}
		slices.Sort(chains)
		for _, c := range chains {
			out = append(out, t+" -N "+c)
			for _, r := range f.tables[t][c] {
				out = append(out, t+" -A "+c+" "+r)
			}
		}
	}
	return strings.Join(out, "\n")
}

// fakeNL is in-memory policy routing.
type fakeNL struct {
	rules    []netlink.Rule
	routes   []netlink.Route
	calls    []string
	failWith error // RouteAdd fails with it
}

func (n *fakeNL) RuleAdd(r *netlink.Rule) error {
	n.calls = append(n.calls, "rule add "+ruleString(*r))
	c := *r
	if c.Priority < 0 {
		c.Priority = 32765
	}
	n.rules = append(n.rules, c)
	return nil
}

func (n *fakeNL) RuleDel(r *netlink.Rule) error {
	n.calls = append(n.calls, "rule del "+ruleString(*r))
	for i, x := range n.rules {
		if x.Family == r.Family && x.Priority == r.Priority && x.Table == r.Table && x.Mark == r.Mark && x.Protocol == r.Protocol {
			n.rules = slices.Delete(n.rules, i, i+1)
			return nil
		}
	}
	return unix.ENOENT
}

func (n *fakeNL) RuleListFiltered(family int, filter *netlink.Rule, mask uint64) ([]netlink.Rule, error) {
	var out []netlink.Rule
	for _, r := range n.rules {
		if (family == netlink.FAMILY_ALL || r.Family == family) && (mask&netlink.RT_FILTER_TABLE == 0 || r.Table == filter.Table) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (n *fakeNL) RouteAdd(r *netlink.Route) error {
	n.calls = append(n.calls, "route add "+routeString(*r))
	if n.failWith != nil {
		return n.failWith
	}
	n.routes = append(n.routes, *r)
	return nil
}

func (n *fakeNL) RouteDel(r *netlink.Route) error {
	n.calls = append(n.calls, "route del "+routeString(*r))
	for i, x := range n.routes {
		if x.Family == r.Family && x.Table == r.Table && x.Protocol == r.Protocol && x.Dst.String() == r.Dst.String() {
			n.routes = slices.Delete(n.routes, i, i+1)
			return nil
		}
	}
	return unix.ESRCH
}

func (n *fakeNL) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	var out []netlink.Route
	for _, r := range n.routes {
		switch {
		case family != netlink.FAMILY_ALL && r.Family != family:
		case mask&netlink.RT_FILTER_TABLE != 0 && filter.Table != 0 && r.Table != filter.Table:
		case mask&netlink.RT_FILTER_PROTOCOL != 0 && r.Protocol != filter.Protocol:
		default:
			out = append(out, r)
		}
	}
	return out, nil
}

func (n *fakeNL) LinkByName(name string) (netlink.Link, error) {
	return &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: name, Index: 1}}, nil
}

func (n *fakeNL) dump() string {
	var out []string
	for _, r := range n.rules {
		out = append(out, fmt.Sprintf("%d %s", r.Family, ruleString(r)))
	}
	for _, r := range n.routes {
		out = append(out, fmt.Sprintf("%d %s", r.Family, routeString(r)))
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

type fakeKernel struct {
	v4, v6 *fakeIPT
	nl     *fakeNL
	in     *Installer
}

// newFakeKernel is a gateway with a firewall of its own: rules, a chain and
// policy routing that detour must never touch.
func newFakeKernel() *fakeKernel {
	k := &fakeKernel{v4: newFakeIPT(), v6: newFakeIPT(), nl: &fakeNL{}}
	for _, f := range []*fakeIPT{k.v4, k.v6} {
		f.tables["nat"]["PREROUTING"] = []string{`-m addrtype --dst-type LOCAL -m comment --comment "operator" -j DOCKER`}
		f.tables["nat"]["DOCKER"] = []string{`-i docker0 -j RETURN`}
		f.tables["mangle"]["PREROUTING"] = []string{`-m comment --comment "operator: detour:lookalike" -j ACCEPT`}
		f.tables["filter"]["INPUT"] = []string{`-p tcp --dport 22 -j ACCEPT`}
	}
	k.nl.rules = []netlink.Rule{{Family: netlink.FAMILY_V4, Priority: 1000, Table: 50, Protocol: unix.RTPROT_BOOT, Goto: -1, Flow: -1}}
	k.nl.routes = []netlink.Route{{Family: netlink.FAMILY_V4, Table: 50, Protocol: unix.RTPROT_BOOT,
		Dst: &net.IPNet{IP: net.IPv4(198, 19, 0, 0).To4(), Mask: net.CIDRMask(16, 32)}, Type: unix.RTN_UNREACHABLE}}
	k.in = &Installer{
		ipt:     map[Family]iptablesAPI{IPv4: k.v4, IPv6: k.v6},
		iptErr:  map[Family]error{},
		routing: routing{nl: k.nl},
		sysctl: func(path string) (string, bool) { // a gateway: forwarding on, rp_filter loose
			if strings.HasSuffix(path, "rp_filter") {
				return "2", true
			}
			return "1", true
		},
		interfaces: func() []string { return []string{"lo", "lan0"} },
	}
	return k
}

// process is another detour process on the same kernel: it knows nothing
// of what earlier ones installed.
func (k *fakeKernel) process() *fakeKernel {
	p := *k
	in := *k.in
	in.want, in.seen = nil, nil
	p.in = &in
	return &p
}

func (k *fakeKernel) dump() string {
	return "v4:\n" + k.v4.dump() + "\nv6:\n" + k.v6.dump() + "\nroutes:\n" + k.nl.dump()
}

func (k *fakeKernel) resetCalls() { k.v4.calls, k.v6.calls, k.nl.calls = nil, nil, nil }

var (
	redirectOpts = RuleOptions{Port: 7777, Output: true, Bypass: []netip.Prefix{}}
	tproxyOpts   = RuleOptions{Mode: TProxy, Port: 7777, Ports: []ports.Range{{Lo: 80, Hi: 80}}, Bypass: prefixes("198.18.3.0/24")}
)

func install(t *testing.T, k *fakeKernel, o RuleOptions) bool {
	t.Helper()
	changed, warnings, err := k.in.Install(o)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("Install: %v (warnings %v)", err, warnings)
	}
	return changed
}

func TestInstallAddsExactlyTheSetJumpsLast(t *testing.T) {
	k := newFakeKernel()
	before := k.dump()
	if !install(t, k, tproxyOpts) {
		t.Fatal("first install reports no change")
	}
	// The probe chain came and went; then chains, rules, and only then
	// the jump, once the policy route is there too.
	w := k.v4.writes()
	jump := slices.IndexFunc(w, func(c string) bool { return strings.Contains(c, "-I PREROUTING 1") })
	if jump != len(w)-1 {
		t.Errorf("the jump is not the last write:\n%s", strings.Join(w, "\n"))
	}
	if !slices.Contains(w, "-t mangle -X DETOUR_PROBE") {
		t.Errorf("probe chain not deleted:\n%s", strings.Join(w, "\n"))
	}
	sets := mustSets(t, tproxyOpts)
	for _, rs := range sets {
		ipt := k.in.ipt[rs.Family].(*fakeIPT)
		for _, c := range rs.Chains {
			var want []string
			for _, r := range c.Rules {
				want = append(want, text(r))
			}
			if got := ipt.tables[c.Table][c.Name]; !slices.Equal(got, want) {
				t.Errorf("%v %s:\n%s\nwant:\n%s", rs.Family, c.Name, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if got := ipt.tables[c.Table][c.Hook][0]; got != text(c.Jump()) {
				t.Errorf("%v %s first rule %q, want the jump", rs.Family, c.Hook, got)
			}
		}
		if _, ok := ipt.tables["mangle"][chainProbe]; ok {
			t.Errorf("%v: probe chain left behind", rs.Family)
		}
	}
	if got := k.nl.dump(); !strings.Contains(got, "2 pref 32765 fwmark 0x100/0x100 lookup 100 proto 45") ||
		!strings.Contains(got, "10 pref 32765 fwmark 0x100/0x100 lookup 100 proto 45") ||
		!strings.Contains(got, "2 local 0.0.0.0/0") || !strings.Contains(got, "10 local ::/0") {
		t.Errorf("policy routing:\n%s", got)
	}

	if err := k.in.Remove(); err != nil {
		t.Fatal(err)
	}
	if after := k.dump(); after != before {
		t.Errorf("after Remove:\n%s\nwant as before:\n%s", after, before)
	}
}

func TestInstallTwiceIsInstallOnce(t *testing.T) {
	k := newFakeKernel()
	install(t, k, redirectOpts)
	once := k.dump()
	k.resetCalls()
	if install(t, k, redirectOpts) {
		t.Error("second install reports a change")
	}
	if k.dump() != once {
		t.Errorf("second install changed the rules:\n%s\nwant:\n%s", k.dump(), once)
	}
	for _, w := range k.v4.writes() {
		if !strings.Contains(w, chainProbe) {
			t.Errorf("second install wrote %q", w)
		}
	}
}

func TestInstallOtherOptionsReplacesTheSet(t *testing.T) {
	k := newFakeKernel()
	install(t, k, redirectOpts)
	install(t, k, tproxyOpts)
	replaced := k.dump()

	fresh := newFakeKernel()
	install(t, fresh, tproxyOpts)
	if want := fresh.dump(); replaced != want {
		t.Errorf("redirect then tproxy:\n%s\nwant as tproxy alone:\n%s", replaced, want)
	}
	if strings.Contains(replaced, ChainNAT+"\n") || strings.Contains(replaced, ChainNATOutput) {
		t.Errorf("REDIRECT chains left:\n%s", replaced)
	}
}

func TestInstallReplacesStaleSetOfKilledRun(t *testing.T) {
	k := newFakeKernel()
	before := k.dump()
	// What a killed run with other options left: chains, jumps, routes.
	install(t, k, RuleOptions{Mode: TProxy, Port: 9999, Table: 77, TProxyMark: 0x800, Output: true})

	next := k.process()
	install(t, next, redirectOpts)
	fresh := newFakeKernel()
	install(t, fresh, redirectOpts)
	if got, want := next.dump(), fresh.dump(); got != want {
		t.Errorf("after replacing a stale set:\n%s\nwant:\n%s", got, want)
	}
	// After kill -9, `detour rules remove` needs no options.
	if err := k.process().in.Remove(); err != nil {
		t.Fatal(err)
	}
	if after := k.dump(); after != before {
		t.Errorf("after remove:\n%s\nwant:\n%s", after, before)
	}
}

func TestMissingExtensionChangesNothing(t *testing.T) {
	k := newFakeKernel()
	before := k.dump()
	k.v4.failOn = "TPROXY"
	_, _, err := k.in.Install(tproxyOpts)
	if err == nil || !strings.Contains(err.Error(), "TPROXY target (xt_TPROXY)") {
		t.Fatalf("Install = %v, want an error naming the TPROXY target", err)
	}
	if k.dump() != before {
		t.Errorf("a failed probe left:\n%s", k.dump())
	}
	for _, w := range k.v4.writes() {
		if !strings.Contains(w, chainProbe) {
			t.Errorf("wrote %q outside the probe chain", w)
		}
	}
}

func TestFailureHalfWayRollsBack(t *testing.T) {
	k := newFakeKernel()
	before := k.dump()
	k.nl.failWith = unix.EPERM
	_, _, err := k.in.Install(tproxyOpts)
	if err == nil || !strings.Contains(err.Error(), "ip route add local 0.0.0.0/0 dev lo table 100") || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("Install = %v, want the route error and a roll-back", err)
	}
	if after := k.dump(); after != before {
		t.Errorf("after roll-back:\n%s\nwant:\n%s", after, before)
	}
}

func TestTableUsedBySomeoneElse(t *testing.T) {
	k := newFakeKernel()
	k.nl.routes = append(k.nl.routes, netlink.Route{Family: netlink.FAMILY_V4, Table: 100, Protocol: unix.RTPROT_BOOT, Type: unix.RTN_LOCAL, LinkIndex: 1})
	before := k.dump()
	_, _, err := k.in.Install(tproxyOpts)
	if err == nil || !strings.Contains(err.Error(), "table 100 is already used") {
		t.Fatalf("Install = %v, want table 100 in use", err)
	}
	if k.dump() != before {
		t.Errorf("changed:\n%s", k.dump())
	}
	o := tproxyOpts
	o.Table = 101
	install(t, k, o)
}

func TestMissingIP6Tables(t *testing.T) {
	k := newFakeKernel()
	delete(k.in.ipt, IPv6)
	k.in.iptErr[IPv6] = errors.New(`exec: "ip6tables": executable file not found in $PATH`)
	_, _, err := k.in.Install(redirectOpts)
	if err == nil || !strings.Contains(err.Error(), "ip6tables not found") || !strings.Contains(err.Error(), "--ipv6=false") {
		t.Fatalf("Install = %v", err)
	}
	if w := k.v4.writes(); len(w) > 0 && !strings.Contains(strings.Join(w, ""), chainProbe) {
		t.Errorf("wrote before failing: %q", w)
	}
	o := redirectOpts
	o.NoIPv6 = true
	install(t, k, o)
}

func TestEnsureRestoresAfterFirewallReload(t *testing.T) {
	k := newFakeKernel()
	clean := newFakeKernel()
	install(t, k, tproxyOpts)
	installed := k.dump()

	// Nothing missing: only reads.
	k.resetCalls()
	if restored, _, err := k.in.Ensure(tproxyOpts); err != nil || restored {
		t.Fatalf("Ensure on intact rules = %v, %v", restored, err)
	}
	if w := append(k.v4.writes(), k.nl.calls...); len(w) > 0 {
		t.Errorf("Ensure on intact rules wrote %q", w)
	}

	// A firewall reload: iptables back to the operator's own, routes kept.
	k.v4.tables, k.v6.tables = clean.v4.tables, clean.v6.tables
	restored, missing, err := k.in.Ensure(tproxyOpts)
	if err != nil || !restored || !strings.Contains(missing, "chain") {
		t.Fatalf("Ensure after reload = %v, %q, %v", restored, missing, err)
	}
	if k.dump() != installed {
		t.Errorf("restored:\n%s\nwant:\n%s", k.dump(), installed)
	}

	// Only the policy route gone.
	k.nl.routes = k.nl.routes[:1]
	if restored, missing, err := k.in.Ensure(tproxyOpts); err != nil || !restored || !strings.Contains(missing, "ip route add local") {
		t.Fatalf("Ensure without the route = %v, %q, %v", restored, missing, err)
	}
	if k.dump() != installed {
		t.Errorf("restored:\n%s\nwant:\n%s", k.dump(), installed)
	}
}

func TestRemoveOfNothingAndOfVanishedRules(t *testing.T) {
	k := newFakeKernel()
	before := k.dump()
	if err := k.in.Remove(); err != nil {
		t.Fatalf("Remove with nothing installed: %v", err)
	}
	if k.dump() != before {
		t.Errorf("Remove with nothing installed changed:\n%s", k.dump())
	}
	// A jump deleted by someone else between listing and deleting counts
	// as deleted.
	install(t, k, redirectOpts)
	k.v4.lose = commentJump
	if err := k.in.Remove(); err != nil {
		t.Fatalf("Remove with a vanished jump: %v", err)
	}
	if k.dump() != before {
		t.Errorf("after Remove:\n%s\nwant:\n%s", k.dump(), before)
	}
}
