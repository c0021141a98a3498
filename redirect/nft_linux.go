//go:build linux

package redirect

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/detour-proxy/detour/ports"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// This file turns RuleOptions into the nftables rules of detour's one table,
// `inet detour`, as netlink expressions: a pure function, like RuleSets for
// iptables. nftRender (nftshow_linux.go) prints expressions in nft syntax,
// and applying them is nftinstall_linux.go's job.

// Names of the chains in detour's table (not nft keywords such as
// "redirect" or "tproxy", so that a script of them parses).
const (
	nftChainRedirect       = "nat_prerouting"    // nat prerouting (REDIRECT mode)
	nftChainRedirectOutput = "nat_output"        // nat output (REDIRECT --output)
	nftChainTProxy         = "mangle_prerouting" // filter prerouting at mangle priority (TPROXY)
	nftChainTProxyOutput   = "mangle_output"     // route output at mangle priority (TPROXY --output)
)

// nftChain is one base chain of detour's table and its rules in order.
type nftChain struct {
	Name     string
	Type     nftables.ChainType
	Hook     nftables.ChainHook
	Priority nftables.ChainPriority
	Rules    []nftRule
}

// nftSet is a constant interval set of addresses of one family: the
// bypass list, looked up in one rule instead of a rule per network.
type nftSet struct {
	Name   string
	Family Family
	Ranges []addrRange // sorted, merged
}

// addrRange is an inclusive range of addresses.
type addrRange struct{ Lo, Hi netip.Addr }

// nftTable is everything in detour's table.
type nftTable struct {
	Sets   []nftSet
	Chains []nftChain
}

// nftRule is one rule: its comment ("detour:capture") and expressions.
type nftRule struct {
	Comment string
	Exprs   []expr.Any
}

// nftRules returns detour's nftables table for o, or o's first invalid
// field.
func (o RuleOptions) nftRules() (nftTable, error) {
	if err := o.Validate(); err != nil {
		return nftTable{}, err
	}
	o = o.withDefaults()
	fams := o.families()
	var exempt []nftRule
	exempt = append(exempt,
		nftRule{commentOwnMark, cat(metaIs(expr.MetaKeyMARK, native32(o.Mark)), verdict(expr.VerdictReturn))},
		nftRule{commentLocal, cat(fibLocal(), verdict(expr.VerdictReturn))})
	var sets []nftSet
	for _, f := range fams {
		var list []netip.Prefix
		for _, p := range o.Bypass {
			if f.has(p.Addr()) {
				list = append(list, p)
			}
		}
		if len(list) == 0 {
			continue
		}
		set := nftSet{Name: "bypass" + strings.TrimPrefix(f.String(), "ipv"), Family: f, Ranges: mergeRanges(list)}
		sets = append(sets, set)
		exempt = append(exempt, nftRule{commentBypass, cat(nfproto(f), addrLoad(f, dst),
			[]expr.Any{&expr.Lookup{SourceRegister: 1, SetName: set.Name}}, verdict(expr.VerdictReturn))})
	}
	// The capture rules: the family, interface, source, protocol and port
	// matches, then the action; a rule per combination, as for iptables.
	// own: the chains that see the gateway's own connections, which match
	// no interface or source.
	// capture's rules: own, the gateway's own connections (no interface or
	// source); syn, TCP's takes a connection's first packet only.
	capture := func(comment string, own, syn bool, head []expr.Any, action func(Family) []expr.Any) []nftRule {
		var out []nftRule
		for _, f := range fams {
			ifaces, srcs := orAny(o.Interfaces), orAnyPrefix(o.sourcePrefixes(f))
			if own {
				ifaces, srcs = orAny(nil), orAnyPrefix(nil)
			}
			for _, in := range ifaces {
				for _, src := range srcs {
					for _, proto := range o.protocols() {
						for _, pr := range orAnyPort(o.Ports) {
							e := cat(nfproto(f), head)
							if in != "" {
								e = cat(e, iifname(in))
							}
							if src.IsValid() {
								e = cat(e, addrIn(f, srcAddr, src))
							}
							e = cat(e, l4proto(proto))
							if syn && proto == "tcp" {
								e = cat(e, tcpSYNOnly())
							}
							if pr.Lo != 0 {
								e = cat(e, dport(pr))
							}
							out = append(out, nftRule{comment, cat(e, action(f))})
						}
					}
				}
			}
		}
		return out
	}

	switch o.Mode {
	case Redirect:
		chains := []nftChain{{Name: nftChainRedirect, Type: nftables.ChainTypeNAT, Hook: *nftables.ChainHookPrerouting,
			Priority: *nftables.ChainPriorityNATDest,
			Rules:    concatNFT(exempt, capture(commentCapture, false, false, nil, o.nftRedirect))}}
		if o.Output {
			chains = append(chains, nftChain{Name: nftChainRedirectOutput, Type: nftables.ChainTypeNAT, Hook: *nftables.ChainHookOutput,
				Priority: *nftables.ChainPriorityNATDest,
				Rules:    concatNFT(exempt, capture(commentOutput, true, false, nil, o.nftRedirect))})
		}
		return nftTable{sets, chains}, nil
	}
	// TPROXY. Packets of connections detour already holds (its transparent
	// sockets), except SYNs, get the mark for the policy route and skip the
	// rest; see ruleSet for why SYNs go on to the TPROXY target.
	established := nftRule{commentEstablished, cat(l4proto("tcp"), tcpNotSYN(), socketTransparent(),
		markOr(o.TProxyMark), verdict(expr.VerdictReturn))}
	// Every packet passes here, not only a connection's first: the replies
	// of connections not captured must pass too. TCP's capture takes SYNs
	// only, which no reply is, so it needs no connection tracking (which
	// a ct expression turns on for every packet forwarded); UDP and
	// --output do (see ruleSet).
	replies := nftRule{commentReply, cat(ctReply(), verdict(expr.VerdictReturn))}
	head := []nftRule{established}
	if o.UDP || o.Output {
		head = append(head, replies)
	}
	tproxy := func(f Family) []expr.Any {
		return cat(o.nftTProxy(f), markOr(o.TProxyMark), verdict(expr.VerdictAccept))
	}
	var fromLo []nftRule
	if o.Output {
		// The gateway's own connections, marked in output and rerouted to
		// lo by the policy route, come back in here.
		fromLo = capture(commentOutput, true, false, cat(iifname("lo"), markHas(o.TProxyMark)), tproxy)
	}
	chains := []nftChain{{Name: nftChainTProxy, Type: nftables.ChainTypeFilter, Hook: *nftables.ChainHookPrerouting,
		Priority: *nftables.ChainPriorityMangle,
		Rules:    concatNFT(head, exempt, fromLo, capture(commentCapture, false, true, nil, tproxy))}}
	if o.Output {
		// A route chain: a changed mark routes the packet again.
		mark := func(Family) []expr.Any { return markOr(o.TProxyMark) }
		chains = append(chains, nftChain{Name: nftChainTProxyOutput, Type: nftables.ChainTypeRoute, Hook: *nftables.ChainHookOutput,
			Priority: *nftables.ChainPriorityMangle,
			Rules:    concatNFT([]nftRule{replies}, exempt, capture(commentOutput, true, false, nil, mark))})
	}
	return nftTable{sets, chains}, nil
}

// mergeRanges turns prefixes of one family into sorted ranges, joining
// those that overlap or touch (an interval set holds no overlaps).
func mergeRanges(list []netip.Prefix) []addrRange {
	var rs []addrRange
	for _, p := range list {
		p = p.Masked()
		rs = append(rs, addrRange{p.Addr(), lastAddr(p)})
	}
	slices.SortFunc(rs, func(a, b addrRange) int { return a.Lo.Compare(b.Lo) })
	var out []addrRange
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			if next := last.Hi.Next(); !next.IsValid() || r.Lo.Compare(next) <= 0 {
				if r.Hi.Compare(last.Hi) > 0 {
					last.Hi = r.Hi
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// lastAddr is the last address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// elements are a set's ranges as the kernel's interval set takes them (as
// nft sends them): each range's start, and an interval-end element after
// its last address (none after the family's last address); an end element
// at the zero address first when the first range starts later.
func (s nftSet) elements() []nftables.SetElement {
	var out []nftables.SetElement
	zero := netip.IPv4Unspecified()
	if s.Family == IPv6 {
		zero = netip.IPv6Unspecified()
	}
	if len(s.Ranges) > 0 && s.Ranges[0].Lo != zero {
		out = append(out, nftables.SetElement{Key: zero.AsSlice(), IntervalEnd: true})
	}
	for _, r := range s.Ranges {
		out = append(out, nftables.SetElement{Key: r.Lo.AsSlice()})
		if next := r.Hi.Next(); next.IsValid() {
			out = append(out, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}

// rangesOf reads back the ranges of an interval set's elements, in any
// order, as the kernel lists them.
func rangesOf(elems []nftables.SetElement) []addrRange {
	type el struct {
		a   netip.Addr
		end bool
	}
	var es []el
	for _, e := range elems {
		if a, ok := netip.AddrFromSlice(e.Key); ok {
			es = append(es, el{a, e.IntervalEnd})
		}
	}
	slices.SortFunc(es, func(x, y el) int { return x.a.Compare(y.a) })
	var out []addrRange
	for i, e := range es {
		if e.end {
			continue
		}
		// Up to the next element, or to the family's last address.
		hi := lastAddr(netip.PrefixFrom(e.a, 0))
		if i+1 < len(es) {
			hi = es[i+1].a.Prev()
		}
		out = append(out, addrRange{e.a, hi})
	}
	return out
}

// nftRedirect is REDIRECT mode's action: redirect to detour's port, or DNAT
// to its one address.
func (o RuleOptions) nftRedirect(f Family) []expr.Any {
	port := binaryutil.BigEndian.PutUint16(o.Port)
	if o.ListenIP.IsValid() && !o.ListenIP.IsUnspecified() {
		return []expr.Any{
			&expr.Immediate{Register: 1, Data: o.ListenIP.AsSlice()},
			&expr.Immediate{Register: 2, Data: port},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfprotoOf(f)), RegAddrMin: 1, RegProtoMin: 2, Specified: true},
		}
	}
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: port},
		&expr.Redir{RegisterProtoMin: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
	}
}

// nftTProxy is TPROXY mode's action: hand the packet to detour's listener.
// In an inet table a tproxy after a family match names the family.
func (o RuleOptions) nftTProxy(f Family) []expr.Any {
	port := binaryutil.BigEndian.PutUint16(o.Port)
	if o.ListenIP.IsValid() && !o.ListenIP.IsUnspecified() {
		return []expr.Any{
			&expr.Immediate{Register: 1, Data: o.ListenIP.AsSlice()},
			&expr.Immediate{Register: 2, Data: port},
			&expr.TProxy{Family: nfprotoOf(f), TableFamily: unix.NFPROTO_INET, RegAddr: 1, RegPort: 2},
		}
	}
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: port},
		&expr.TProxy{Family: nfprotoOf(f), TableFamily: unix.NFPROTO_INET, RegPort: 1},
	}
}

func (o RuleOptions) sourcePrefixes(f Family) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range o.Sources {
		if f.has(p.Addr()) {
			out = append(out, p)
		}
	}
	return out
}

func orAnyPrefix(l []netip.Prefix) []netip.Prefix {
	if len(l) == 0 {
		return []netip.Prefix{{}}
	}
	return l
}

func orAnyPort(l []ports.Range) []ports.Range {
	if len(l) == 0 {
		return []ports.Range{{}}
	}
	return l
}

func concatNFT(parts ...[]nftRule) []nftRule {
	var out []nftRule
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// The expressions below are each the netlink form of one nft match or
// statement, named in its comment. Everything is loaded into register 1
// (and 2 for a second operand).

func nfprotoOf(f Family) byte {
	if f == IPv6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

func native32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

// metaIs: meta KEY VALUE
func metaIs(key expr.MetaKey, v []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: v},
	}
}

// nfproto: meta nfproto ipv4|ipv6
func nfproto(f Family) []expr.Any { return metaIs(expr.MetaKeyNFPROTO, []byte{nfprotoOf(f)}) }

// l4proto: meta l4proto tcp|udp
func l4proto(proto string) []expr.Any {
	p := byte(unix.IPPROTO_TCP)
	if proto == "udp" {
		p = unix.IPPROTO_UDP
	}
	return metaIs(expr.MetaKeyL4PROTO, []byte{p})
}

// iifname: iifname "NAME", or "PREFIX*" for iptables' "PREFIX+".
func iifname(name string) []expr.Any {
	if prefix, ok := strings.CutSuffix(name, "+"); ok {
		return metaIs(expr.MetaKeyIIFNAME, []byte(prefix))
	}
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return metaIs(expr.MetaKeyIIFNAME, b)
}

type addrField int

const (
	srcAddr addrField = iota
	dst
)

// addrLoad: the ip saddr|daddr (ip6 for IPv6) field into register 1.
func addrLoad(f Family, which addrField) []expr.Any {
	off, n := uint32(12), uint32(4)
	if f == IPv6 {
		off, n = 8, 16
	}
	if which == dst {
		off += n
	}
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}}
}

// addrIn: ip saddr|daddr PREFIX (ip6 for IPv6).
func addrIn(f Family, which addrField, p netip.Prefix) []expr.Any {
	n := uint32(4)
	if f == IPv6 {
		n = 16
	}
	out := addrLoad(f, which)
	if p.Bits() < p.Addr().BitLen() {
		mask := netipMask(p.Bits(), int(n)*8)
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()})
}

func netipMask(ones, bits int) []byte {
	b := make([]byte, bits/8)
	for i := 0; i < ones; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return b
}

// dport: th dport PORT or th dport LO-HI
func dport(p ports.Range) []expr.Any {
	load := &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
	if p.Lo == p.Hi {
		return []expr.Any{load, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(p.Lo)}}
	}
	return []expr.Any{load, &expr.Range{Op: expr.CmpOpEq, Register: 1,
		FromData: binaryutil.BigEndian.PutUint16(p.Lo), ToData: binaryutil.BigEndian.PutUint16(p.Hi)}}
}

// TCP flags as in the header's 14th byte.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// tcpNotSYN: tcp flags & (fin | syn | rst | ack) != syn, iptables' ! --syn.
func tcpNotSYN() []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpFIN | tcpSYN | tcpRST | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{tcpSYN}},
	}
}

// tcpSYNOnly: tcp flags & (fin|syn|rst|ack) == syn
func tcpSYNOnly() []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpFIN | tcpSYN | tcpRST | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpSYN}},
	}
}

// socketTransparent: socket transparent 1
func socketTransparent() []expr.Any {
	return []expr.Any{
		&expr.Socket{Key: expr.SocketKeyTransparent, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}},
	}
}

// ctReply: ct direction reply
func ctReply() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{ctDirReply}},
	}
}

// fibLocal: fib daddr type local
func fibLocal() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(unix.RTN_LOCAL)},
	}
}

// markHas: meta mark & M == M
func markHas(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(m), Xor: native32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(m)},
	}
}

// markOr: meta mark set meta mark | M, iptables' --set-xmark M/M.
func markOr(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(^m), Xor: native32(m)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

// ctDirReply is IP_CT_DIR_REPLY, the value of ct direction for replies.
const ctDirReply = 1
