//go:build linux

package redirect

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// iptablesAPI is the part of go-iptables the installer uses, one per
// family; tests put a fake in its place that records the calls.
type iptablesAPI interface {
	Exists(table, chain string, rulespec ...string) (bool, error)
	Insert(table, chain string, pos int, rulespec ...string) error
	Append(table, chain string, rulespec ...string) error
	Delete(table, chain string, rulespec ...string) error
	List(table, chain string) ([]string, error)
	ListChains(table string) ([]string, error)
	NewChain(table, chain string) error
	ClearChain(table, chain string) error
	DeleteChain(table, chain string) error
}

// Installer installs, re-checks and removes detour's kernel rules:
// iptables chains (go-iptables) and TPROXY's policy routing (netlink). It
// changes nothing outside its own chains, its one jump rule per built-in
// chain, and its own ip rules and routes (proto RouteProtocol).
//
// An Installer is not safe for concurrent use.
type Installer struct {
	ipt    map[Family]iptablesAPI
	iptErr map[Family]error // why a family has no iptables command
	routing
	close func()
	// sysctl reads /proc/sys/PATH ("net/ipv4/ip_forward") and tells
	// whether it exists.
	sysctl func(path string) (string, bool)
	// interfaces lists the interfaces the kernel has.
	interfaces func() []string
	// removeNFT removes a table of detour's nftables backend, left by a
	// killed run of it, so that two sets of rules never capture at once;
	// nil does nothing (the unit tests' fake kernel).
	removeNFT func() error

	// What was last installed or verified, and its chains as `iptables -S`
	// printed them then: a re-check that finds the same lines is done.
	want []RuleSet
	seen map[chainKey][]string
}

type chainKey struct {
	fam          Family
	table, chain string
}

// NewInstaller finds iptables and ip6tables and opens a netlink socket, in
// the network namespace of the calling thread. A missing command is only an
// error once rules of its family are asked for.
func NewInstaller() (*Installer, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening a netlink socket: %w", err)
	}
	in := &Installer{
		ipt:        map[Family]iptablesAPI{},
		iptErr:     map[Family]error{},
		routing:    routing{nl: h},
		close:      h.Close,
		sysctl:     readProcSys,
		interfaces: interfaceNames,
		removeNFT:  func() error { return removeNFTTable(false) },
	}
	for _, f := range []Family{IPv4, IPv6} {
		proto := iptables.ProtocolIPv4
		if f == IPv6 {
			proto = iptables.ProtocolIPv6
		}
		// Wait at most 5 s for the xtables lock rather than forever.
		ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(5))
		if err != nil {
			in.iptErr[f] = err
			continue
		}
		in.ipt[f] = ipt
	}
	return in, nil
}

// Close releases the netlink socket.
func (in *Installer) Close() {
	if in.close != nil {
		in.close()
	}
}

// Check returns what keeps the rules of o from working here: a missing
// iptables command, extension or table that cannot be written, or a
// policy-routing table someone else uses (fatal), and sysctls that defeat
// the rules (warnings). The extension probe appends one rule per needed
// match and target to a scratch chain, DETOUR_PROBE, and deletes it.
func (in *Installer) Check(o RuleOptions) []Problem {
	if err := o.Validate(); err != nil {
		return []Problem{{Fatal: true, Msg: err.Error()}}
	}
	o = o.withDefaults()
	var out []Problem
	for _, f := range o.families() {
		ipt := in.ipt[f]
		if ipt == nil {
			msg := fmt.Sprintf("%s not found (%v): install the iptables package", f.Command(), in.iptErr[f])
			if f == IPv6 {
				msg += ", or pass --ipv6=false"
			}
			out = append(out, Problem{Fatal: true, Msg: msg})
			continue
		}
		for _, table := range []string{"nat", "mangle"} {
			ps, ok := probes(o, f)[table]
			if !ok {
				continue
			}
			if err := in.probe(ipt, f, table, ps); err != nil {
				out = append(out, Problem{Fatal: true, Msg: err.Error()})
			}
		}
		if o.Mode == TProxy {
			out = append(out, in.tableProblems(f, o.Table)...)
		}
	}
	return append(out, sysctlProblems(o, in.sysctl, in.interfaces())...)
}

// probe appends each probe rule to a scratch chain of table, then deletes
// the chain.
func (in *Installer) probe(ipt iptablesAPI, f Family, table string, ps []probe) (err error) {
	if err := ipt.ClearChain(table, chainProbe); err != nil {
		return fmt.Errorf("cannot write the %s table with %s: %w", table, f.Command(), cleanErr(err))
	}
	defer func() {
		if derr := errors.Join(ipt.ClearChain(table, chainProbe), ipt.DeleteChain(table, chainProbe)); derr != nil && err == nil {
			err = fmt.Errorf("deleting the probe chain %s from the %s table: %w", chainProbe, table, cleanErr(derr))
		}
	}()
	for _, p := range ps {
		if err := ipt.Append(table, chainProbe, p.rule...); err != nil {
			return fmt.Errorf("%s or the kernel lacks the %s (%s -t %s -A %s %s): %w",
				f.Command(), p.ext, f.Command(), table, chainProbe, shellJoin(p.rule), cleanErr(err))
		}
	}
	return nil
}

// Install makes the kernel's rules those of o. Rules already exactly so are
// left alone (installing twice is installing once); any other set of
// detour's, such as one left by a killed run or made with other options, is
// replaced. Fatal problems of Check stop it before anything is changed, and
// a failure half-way removes what was done. It returns whether it changed
// anything, and Check's warnings.
func (in *Installer) Install(o RuleOptions) (changed bool, warnings []Problem, err error) {
	sets, err := o.RuleSets()
	if err != nil {
		return false, nil, err
	}
	warnings, err = splitProblems(in.Check(o))
	if err != nil {
		return false, warnings, err
	}
	if in.removeNFT != nil {
		if err := in.removeNFT(); err != nil {
			return false, warnings, err
		}
	}
	if ok, _, err := in.matches(sets); err == nil && ok {
		return false, warnings, in.remember(sets)
	}
	if err := in.Remove(); err != nil {
		return false, warnings, fmt.Errorf("removing detour's earlier rules: %w", err)
	}
	if err := in.apply(sets); err != nil {
		changed, err := rolledBack(err, in.Remove)
		return changed, warnings, err
	}
	return true, warnings, in.remember(sets)
}

// apply adds sets to a kernel holding none of detour's rules: chains first,
// then policy routes, and the jumps last, so capture starts only once
// everything it needs is there.
func (in *Installer) apply(sets []RuleSet) error {
	for _, rs := range sets {
		ipt := in.ipt[rs.Family]
		for _, c := range rs.Chains {
			if err := ipt.NewChain(c.Table, c.Name); err != nil {
				return fmt.Errorf("%s -t %s -N %s: %w", rs.Family.Command(), c.Table, c.Name, cleanErr(err))
			}
			for _, r := range c.Rules {
				if err := ipt.Append(c.Table, c.Name, r...); err != nil {
					return fmt.Errorf("%s -t %s -A %s %s: %w", rs.Family.Command(), c.Table, c.Name, shellJoin(r), cleanErr(err))
				}
			}
		}
	}
	for _, rs := range sets {
		if rs.Route != nil {
			if err := in.addRoute(*rs.Route); err != nil {
				return err
			}
		}
	}
	for _, rs := range sets {
		ipt := in.ipt[rs.Family]
		for _, c := range rs.Chains {
			if err := ipt.Insert(c.Table, c.Hook, 1, c.Jump()...); err != nil {
				return fmt.Errorf("%s -t %s -I %s 1 %s: %w", rs.Family.Command(), c.Table, c.Hook, shellJoin(c.Jump()), cleanErr(err))
			}
		}
	}
	return nil
}

// remember notes sets and their chains' current listing for Ensure.
func (in *Installer) remember(sets []RuleSet) error {
	in.want, in.seen = sets, map[chainKey][]string{}
	for _, rs := range sets {
		for _, c := range rs.Chains {
			lines, err := in.ipt[rs.Family].List(c.Table, c.Name)
			if err != nil {
				return fmt.Errorf("listing %s -t %s %s: %w", rs.Family.Command(), c.Table, c.Name, cleanErr(err))
			}
			in.seen[chainKey{rs.Family, c.Table, c.Name}] = lines
		}
	}
	return nil
}

// Ensure re-checks that the rules of o are in place, as after a host
// firewall reload, and installs them again if not. It returns whether it
// had to, and what it found missing.
func (in *Installer) Ensure(o RuleOptions) (restored bool, missing string, err error) {
	sets, err := o.RuleSets()
	if err != nil {
		return false, "", err
	}
	if in.unchanged(sets) {
		return false, "", nil
	}
	ok, missing, err := in.matches(sets)
	if err == nil && ok {
		return false, "", in.remember(sets)
	}
	if err != nil {
		missing = err.Error()
	}
	_, _, err = in.Install(o)
	return true, missing, err
}

// unchanged is Ensure's cheap test: the same sets as last time, their
// chains listing the same lines, their jumps and policy routes there.
func (in *Installer) unchanged(sets []RuleSet) bool {
	if !slices.EqualFunc(in.want, sets, equalRuleSet) {
		return false
	}
	for _, rs := range sets {
		ipt := in.ipt[rs.Family]
		for _, c := range rs.Chains {
			lines, err := ipt.List(c.Table, c.Name)
			if err != nil || !slices.Equal(lines, in.seen[chainKey{rs.Family, c.Table, c.Name}]) {
				return false
			}
			if ok, err := ipt.Exists(c.Table, c.Hook, c.Jump()...); err != nil || !ok {
				return false
			}
		}
		if ok, _, err := in.routeMatches(rs.Family, rs.Route); err != nil || !ok {
			return false
		}
	}
	return true
}

func equalRuleSet(a, b RuleSet) bool {
	if a.Family != b.Family || (a.Route == nil) != (b.Route == nil) || (a.Route != nil && *a.Route != *b.Route) {
		return false
	}
	return slices.EqualFunc(a.Chains, b.Chains, func(x, y Chain) bool {
		return x.Table == y.Table && x.Name == y.Name && x.Hook == y.Hook && x.UDP == y.UDP &&
			slices.EqualFunc(x.Rules, y.Rules, func(r, s Rule) bool { return slices.Equal(r, s) })
	})
}

// owned is what of detour's one family's iptables holds.
type owned struct {
	chains map[chainKey][]string // detour's chains and their `-S` lines
	jumps  []hookRule            // rules with detour's comment in built-in chains
}

type hookRule struct {
	table, chain string
	rule         Rule
	line         string // as `iptables -S` printed it
}

// readOwned finds detour's chains by name and its rules in the built-in
// chains by comment.
func (in *Installer) readOwned(f Family) (owned, error) {
	ipt := in.ipt[f]
	st := owned{chains: map[chainKey][]string{}}
	for _, table := range []string{"nat", "mangle"} {
		chains, err := ipt.ListChains(table)
		if err != nil {
			return st, fmt.Errorf("listing the chains of %s -t %s: %w", f.Command(), table, cleanErr(err))
		}
		for _, name := range ownedChains[table] {
			if !slices.Contains(chains, name) {
				continue
			}
			lines, err := ipt.List(table, name)
			if err != nil {
				return st, fmt.Errorf("listing %s -t %s %s: %w", f.Command(), table, name, cleanErr(err))
			}
			st.chains[chainKey{f, table, name}] = lines
		}
		for _, hook := range builtinHooks {
			lines, err := ipt.List(table, hook)
			if err != nil {
				return st, fmt.Errorf("listing %s -t %s %s: %w", f.Command(), table, hook, cleanErr(err))
			}
			for _, line := range lines {
				if r, ok := ownedRule(line); ok {
					st.jumps = append(st.jumps, hookRule{table, hook, r, line})
				}
			}
		}
	}
	return st, nil
}

// matches reports whether the kernel holds exactly sets of detour's, and if
// not, the first difference.
func (in *Installer) matches(sets []RuleSet) (bool, string, error) {
	for _, f := range []Family{IPv4, IPv6} {
		var want *RuleSet
		for i := range sets {
			if sets[i].Family == f {
				want = &sets[i]
			}
		}
		ipt := in.ipt[f]
		if ipt == nil {
			if want != nil {
				return false, "", fmt.Errorf("%s not found: %w", f.Command(), in.iptErr[f])
			}
			continue
		}
		if want == nil {
			want = &RuleSet{Family: f}
		}
		st, err := in.readOwned(f)
		if err != nil {
			return false, "", err
		}
		if len(st.chains) != len(want.Chains) || len(st.jumps) != len(want.Chains) {
			return false, fmt.Sprintf("%s: %d of detour's chains and %d jumps, want %d", f.Command(), len(st.chains), len(st.jumps), len(want.Chains)), nil
		}
		for _, c := range want.Chains {
			lines, ok := st.chains[chainKey{f, c.Table, c.Name}]
			if !ok {
				return false, fmt.Sprintf("%s -t %s: chain %s missing", f.Command(), c.Table, c.Name), nil
			}
			var rules []string
			for _, l := range lines {
				if strings.HasPrefix(l, "-A ") {
					rules = append(rules, l)
				}
			}
			if len(rules) != len(c.Rules) {
				return false, fmt.Sprintf("%s -t %s %s: %d rules, want %d", f.Command(), c.Table, c.Name, len(rules), len(c.Rules)), nil
			}
			for i, r := range c.Rules {
				// The comments keep the order of the kinds; -C tells each
				// rule is there exactly.
				if !strings.Contains(rules[i], r.Comment()) {
					return false, fmt.Sprintf("%s -t %s %s: rule %d is not a %s rule", f.Command(), c.Table, c.Name, i+1, r.Comment()), nil
				}
				if ok, err := ipt.Exists(c.Table, c.Name, r...); err != nil || !ok {
					return false, fmt.Sprintf("%s -t %s %s: rule %q missing", f.Command(), c.Table, c.Name, shellJoin(r)), err
				}
			}
			if ok, err := ipt.Exists(c.Table, c.Hook, c.Jump()...); err != nil || !ok {
				return false, fmt.Sprintf("%s -t %s %s: jump to %s missing", f.Command(), c.Table, c.Hook, c.Name), err
			}
		}
		if ok, why, err := in.routeMatches(f, want.Route); err != nil || !ok {
			return false, why, err
		}
	}
	return true, "", nil
}

// Remove deletes every rule, chain, ip rule and route of detour's, whatever
// options made them: the jumps from the built-in chains (found by comment),
// detour's chains (found by name), ip rules and routes with proto
// RouteProtocol, and a table inet detour of the nftables backend. Deleting
// what is already gone is not an error.
func (in *Installer) Remove() error {
	var errs []error
	for _, f := range []Family{IPv4, IPv6} {
		if in.ipt[f] != nil {
			errs = append(errs, in.removeTables(f))
		}
	}
	errs = append(errs, in.removeRoutes())
	if in.removeNFT != nil {
		errs = append(errs, in.removeNFT())
	}
	in.want, in.seen = nil, nil
	return errors.Join(errs...)
}

func (in *Installer) removeTables(f Family) error {
	ipt := in.ipt[f]
	st, err := in.readOwned(f)
	if err != nil {
		return err
	}
	var errs []error
	// Jumps first: a chain still jumped to cannot be deleted.
	for _, j := range st.jumps {
		if err := ipt.Delete(j.table, j.chain, j.rule...); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("%s -t %s -D %s %s: %w", f.Command(), j.table, j.chain, shellJoin(j.rule), cleanErr(err)))
		}
	}
	for _, table := range []string{"nat", "mangle"} {
		for _, name := range ownedChains[table] {
			if _, ok := st.chains[chainKey{f, table, name}]; !ok {
				continue
			}
			// ClearChain flushes (iptables -F); it would create a missing
			// chain, but this one was just listed.
			err := ipt.ClearChain(table, name)
			if err == nil {
				err = ipt.DeleteChain(table, name)
			}
			if err != nil && !isNotExist(err) {
				errs = append(errs, fmt.Errorf("%s -t %s -X %s: %w", f.Command(), table, name, cleanErr(err)))
			}
		}
	}
	return errors.Join(errs...)
}

// Show writes what of detour's the kernel holds now, as `iptables -S`,
// `ip rule` and `ip route` would list it.
func (in *Installer) Show(w io.Writer) error {
	empty := true
	for _, f := range []Family{IPv4, IPv6} {
		if in.ipt[f] == nil {
			fmt.Fprintf(w, "# %s: not found\n", f.Command())
			continue
		}
		st, err := in.readOwned(f)
		if err != nil {
			return err
		}
		for _, j := range st.jumps {
			fmt.Fprintf(w, "%s -t %s %s\n", f.Command(), j.table, j.line)
			empty = false
		}
		for _, table := range []string{"nat", "mangle"} {
			for _, name := range ownedChains[table] {
				for _, line := range st.chains[chainKey{f, table, name}] {
					fmt.Fprintf(w, "%s -t %s %s\n", f.Command(), table, line)
					empty = false
				}
			}
		}
	}
	return in.showRoutes(w, empty)
}

// isNotExist reports an iptables error about a rule or chain that is not
// there (*iptables.Error has IsNotExist).
func isNotExist(err error) bool {
	var e interface{ IsNotExist() bool }
	return errors.As(err, &e) && e.IsNotExist()
}

// cleanErr shortens go-iptables' errors ("running [/usr/sbin/iptables -t
// ... --wait 5]: exit status 2: iptables v1.8.9 (nf_tables): Couldn't load
// target `TPROXY':No such file or directory\n\nTry `iptables -h' ...") to
// what iptables said, on one line.
func cleanErr(err error) error {
	var e *iptables.Error
	if !errors.As(err, &e) {
		return err
	}
	msg := e.Error()
	if _, after, ok := strings.Cut(msg, "]: "); ok {
		msg = after
	}
	if i := strings.Index(msg, "Try `"); i >= 0 {
		msg = msg[:i]
	}
	return &cleanError{msg: strings.Join(strings.Fields(msg), " "), err: err}
}

type cleanError struct {
	msg string
	err error
}

func (e *cleanError) Error() string { return e.msg }
func (e *cleanError) Unwrap() error { return e.err }

// readProcSys reads a sysctl by its path under /proc/sys. The net.*
// sysctls are those of the calling thread's network namespace.
func readProcSys(path string) (string, bool) {
	b, err := os.ReadFile("/proc/sys/" + path)
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

func interfaceNames() []string {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []string
	for _, i := range ifs {
		out = append(out, i.Name)
	}
	return out
}
