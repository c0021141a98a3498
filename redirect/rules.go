package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/detour-proxy/detour/ports"
)

// This file turns RuleOptions into the exact kernel rules detour needs: a
// pure function, so every option's effect is unit-tested without a kernel.
// Applying them is rules_linux.go's job.

// RuleOptions says which TCP connections the kernel hands to detour. With
// Port set, the zero value captures all TCP of both families arriving on any
// interface, in REDIRECT mode, except traffic to the default bypass list.
type RuleOptions struct {
	// Mode picks REDIRECT (nat table) or TPROXY (mangle table and policy
	// routing).
	Mode Mode
	// ListenIP is the address detour listens on. The zero Addr and "::"
	// (dual-stack) mean both families; "0.0.0.0" IPv4 only. A specific
	// address limits capture to its family and is where connections are
	// sent (DNAT instead of REDIRECT, TPROXY --on-ip).
	ListenIP netip.Addr
	// Port is detour's listening port. Required.
	Port uint16
	// Mark is the socket mark on detour's own outbound connections, which
	// are never captured. Zero means DefaultMark.
	Mark uint32
	// TProxyMark is the packet mark TPROXY sets and policy routing matches
	// (as MARK/MARK). It must share no bit with Mark, or detour's own
	// packets would be routed back to itself. Zero means DefaultTProxyMark.
	TProxyMark uint32
	// Table is the policy-routing table for TPROXY. Zero means DefaultTable.
	Table int
	// Interfaces limits capture to traffic arriving on these interfaces
	// (iptables -i syntax, "eth+" matches a prefix). Nil means any.
	Interfaces []string
	// Sources limits capture to these source networks. Nil means any; a
	// family with no source listed while others are is not captured.
	Sources []netip.Prefix
	// Ports limits capture to these destination ports. Nil means all.
	Ports []ports.Range
	// Bypass lists destinations never captured. Nil means DefaultBypass; a
	// non-nil empty slice means none (beyond local addresses, which are
	// always exempt).
	Bypass []netip.Prefix
	// NoIPv6 skips ip6tables and IPv6 policy routing.
	NoIPv6 bool
	// Output also captures connections made by the gateway's own processes
	// (nat OUTPUT for REDIRECT; mangle OUTPUT mark and reroute to lo for
	// TPROXY).
	Output bool
	// UDP also captures UDP (TPROXY mode only; REDIRECT has no UDP data
	// path): the same exemptions, interfaces, sources and ports, with the
	// TPROXY target and the same mark and policy route. False captures TCP
	// only. `detour run --udp` sets it once the UDP data path serves.
	UDP bool
}

// Defaults for RuleOptions' zero fields.
const (
	// DefaultTProxyMark shares no bit with DefaultMark.
	DefaultTProxyMark = 0x100
	// DefaultTable is the policy-routing table TPROXY mode uses.
	DefaultTable = 100
)

// Names of detour's own chains. Nothing else is ever created, flushed or
// deleted; the built-in chains only get one jump rule each.
const (
	ChainNAT          = "DETOUR"            // nat, from PREROUTING (REDIRECT mode)
	ChainNATOutput    = "DETOUR_OUTPUT"     // nat, from OUTPUT (REDIRECT --output)
	ChainTProxy       = "DETOUR_TPROXY"     // mangle, from PREROUTING (TPROXY mode)
	ChainTProxyOutput = "DETOUR_TPROXY_OUT" // mangle, from OUTPUT (TPROXY --output)
	chainProbe        = "DETOUR_PROBE"      // scratch chain of the readiness probe
)

// ownedChains are the chains detour removes wherever it finds them, so that
// a stale set from any earlier run is replaced.
var ownedChains = map[string][]string{
	"nat":    {ChainNAT, ChainNATOutput, chainProbe},
	"mangle": {ChainTProxy, ChainTProxyOutput, chainProbe},
}

// builtinHooks are the built-in chains where detour's jump rules may be.
var builtinHooks = []string{"PREROUTING", "OUTPUT"}

// CommentPrefix starts the comment (-m comment) of every rule detour makes;
// a rule in a built-in chain carrying it is detour's and is removed.
const CommentPrefix = "detour:"

// Rule comments; each names why the rule is there.
const (
	commentJump        = CommentPrefix + "jump"
	commentEstablished = CommentPrefix + "established"
	commentOwnMark     = CommentPrefix + "own-mark"
	commentLocal       = CommentPrefix + "local"
	commentBypass      = CommentPrefix + "bypass"
	commentCapture     = CommentPrefix + "capture"
	commentOutput      = CommentPrefix + "output"
	commentReply       = CommentPrefix + "reply"
	commentProbe       = CommentPrefix + "probe"
)

// RouteProtocol is the routing protocol number ("proto 45" in `ip rule`
// and `ip route`) on detour's policy rules and routes: the netlink twin of a
// rule comment, by which they are found and removed.
const RouteProtocol = 45

// Family is an IP family: iptables or ip6tables.
type Family uint8

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

// Command is the iptables command of the family.
func (f Family) Command() string {
	if f == IPv6 {
		return "ip6tables"
	}
	return "iptables"
}

func (f Family) has(a netip.Addr) bool { return a.Is4() == (f == IPv4) }

// Rule is one iptables rule: the arguments after "-A CHAIN".
type Rule []string

// Comment is the rule's -m comment text.
func (r Rule) Comment() string {
	if i := slices.Index(r, "--comment"); i >= 0 && i+1 < len(r) {
		return r[i+1]
	}
	return ""
}

// Chain is one of detour's chains, the built-in chain that jumps to it, and
// its rules in order.
type Chain struct {
	Table string
	Name  string
	Hook  string // PREROUTING or OUTPUT
	Rules []Rule
	// UDP: the chain captures UDP too, so its jump takes every protocol.
	UDP bool
}

// Jump is the single rule in the hook that sends TCP (and with UDP, every
// packet) to the chain; it is inserted first in the hook.
func (c Chain) Jump() Rule {
	if c.UDP {
		return Rule{"-m", "comment", "--comment", commentJump, "-j", c.Name}
	}
	return Rule{"-p", "tcp", "-m", "comment", "--comment", commentJump, "-j", c.Name}
}

// PolicyRoute is TPROXY's policy routing: packets marked Mark/Mark are
// delivered locally (`ip rule add fwmark M/M lookup T` and
// `ip route add local 0.0.0.0/0 dev lo table T`, or ::/0).
type PolicyRoute struct {
	Family Family
	Mark   uint32
	Table  int
}

// RuleSet is everything detour installs for one family.
type RuleSet struct {
	Family Family
	Chains []Chain
	Route  *PolicyRoute // TPROXY only
}

// ParsePrefix parses a CIDR, or a bare address as a one-address network,
// and returns it masked ("10.1.2.3/8" is 10.0.0.0/8).
func ParsePrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR or an IP address", s)
		}
		return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR", s)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%q: an IPv4-mapped CIDR matches nothing; write the IPv4 one", s)
	}
	return p.Masked(), nil
}

// DefaultBypass returns the destinations detour never captures unless told
// otherwise: this-network, private, shared, loopback, link-local,
// benchmarking, documentation, multicast and reserved ranges (RFC 6890),
// for both families. Note that it holds 198.18.0.0/15 and fd00::/8.
func DefaultBypass() []netip.Prefix {
	list := []string{
		"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
		"172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
		"198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
		"::/128", "::1/128", "::ffff:0:0/96", "100::/64", "2001:db8::/32",
		"fc00::/7", "fe80::/10", "ff00::/8",
	}
	out := make([]netip.Prefix, len(list))
	for i, s := range list {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// OptionError is an invalid RuleOptions field.
type OptionError struct {
	Field string // the RuleOptions field, e.g. "TProxyMark"
	Msg   string
}

func (e *OptionError) Error() string { return e.Field + ": " + e.Msg }

func optErr(field, format string, args ...any) error {
	return &OptionError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// withDefaults fills in the zero fields.
func (o RuleOptions) withDefaults() RuleOptions {
	if o.Mark == 0 {
		o.Mark = DefaultMark
	}
	if o.TProxyMark == 0 {
		o.TProxyMark = DefaultTProxyMark
	}
	if o.Table == 0 {
		o.Table = DefaultTable
	}
	if o.Bypass == nil {
		o.Bypass = DefaultBypass()
	}
	o.ListenIP = o.ListenIP.Unmap()
	return o
}

// Validate reports the first invalid field as an *OptionError.
func (o RuleOptions) Validate() error {
	o = o.withDefaults()
	if o.Mode != Redirect && o.Mode != TProxy {
		return optErr("Mode", "unknown mode %v", o.Mode)
	}
	if o.Port == 0 {
		return optErr("Port", "no listening port")
	}
	if o.UDP && o.Mode != TProxy {
		return optErr("UDP", "UDP is captured only in tproxy mode (REDIRECT has no UDP data path)")
	}
	if o.Mode == TProxy {
		if o.Mark&o.TProxyMark != 0 {
			return optErr("TProxyMark", "%#x shares bits %#x with the socket mark %#x: detour's own packets would be routed back to it",
				o.TProxyMark, o.Mark&o.TProxyMark, o.Mark)
		}
		// 253-255 are the kernel's default, main and local tables.
		if o.Table < 1 || int64(o.Table) > 0xFFFFFFFF || (o.Table >= 253 && o.Table <= 255) {
			return optErr("Table", "%d is not a routing table number from 1 to 4294967295 other than 253, 254 and 255 (default, main, local)", o.Table)
		}
	}
	for _, name := range o.Interfaces {
		if err := checkInterface(name); err != nil {
			return optErr("Interfaces", "%v", err)
		}
	}
	for _, p := range o.Ports {
		if p.Lo == 0 || p.Hi < p.Lo {
			return optErr("Ports", "bad port range %d-%d", p.Lo, p.Hi)
		}
	}
	if o.ListenIP.IsLoopback() {
		return optErr("Port", "detour listens on the loopback address %s, which connections from other hosts cannot be sent to; listen on :%d or a LAN address", o.ListenIP, o.Port)
	}
	if ip := o.ListenIP; ip.IsValid() && o.NoIPv6 && ip.Is6() && !ip.IsUnspecified() {
		return optErr("NoIPv6", "detour listens on the IPv6 address %s only: with IPv6 off there is nothing to capture", ip)
	}
	if len(o.families()) == 0 {
		return optErr("Sources", "no source of a captured family (IPv6 is off)")
	}
	return nil
}

// checkInterface accepts what iptables -i accepts: at most 15 bytes, no
// '/', no blank; a trailing '+' matches a prefix.
func checkInterface(name string) error {
	switch {
	case name == "" || len(name) > 15:
		return fmt.Errorf("interface name %q must be 1 to 15 characters", name)
	case strings.ContainsAny(name, "/ \t\n\"'"):
		return fmt.Errorf("interface name %q contains a character interfaces cannot have", name)
	}
	return nil
}

// families lists the families captured: those the listener serves, without
// IPv6 when it is off, and without a family the source list leaves out.
func (o RuleOptions) families() []Family {
	var out []Family
	for _, f := range []Family{IPv4, IPv6} {
		if f == IPv6 && o.NoIPv6 {
			continue
		}
		if ip := o.ListenIP; ip.IsValid() && (ip.Is4() || !ip.IsUnspecified()) && !f.has(ip) {
			continue // 0.0.0.0 or a specific address serves one family
		}
		if len(o.Sources) > 0 && !slices.ContainsFunc(o.Sources, func(p netip.Prefix) bool { return f.has(p.Addr()) }) {
			continue
		}
		out = append(out, f)
	}
	return out
}

// RuleSets returns the rules detour installs for o, one set per family.
func (o RuleOptions) RuleSets() ([]RuleSet, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o = o.withDefaults()
	var sets []RuleSet
	for _, f := range o.families() {
		sets = append(sets, o.ruleSet(f))
	}
	return sets, nil
}

func (o RuleOptions) ruleSet(f Family) RuleSet {
	rs := RuleSet{Family: f}
	var exempt []Rule
	exempt = append(exempt,
		Rule{"-m", "mark", "--mark", hex(o.Mark), "-m", "comment", "--comment", commentOwnMark, "-j", "RETURN"},
		Rule{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", commentLocal, "-j", "RETURN"})
	for _, p := range o.Bypass {
		if f.has(p.Addr()) {
			exempt = append(exempt, Rule{"-d", p.String(), "-m", "comment", "--comment", commentBypass, "-j", "RETURN"})
		}
	}
	target := o.target(f)
	var capture []Rule
	for _, in := range orAny(o.Interfaces) {
		for _, src := range orAny(o.sources(f)) {
			for _, proto := range o.protocols() {
				for _, ports := range o.portMatches() {
					var r Rule
					if in != "" {
						r = append(r, "-i", in)
					}
					if src != "" {
						r = append(r, "-s", src)
					}
					r = append(r, "-p", proto)
					if o.Mode == TProxy && proto == "tcp" {
						// A connection's first packet; the rest come in
						// through the established rule (see below).
						r = append(r, "--syn")
					}
					r = append(r, ports...)
					r = append(r, "-m", "comment", "--comment", commentCapture)
					capture = append(capture, append(r, target...))
				}
			}
		}
	}

	switch o.Mode {
	case Redirect:
		rs.Chains = append(rs.Chains, Chain{Table: "nat", Name: ChainNAT, Hook: "PREROUTING",
			Rules: concat(exempt, capture)})
		if o.Output {
			var out []Rule
			for _, ports := range o.portMatches() {
				r := append(Rule{"-p", "tcp"}, ports...)
				r = append(r, "-m", "comment", "--comment", commentOutput)
				out = append(out, append(r, target...))
			}
			rs.Chains = append(rs.Chains, Chain{Table: "nat", Name: ChainNATOutput, Hook: "OUTPUT",
				Rules: concat(exempt, out)})
		}
	case TProxy:
		mark := hex(o.TProxyMark) + "/" + hex(o.TProxyMark)
		// Packets of connections detour already holds: mark them for the
		// policy route and skip the rest (the kernel's TPROXY doc's
		// "-m socket" shortcut). Not SYNs: a client that opens a new
		// connection from the source port of one detour closed within the
		// last minute matches detour's socket in TIME_WAIT, which has no
		// listener behind it on the original destination and answers with
		// a bare ACK; the client resets and retries after its SYN timeout.
		// The TPROXY target hands such a SYN to detour's listener instead.
		established := []Rule{
			{"-p", "tcp", "!", "--syn", "-m", "socket", "--transparent", "-m", "comment", "--comment", commentEstablished, "-j", "MARK", "--set-xmark", mark},
			{"-p", "tcp", "!", "--syn", "-m", "socket", "--transparent", "-m", "comment", "--comment", commentEstablished, "-j", "RETURN"},
		}
		// mangle sees every packet, not only a connection's first as nat
		// does: the replies of connections not captured (forwarded to a
		// server behind the client interface, to a bypassed network) must
		// pass too. For TCP the capture takes only SYNs, which no reply
		// is, and the established rule only packets of detour's own
		// sockets, so TCP needs no connection tracking: the conntrack
		// match would turn it on for every packet the gateway forwards
		// (measured: a sixth of the machine's CPU per connection through
		// an upstream). UDP has no SYN, and --output marks detour's own
		// replies unless told apart, so those two need it.
		var replies []Rule
		if o.UDP || o.Output {
			replies = []Rule{{"-m", "conntrack", "--ctdir", "REPLY", "-m", "comment", "--comment", commentReply, "-j", "RETURN"}}
		}
		var fromLo []Rule
		if o.Output {
			// The gateway's own connections, marked in OUTPUT and rerouted
			// to lo by the policy route, come back in here.
			for _, proto := range o.protocols() {
				for _, ports := range o.portMatches() {
					r := Rule{"-i", "lo", "-p", proto, "-m", "mark", "--mark", mark}
					r = append(r, ports...)
					r = append(r, "-m", "comment", "--comment", commentOutput)
					fromLo = append(fromLo, append(r, target...))
				}
			}
		}
		rs.Chains = append(rs.Chains, Chain{Table: "mangle", Name: ChainTProxy, Hook: "PREROUTING",
			Rules: concat(established, replies, exempt, fromLo, capture), UDP: o.UDP})
		if o.Output {
			// What detour's transparent sockets send to the clients it
			// accepted is the reply direction of the client's connection:
			// marking it would route it back to lo instead of the client.
			var out []Rule
			for _, proto := range o.protocols() {
				for _, ports := range o.portMatches() {
					r := append(Rule{"-p", proto}, ports...)
					r = append(r, "-m", "comment", "--comment", commentOutput, "-j", "MARK", "--set-xmark", mark)
					out = append(out, r)
				}
			}
			rs.Chains = append(rs.Chains, Chain{Table: "mangle", Name: ChainTProxyOutput, Hook: "OUTPUT",
				Rules: concat(replies, exempt, out), UDP: o.UDP})
		}
		rs.Route = &PolicyRoute{Family: f, Mark: o.TProxyMark, Table: o.Table}
	}
	return rs
}

// target is the capture rule's action: where connections go.
func (o RuleOptions) target(f Family) Rule {
	specific := o.ListenIP.IsValid() && !o.ListenIP.IsUnspecified()
	port := strconv.Itoa(int(o.Port))
	switch {
	case o.Mode == TProxy && specific:
		return Rule{"-j", "TPROXY", "--on-port", port, "--on-ip", o.ListenIP.String(),
			"--tproxy-mark", hex(o.TProxyMark) + "/" + hex(o.TProxyMark)}
	case o.Mode == TProxy:
		return Rule{"-j", "TPROXY", "--on-port", port, "--tproxy-mark", hex(o.TProxyMark) + "/" + hex(o.TProxyMark)}
	case specific:
		// REDIRECT would send connections to the receiving interface's
		// primary address, where a listener on one address is not.
		return Rule{"-j", "DNAT", "--to-destination", netip.AddrPortFrom(o.ListenIP, o.Port).String()}
	}
	return Rule{"-j", "REDIRECT", "--to-ports", port}
}

// protocols are the transport protocols captured: TCP, and UDP with o.UDP.
func (o RuleOptions) protocols() []string {
	if o.UDP {
		return []string{"tcp", "udp"}
	}
	return []string{"tcp"}
}

func (o RuleOptions) sources(f Family) []string {
	var out []string
	for _, p := range o.Sources {
		if f.has(p.Addr()) {
			out = append(out, p.String())
		}
	}
	return out
}

// portMatches returns the multiport matches covering o.Ports (a multiport
// match holds at most 15 ports, a range counting as two), or one empty
// match for all ports.
func (o RuleOptions) portMatches() [][]string {
	if len(o.Ports) == 0 {
		return [][]string{nil}
	}
	var out [][]string
	var list []string
	slots := 0
	flush := func() {
		out = append(out, []string{"-m", "multiport", "--dports", strings.Join(list, ",")})
		list, slots = nil, 0
	}
	for _, p := range o.Ports {
		n, s := 1, strconv.Itoa(int(p.Lo))
		if p.Hi != p.Lo {
			n, s = 2, fmt.Sprintf("%d:%d", p.Lo, p.Hi)
		}
		if slots+n > 15 {
			flush()
		}
		list, slots = append(list, s), slots+n
	}
	flush()
	return out
}

func orAny(list []string) []string {
	if len(list) == 0 {
		return []string{""}
	}
	return list
}

func concat(parts ...[]Rule) []Rule {
	var out []Rule
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func hex(v uint32) string { return fmt.Sprintf("%#x", v) }

// Commands returns rs as the equivalent shell commands, in the order they
// are applied: chains and their rules, the policy route, then the jumps.
func (rs RuleSet) Commands() []string {
	ipt := rs.Family.Command()
	var out []string
	for _, c := range rs.Chains {
		out = append(out, fmt.Sprintf("%s -t %s -N %s", ipt, c.Table, c.Name))
		for _, r := range c.Rules {
			out = append(out, fmt.Sprintf("%s -t %s -A %s %s", ipt, c.Table, c.Name, shellJoin(r)))
		}
	}
	if rt := rs.Route; rt != nil {
		out = append(out, rt.Commands()...)
	}
	for _, c := range rs.Chains {
		out = append(out, fmt.Sprintf("%s -t %s -I %s 1 %s", ipt, c.Table, c.Hook, shellJoin(c.Jump())))
	}
	return out
}

// Commands returns the policy route as ip commands.
func (rt PolicyRoute) Commands() []string {
	ip, all := "ip", "0.0.0.0/0"
	if rt.Family == IPv6 {
		ip, all = "ip -6", "::/0"
	}
	m := hex(rt.Mark)
	return []string{
		fmt.Sprintf("%s rule add fwmark %s/%s lookup %d proto %d", ip, m, m, rt.Table, RouteProtocol),
		fmt.Sprintf("%s route add local %s dev lo table %d proto %d", ip, all, rt.Table, RouteProtocol),
	}
}

func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\"'\\$") {
			a = strconv.Quote(a)
		}
		q[i] = a
	}
	return strings.Join(q, " ")
}

// splitRule splits a line of `iptables -S` into arguments: fields separated
// by blanks, "double quoted" with backslash escapes.
func splitRule(line string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inField, quoted := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case quoted && c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case quoted && c == '"':
			quoted = false
		case quoted:
			cur.WriteByte(c)
		case c == '"':
			quoted, inField = true, true
		case c == ' ' || c == '\t':
			if inField {
				out = append(out, cur.String())
				cur.Reset()
				inField = false
			}
		default:
			cur.WriteByte(c)
			inField = true
		}
	}
	if quoted {
		return nil, errors.New("unterminated quote in " + strconv.Quote(line))
	}
	if inField {
		out = append(out, cur.String())
	}
	return out, nil
}

// ownedRule reports whether a line of `iptables -S CHAIN` is a rule detour
// made, and returns its arguments after "-A CHAIN".
func ownedRule(line string) (Rule, bool) {
	if !strings.HasPrefix(line, "-A ") || !strings.Contains(line, CommentPrefix) {
		return nil, false
	}
	args, err := splitRule(line)
	if err != nil || len(args) < 2 {
		return nil, false
	}
	r := Rule(args[2:])
	if !strings.HasPrefix(r.Comment(), CommentPrefix) {
		return nil, false
	}
	return r, true
}
