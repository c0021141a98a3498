package tunnel

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// ActionKind is what a route does with a connection.
type ActionKind uint8

const (
	ActionDirect ActionKind = iota // connect to the original destination
	ActionProxy                    // connect through an upstream group
	ActionReject                   // close the client at once
)

// NameMode says what a proxied connection asks its upstream for when a host
// name was sniffed. The name comes from the client, which can put any name in
// front of any IP, so the operator chooses how far to trust it.
type NameMode uint8

const (
	// Override asks the upstream for sniffed-name:port (it resolves the name).
	Override NameMode = iota
	// RouteOnly uses the name for matching rules but asks for the original IP.
	RouteOnly
	// Verify asks for the name only if it resolves to the original IP, else
	// for the IP (and logs it).
	Verify
)

// ParseNameMode parses "override", "route-only" or "verify".
func ParseNameMode(s string) (NameMode, error) {
	switch s {
	case "override", "":
		return Override, nil
	case "route-only":
		return RouteOnly, nil
	case "verify":
		return Verify, nil
	}
	return 0, fmt.Errorf("%q is not a name mode (want override, route-only or verify)", s)
}

func (m NameMode) String() string {
	switch m {
	case RouteOnly:
		return "route-only"
	case Verify:
		return "verify"
	}
	return "override"
}

// Action is what a matching rule (or the default) does.
type Action struct {
	Kind  ActionKind
	Group *upstream.Group // for Proxy
	Name  NameMode        // for Proxy
}

// String names the action in logs: direct, reject, or the group's name.
func (a Action) String() string {
	switch a.Kind {
	case ActionReject:
		return "reject"
	case ActionProxy:
		if a.Group != nil {
			return a.Group.Name
		}
		return "proxy"
	}
	return "direct"
}

// Network is a transport a rule may be limited to.
type Network uint8

// The networks a rule can name; a rule's Networks is a set of them.
const (
	NetTCP Network = 1 << iota
	NetUDP
)

// ParseNetwork parses "tcp" or "udp".
func ParseNetwork(s string) (Network, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "tcp":
		return NetTCP, nil
	case "udp":
		return NetUDP, nil
	}
	return 0, fmt.Errorf("%q is not a network (want tcp or udp)", s)
}

func (n Network) String() string {
	if n == NetUDP {
		return "udp"
	}
	return "tcp"
}

// Rule is one routing rule. It matches when every condition it sets holds;
// a condition with several entries holds when any entry does. Domain
// conditions never hold for a connection whose host is unknown.
type Rule struct {
	Domains  []string // exact host names
	Suffixes []string // "example.com" matches example.com and every name under it
	Keywords []string // substrings of the host name
	CIDRs    []netip.Prefix
	Ports    []ports.Range
	Protos   []sniff.Proto
	// Inbounds limits the rule to connections that came in this way
	// (transparent: redirected by the kernel; proxy: the explicit proxy
	// port). Empty means any.
	Inbounds []Inbound
	// Networks limits the rule to TCP connections, UDP sessions or both
	// (NetTCP|NetUDP); zero means both.
	Networks Network
	Action   Action
}

// Inbound is how a connection reached detour.
type Inbound uint8

const (
	Transparent  Inbound = iota // redirected by the kernel (REDIRECT, TPROXY)
	ProxyInbound                // the explicit proxy port (HTTP, CONNECT, SOCKS)
)

func (i Inbound) String() string {
	if i == ProxyInbound {
		return "proxy"
	}
	return "transparent"
}

// ParseInbound parses "transparent" or "proxy".
func ParseInbound(s string) (Inbound, error) {
	switch s {
	case "transparent":
		return Transparent, nil
	case "proxy":
		return ProxyInbound, nil
	}
	return 0, fmt.Errorf("%q is not an inbound (want transparent or proxy)", s)
}

// Router is an ordered rule list: the first matching rule wins, and Default
// applies when none does. It is not changed after it is built; a reload
// builds a new one.
type Router struct {
	Rules   []Rule
	Default Action
}

// Route picks the action for a connection to dst whose first bytes said
// proto and host ("" when unknown). It returns the index of the matching rule,
// or -1 for the default.
func (r *Router) Route(host string, proto sniff.Proto, dst netip.AddrPort) (Action, int) {
	return r.RouteFor(Transparent, host, proto, dst)
}

// RouteFor is Route for a connection that came in through in. On the proxy
// port dst's address is not valid when the client asked for a name: CIDR
// conditions then do not hold.
func (r *Router) RouteFor(in Inbound, host string, proto sniff.Proto, dst netip.AddrPort) (Action, int) {
	return r.route(NetTCP, in, host, proto, dst)
}

// RouteUDP is Route for a UDP session (captured by the kernel): rules
// limited to TCP are passed over.
func (r *Router) RouteUDP(host string, proto sniff.Proto, dst netip.AddrPort) (Action, int) {
	return r.route(NetUDP, Transparent, host, proto, dst)
}

func (r *Router) route(network Network, in Inbound, host string, proto sniff.Proto, dst netip.AddrPort) (Action, int) {
	if r == nil {
		return Action{}, -1
	}
	for i := range r.Rules {
		if r.Rules[i].onNetwork(network) && r.Rules[i].matchInbound(in) && r.Rules[i].match(host, proto, dst) {
			return r.Rules[i].Action, i
		}
	}
	return r.Default, -1
}

// RouteByAddr says what Route will pick for dst before the client's first
// bytes are read, when it can. final is true when the rules decide on dst
// alone: the first rule whose address conditions hold for dst sets none on
// the host or protocol (or no rule can hold, and the default applies). A rule
// whose CIDRs or ports exclude dst cannot match whatever was sniffed and is
// passed over. When final is false, the route may depend on what the client
// sends, and the returned Action means nothing.
func (r *Router) RouteByAddr(dst netip.AddrPort) (a Action, final bool) {
	if r == nil {
		return Action{}, true
	}
	for i := range r.Rules {
		ru := &r.Rules[i]
		if !ru.onNetwork(NetTCP) || !ru.matchInbound(Transparent) || !ru.matchAddr(dst) {
			continue
		}
		if ru.needsSniff() {
			return Action{}, false
		}
		return ru.Action, true
	}
	return r.Default, true
}

func (ru *Rule) match(host string, proto sniff.Proto, dst netip.AddrPort) bool {
	if len(ru.Domains)+len(ru.Suffixes)+len(ru.Keywords) > 0 {
		if host == "" || !ru.matchHost(host) {
			return false
		}
	}
	if !ru.matchAddr(dst) {
		return false
	}
	if len(ru.Protos) > 0 {
		ok := false
		for _, p := range ru.Protos {
			if p == proto {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// hasCIDRs reports whether a rule that applies to inbound in sets CIDR
// conditions (the proxy port then resolves names before routing).
func (r *Router) hasCIDRs(in Inbound) bool {
	if r == nil {
		return false
	}
	for i := range r.Rules {
		if len(r.Rules[i].CIDRs) > 0 && r.Rules[i].matchInbound(in) {
			return true
		}
	}
	return false
}

func (ru *Rule) matchInbound(in Inbound) bool {
	if len(ru.Inbounds) == 0 {
		return true
	}
	for _, i := range ru.Inbounds {
		if i == in {
			return true
		}
	}
	return false
}

// onNetwork: the rule applies to network.
func (ru *Rule) onNetwork(n Network) bool { return ru.Networks == 0 || ru.Networks&n != 0 }

// needsSniff reports whether the rule sets a condition on what the client
// sends first (host name or protocol).
func (ru *Rule) needsSniff() bool {
	return len(ru.Domains)+len(ru.Suffixes)+len(ru.Keywords)+len(ru.Protos) > 0
}

// matchAddr: the conditions on the destination (CIDRs and ports) hold.
func (ru *Rule) matchAddr(dst netip.AddrPort) bool {
	if len(ru.CIDRs) > 0 {
		ip, ok := dst.Addr().Unmap(), false
		for _, p := range ru.CIDRs {
			if p.Contains(ip) {
				ok = true
				break
			}
		}
		if !ok {
			return false
		}
	}
	return len(ru.Ports) == 0 || ports.AnyContains(ru.Ports, dst.Port())
}

// matchHost: the domain conditions together hold when any of them does
// (exact, suffix or keyword), as in the rule files of other proxies.
func (ru *Rule) matchHost(host string) bool {
	for _, d := range ru.Domains {
		if host == d {
			return true
		}
	}
	for _, s := range ru.Suffixes {
		if host == s || (len(host) > len(s) && strings.HasSuffix(host, s) && host[len(host)-len(s)-1] == '.') {
			return true
		}
	}
	for _, k := range ru.Keywords {
		if strings.Contains(host, k) {
			return true
		}
	}
	return false
}

// NormalizeDomain lower-cases a domain given in a rule and drops a trailing
// dot and a leading "*." or ".", so "*.Example.COM." becomes "example.com".
func NormalizeDomain(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimSuffix(s, ".")
	s = strings.TrimPrefix(s, "*.")
	return strings.TrimPrefix(s, ".")
}
