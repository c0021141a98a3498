//go:build linux

package redirect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	vnl "github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NFTInstaller installs, re-checks and removes detour's rules as one
// nftables table, `inet detour`, over netlink (no nft binary), and TPROXY's
// policy routing like Installer. Each install and each remove is one atomic
// batch; nothing outside detour's table is read for writing or touched, and
// no iptables command is ever run.
//
// An NFTInstaller is not safe for concurrent use.
type NFTInstaller struct {
	routing
	close      func()
	sysctl     func(path string) (string, bool)
	interfaces func() []string

	// seen is the kernel's listing of detour's table right after the last
	// install or verification; a re-check that lists the same is done.
	want nftTable
	seen string
}

// NewNFTInstaller opens a netlink socket for policy routing in the network
// namespace of the calling thread; nftables batches open their own.
func NewNFTInstaller() (*NFTInstaller, error) {
	h, err := vnl.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening a netlink socket: %w", err)
	}
	return &NFTInstaller{routing: routing{nl: h}, close: h.Close, sysctl: readProcSys, interfaces: interfaceNames}, nil
}

// Close releases the netlink socket.
func (in *NFTInstaller) Close() {
	if in.close != nil {
		in.close()
	}
}

func detourTable() *nftables.Table {
	return &nftables.Table{Name: NFTTable, Family: nftables.TableFamilyINet}
}

// addTable queues the sets and chains of nt, with their rules, into table
// t on c.
func addTable(c *nftables.Conn, t *nftables.Table, nt nftTable) error {
	ids := map[string]uint32{}
	for _, st := range nt.Sets {
		key := nftables.TypeIPAddr
		if st.Family == IPv6 {
			key = nftables.TypeIP6Addr
		}
		set := &nftables.Set{Table: t, Name: st.Name, KeyType: key, Interval: true, Constant: true}
		if err := c.AddSet(set, st.elements()); err != nil {
			return fmt.Errorf("set %s: %w", st.Name, err)
		}
		ids[st.Name] = set.ID
	}
	for _, ch := range nt.Chains {
		hook, prio, policy := ch.Hook, ch.Priority, nftables.ChainPolicyAccept
		nc := c.AddChain(&nftables.Chain{Name: ch.Name, Table: t, Type: ch.Type, Hooknum: &hook, Priority: &prio, Policy: &policy})
		for _, r := range ch.Rules {
			exprs := slices.Clone(r.Exprs)
			for i, e := range exprs {
				if l, ok := e.(*expr.Lookup); ok {
					l2 := *l
					l2.SetID = ids[l.SetName] // the set is new in this batch
					exprs[i] = &l2
				}
			}
			c.AddRule(&nftables.Rule{Table: t, Chain: nc, Exprs: exprs,
				UserData: userdata.AppendString(nil, userdata.TypeComment, r.Comment)})
		}
	}
	return nil
}

// Check returns what keeps the rules of o from working here: nftables or
// an expression the rules need missing from the kernel, or a
// policy-routing table someone else uses (fatal), and sysctls that defeat
// the rules (warnings). Each kind of rule is tried in a batch that adds a
// scratch table, detour_probe, and deletes it again: the kernel checks
// everything and the ruleset is left as it was.
func (in *NFTInstaller) Check(o RuleOptions) []Problem {
	nt, err := o.nftRules()
	if err != nil {
		return []Problem{{Fatal: true, Msg: err.Error()}}
	}
	o = o.withDefaults()
	c, err := nftables.New()
	if err != nil {
		return []Problem{{Fatal: true, Msg: fmt.Sprintf("nftables: %v", err)}}
	}
	if _, err := c.ListTablesOfFamily(nftables.TableFamilyINet); err != nil {
		return []Problem{{Fatal: true, Msg: fmt.Sprintf("nftables: cannot list tables (%v): a kernel without nf_tables, or not privileged (CAP_NET_ADMIN)", err)}}
	}
	var out []Problem
	tried := map[string]bool{}
	for _, ch := range nt.Chains {
		for _, r := range ch.Rules {
			ext := nftExtension(r)
			if tried[ext] {
				continue
			}
			tried[ext] = true
			probe := &nftables.Table{Name: NFTTable + "_probe", Family: nftables.TableFamilyINet}
			c.AddTable(probe)
			err := addTable(c, probe, nftTable{Sets: nt.Sets,
				Chains: []nftChain{{Name: ch.Name, Type: ch.Type, Hook: ch.Hook, Priority: ch.Priority, Rules: []nftRule{r}}}})
			c.DelTable(probe)
			if err == nil {
				err = c.Flush()
			}
			if err != nil {
				out = append(out, Problem{Fatal: true, Msg: fmt.Sprintf("the kernel lacks the %s nftables needs for %q: %v",
					ext, nftRuleText(r), err)})
			}
		}
	}
	if o.Mode == TProxy {
		for _, f := range o.families() {
			out = append(out, in.tableProblems(f, o.Table)...)
		}
	}
	if stale := staleIptablesChains(c); len(stale) > 0 {
		out = append(out, Problem{Msg: fmt.Sprintf("detour's iptables rules are installed too (%s), by a run with "+
			"--firewall iptables that did not remove them: both would capture; remove them with "+
			"`detour rules remove --firewall iptables`", strings.Join(stale, ", "))})
	}
	return append(out, sysctlProblems(o, in.sysctl, in.interfaces())...)
}

// staleIptablesChains lists detour's iptables chains that iptables-nft
// holds ("ip nat DETOUR"), read over netlink: no iptables command runs.
func staleIptablesChains(c *nftables.Conn) []string {
	chains, err := c.ListChains()
	if err != nil {
		return nil
	}
	var out []string
	for _, ch := range chains {
		fam := familyName(ch.Table.Family)
		if (fam == "ip" || fam == "ip6") && slices.Contains(ownedChains[ch.Table.Name], ch.Name) && ch.Name != chainProbe {
			out = append(out, fam+" "+ch.Table.Name+" "+ch.Name)
		}
	}
	return out
}

// nftExtension names the kernel module a rule needs beyond nf_tables.
func nftExtension(r nftRule) string {
	for _, e := range slices.Backward(r.Exprs) {
		switch e.(type) {
		case *expr.TProxy:
			return "tproxy expression (nft_tproxy)"
		case *expr.Redir:
			return "redirect expression (nft_redir)"
		case *expr.NAT:
			return "dnat expression (nft_nat)"
		case *expr.Socket:
			return "socket expression (nft_socket)"
		case *expr.Fib:
			return "fib expression (nft_fib_inet)"
		case *expr.Ct:
			return "ct expression (nft_ct)"
		case *expr.Lookup:
			return "interval sets (nft_set_rbtree)"
		}
	}
	return "matches (nf_tables)"
}

// Install makes detour's table the one for o. A table already exactly so
// is left alone (installing twice is installing once); any other, such as
// one left by a killed run, is replaced in the same batch that adds the
// new one, so capture never stops half-way. Fatal problems of Check stop
// it before anything is changed. It returns whether it changed anything,
// and Check's warnings.
func (in *NFTInstaller) Install(o RuleOptions) (changed bool, warnings []Problem, err error) {
	nt, err := o.nftRules()
	if err != nil {
		return false, nil, err
	}
	warnings, err = splitProblems(in.Check(o))
	if err != nil {
		return false, warnings, err
	}
	o = o.withDefaults()
	routes := o.policyRoutes()
	if ok, _, err := in.matches(nt, routes); err == nil && ok {
		return false, warnings, in.remember(nt)
	}
	if err := in.removeRoutes(); err != nil {
		return false, warnings, fmt.Errorf("removing detour's earlier policy routes: %w", err)
	}
	rollback := func(err error) (bool, []Problem, error) {
		changed, err := rolledBack(err, in.Remove)
		return changed, warnings, err
	}
	// The routes first, so capture starts only once they are there.
	for _, pr := range routes {
		if err := in.addRoute(pr); err != nil {
			return rollback(err)
		}
	}
	c, err := nftables.New()
	if err != nil {
		return rollback(fmt.Errorf("nftables: %w", err))
	}
	t := detourTable()
	// add, delete, add: whatever detour table there was goes, in the same
	// transaction that makes the new one.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	err = addTable(c, t, nt)
	if err == nil {
		err = c.Flush()
	}
	if err != nil {
		return rollback(fmt.Errorf("installing table inet %s: %w", NFTTable, err))
	}
	return true, warnings, in.remember(nt)
}

// policyRoutes are the policy routes of o's families (TPROXY only).
func (o RuleOptions) policyRoutes() []PolicyRoute {
	if o.Mode != TProxy {
		return nil
	}
	var out []PolicyRoute
	for _, f := range o.families() {
		out = append(out, PolicyRoute{Family: f, Mark: o.TProxyMark, Table: o.Table})
	}
	return out
}

// listed is detour's table as the kernel lists it: its chains, and each
// rule decoded.
type listed struct {
	exists  bool
	sets    map[string]string // by name: type and elements, as nftScript prints them
	setList []nftSet
	chains  []*nftables.Chain
	rules   map[string][]listedRule // by chain name, in order
	raw     string                  // everything but handles, for comparing listings
}

type listedRule struct {
	comment string
	exprs   []expr.Any
}

// tableExists reports whether detour's table is there.
func tableExists() (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("listing nftables tables: %w", err)
	}
	return slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == NFTTable }), nil
}

// list reads detour's table.
func (in *NFTInstaller) list() (listed, error) {
	l := listed{rules: map[string][]listedRule{}, sets: map[string]string{}}
	exists, err := tableExists()
	if err != nil || !exists {
		return l, err
	}
	l.exists = true
	c, err := nftables.New()
	if err != nil {
		return l, fmt.Errorf("nftables: %w", err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return l, fmt.Errorf("listing the chains of table inet %s: %w", NFTTable, err)
	}
	var raw strings.Builder
	sets, err := c.GetSets(detourTable())
	if err != nil {
		return l, fmt.Errorf("listing the sets of table inet %s: %w", NFTTable, err)
	}
	for _, st := range sets {
		elems, err := c.GetSetElements(st)
		if err != nil {
			return l, fmt.Errorf("listing set %s of table inet %s: %w", st.Name, NFTTable, err)
		}
		fam := IPv4
		if st.KeyType.Bytes == 16 {
			fam = IPv6
		}
		ns := nftSet{Name: st.Name, Family: fam, Ranges: rangesOf(elems)}
		l.sets[st.Name] = setText(ns)
		l.setList = append(l.setList, ns)
		fmt.Fprintf(&raw, "set %s %s %v %v\n", st.Name, st.KeyType.Name, st.Interval, st.Constant)
		for _, e := range elems {
			fmt.Fprintf(&raw, " %x %v\n", e.Key, e.IntervalEnd)
		}
	}
	for _, ch := range chains {
		if ch.Table.Name != NFTTable {
			continue
		}
		l.chains = append(l.chains, ch)
		fmt.Fprintf(&raw, "chain %s %s %v %v %v\n", ch.Name, ch.Type, deref(ch.Hooknum), deref(ch.Priority), deref(ch.Policy))
	}
	rules, err := dumpRules(NFTTable)
	if err != nil {
		return l, fmt.Errorf("listing the rules of table inet %s: %w", NFTTable, err)
	}
	for _, r := range rules {
		l.rules[r.chain] = append(l.rules[r.chain], listedRule{r.comment, r.exprs})
		fmt.Fprintf(&raw, "rule %s %x %x\n", r.chain, r.rawExprs, r.userdata)
	}
	l.raw = raw.String()
	return l, nil
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// matches reports whether the kernel holds exactly chains and routes of
// detour's, and if not, the first difference. The kernel's listing is
// compared in nft syntax, rule by rule.
func (in *NFTInstaller) matches(nt nftTable, routes []PolicyRoute) (bool, string, error) {
	chains := nt.Chains
	l, err := in.list()
	if err != nil {
		return false, "", err
	}
	if !l.exists {
		return false, fmt.Sprintf("table inet %s missing", NFTTable), nil
	}
	if len(l.sets) != len(nt.Sets) {
		return false, fmt.Sprintf("table inet %s: %d sets, want %d", NFTTable, len(l.sets), len(nt.Sets)), nil
	}
	for _, st := range nt.Sets {
		if got, want := l.sets[st.Name], setText(st); got != want {
			return false, fmt.Sprintf("set %s is %q, want %q", st.Name, got, want), nil
		}
	}
	if len(l.chains) != len(chains) {
		return false, fmt.Sprintf("table inet %s: %d chains, want %d", NFTTable, len(l.chains), len(chains)), nil
	}
	for _, want := range chains {
		i := slices.IndexFunc(l.chains, func(c *nftables.Chain) bool { return c.Name == want.Name })
		if i < 0 {
			return false, fmt.Sprintf("table inet %s: chain %s missing", NFTTable, want.Name), nil
		}
		got := l.chains[i]
		if got.Type != want.Type || deref(got.Hooknum) != any(want.Hook) || deref(got.Priority) != any(want.Priority) {
			return false, fmt.Sprintf("table inet %s: chain %s is not %s hook %s priority %s", NFTTable, want.Name,
				want.Type, hookName(want.Hook), priorityName(want.Priority, want.Hook)), nil
		}
		rules := l.rules[want.Name]
		if len(rules) != len(want.Rules) {
			return false, fmt.Sprintf("chain %s: %d rules, want %d", want.Name, len(rules), len(want.Rules)), nil
		}
		for j, r := range want.Rules {
			if g, w := nftRuleText(nftRule{rules[j].comment, rules[j].exprs}), nftRuleText(r); g != w {
				return false, fmt.Sprintf("chain %s: rule %d is %q, want %q", want.Name, j+1, g, w), nil
			}
		}
	}
	for _, f := range []Family{IPv4, IPv6} {
		var want *PolicyRoute
		for i := range routes {
			if routes[i].Family == f {
				want = &routes[i]
			}
		}
		if ok, why, err := in.routeMatches(f, want); err != nil || !ok {
			return false, why, err
		}
	}
	return true, "", nil
}

// remember notes nt and the kernel's listing of the table for Ensure.
func (in *NFTInstaller) remember(nt nftTable) error {
	l, err := in.list()
	if err != nil {
		return err
	}
	in.want, in.seen = nt, l.raw
	return nil
}

// Ensure re-checks that the rules of o are in place, as after `nft flush
// ruleset` or a firewall reload, and installs them again if not. The cheap
// test compares the kernel's listing with the one right after install (the
// kernel rewrites what it is sent, so that is the reference). It returns
// whether it had to install, and what it found missing.
func (in *NFTInstaller) Ensure(o RuleOptions) (restored bool, missing string, err error) {
	nt, err := o.nftRules()
	if err != nil {
		return false, "", err
	}
	o = o.withDefaults()
	routes := o.policyRoutes()
	if in.seen != "" && nftScript(in.want) == nftScript(nt) {
		l, err := in.list()
		same := err == nil && l.raw == in.seen
		for _, pr := range routes {
			ok, _, err := in.routeMatches(pr.Family, &pr)
			same = same && err == nil && ok
		}
		if same {
			return false, "", nil
		}
	}
	ok, missing, err := in.matches(nt, routes)
	if err == nil && ok {
		return false, "", in.remember(nt)
	}
	if err != nil {
		missing = err.Error()
	}
	_, _, err = in.Install(o)
	return true, missing, err
}

// Remove deletes detour's table and its ip rules and routes (proto
// RouteProtocol), whatever options made them, in one batch for the table.
// Removing what is not there is not an error.
func (in *NFTInstaller) Remove() error {
	in.want, in.seen = nftTable{}, ""
	return errors.Join(removeNFTTable(true), in.removeRoutes())
}

// removeNFTTable deletes detour's table if it is there; what is in it does
// not matter. Unless strict, a ruleset that cannot be listed (a kernel
// without nftables) holds no table of detour's.
func removeNFTTable(strict bool) error {
	exists, err := tableExists()
	if err != nil && !strict {
		return nil
	}
	if err != nil || !exists {
		return err
	}
	c, err := nftables.New()
	if err == nil {
		c.DelTable(detourTable())
		err = c.Flush()
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nft delete table inet %s: %w", NFTTable, err)
	}
	return nil
}

// Show writes what of detour's the kernel holds: detour's table in nft
// syntax, then the ip rules and routes.
func (in *NFTInstaller) Show(w io.Writer) error {
	l, err := in.list()
	if err != nil {
		return err
	}
	empty := true
	if l.exists {
		var chains []nftChain
		for _, ch := range l.chains {
			nc := nftChain{Name: ch.Name, Type: ch.Type}
			if ch.Hooknum != nil {
				nc.Hook = *ch.Hooknum
			}
			if ch.Priority != nil {
				nc.Priority = *ch.Priority
			}
			for _, r := range l.rules[ch.Name] {
				nc.Rules = append(nc.Rules, nftRule{r.comment, r.exprs})
			}
			chains = append(chains, nc)
		}
		fmt.Fprint(w, nftScript(nftTable{Sets: l.setList, Chains: chains}))
		empty = false
	}
	return in.showRoutes(w, empty)
}

// A rule as dumped by the kernel (NFT_MSG_GETRULE).
type dumpedRule struct {
	chain    string
	comment  string
	exprs    []expr.Any
	rawExprs []byte
	userdata []byte
}

// dumpRules lists the rules of an inet table over netlink (`nft list table
// inet NAME`). google/nftables' own GetRules skips the tproxy and socket
// expressions, so the dump is decoded here.
func dumpRules(table string) ([]dumpedRule, error) {
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	data, err := netlink.MarshalAttributes([]netlink.Attribute{{Type: unix.NFTA_RULE_TABLE, Data: []byte(table + "\x00")}})
	if err != nil {
		return nil, err
	}
	msgs, err := conn.Execute(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETRULE),
			Flags: netlink.Request | netlink.Dump,
		},
		Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, data...),
	})
	if err != nil {
		return nil, err
	}
	var out []dumpedRule
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		r, err := decodeRule(m.Data[4:])
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

func decodeRule(b []byte) (dumpedRule, error) {
	var r dumpedRule
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return r, err
	}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_RULE_CHAIN:
			r.chain = ad.String()
		case unix.NFTA_RULE_USERDATA:
			r.userdata = ad.Bytes()
			if c, ok := userdata.GetString(r.userdata, userdata.TypeComment); ok {
				r.comment = c
			}
		case unix.NFTA_RULE_EXPRESSIONS:
			r.rawExprs = ad.Bytes()
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					e, err := decodeExpr(nad.Bytes())
					if err != nil {
						return err
					}
					r.exprs = append(r.exprs, e)
				}
				return nil
			})
		}
	}
	return r, ad.Err()
}

// decodeExpr decodes one NFTA_LIST_ELEM of a rule's expressions.
func decodeExpr(b []byte) (expr.Any, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var name string
	var data []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_EXPR_NAME:
			name = ad.String()
		case unix.NFTA_EXPR_DATA:
			data = ad.Bytes()
		}
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	var e expr.Any
	switch name {
	case "meta":
		e = &expr.Meta{}
	case "cmp":
		e = &expr.Cmp{}
	case "payload":
		e = &expr.Payload{}
	case "bitwise":
		e = &expr.Bitwise{}
	case "lookup":
		e = &expr.Lookup{}
	case "range":
		e = &expr.Range{}
	case "fib":
		e = &expr.Fib{}
	case "ct":
		e = &expr.Ct{}
	case "socket":
		e = &expr.Socket{}
	case "redir":
		e = &expr.Redir{}
	case "nat":
		e = &expr.NAT{}
	case "tproxy":
		return decodeTProxy(data)
	case "immediate":
		imm := &expr.Immediate{}
		if err := expr.Unmarshal(unix.NFPROTO_INET, data, imm); err != nil {
			return nil, err
		}
		if imm.Register != unix.NFT_REG_VERDICT || len(imm.Data) > 0 {
			return imm, nil
		}
		e = &expr.Verdict{}
	default:
		return &unknownExpr{name: name}, nil
	}
	if err := expr.Unmarshal(unix.NFPROTO_INET, data, e); err != nil {
		return nil, fmt.Errorf("decoding a %s expression: %w", name, err)
	}
	return e, nil
}

// decodeTProxy decodes a tproxy expression; the library's own decoder
// reads the 32-bit family attribute as 8 bits and fails.
func decodeTProxy(b []byte) (expr.Any, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	e := &expr.TProxy{TableFamily: unix.NFPROTO_INET}
	for ad.Next() {
		switch ad.Type() {
		case expr.NFTA_TPROXY_FAMILY:
			e.Family = byte(ad.Uint32())
		case expr.NFTA_TPROXY_REG_ADDR:
			e.RegAddr = ad.Uint32()
		case expr.NFTA_TPROXY_REG_PORT:
			e.RegPort = ad.Uint32()
		}
	}
	return e, ad.Err()
}

// unknownExpr stands for an expression detour never makes; it prints as
// <name> and makes a listing differ from anything detour wants.
type unknownExpr struct {
	expr.Any
	name string
}
