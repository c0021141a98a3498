//go:build linux

package redirect

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// nftScript prints t as the nft script of detour's table (what `nft -f`
// takes and `nft list table inet detour` shows, give or take the kernel's
// rewrites).
func nftScript(t nftTable) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", NFTTable)
	for _, st := range t.Sets {
		b.WriteString(setText(st))
		b.WriteString("\n")
	}
	for i, c := range t.Chains {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tchain %s {\n\t\ttype %s hook %s priority %s; policy accept;\n",
			c.Name, c.Type, hookName(c.Hook), priorityName(c.Priority, c.Hook))
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s\n", nftRuleText(r))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func hookName(h nftables.ChainHook) string {
	switch h {
	case *nftables.ChainHookPrerouting:
		return "prerouting"
	case *nftables.ChainHookOutput:
		return "output"
	case *nftables.ChainHookInput:
		return "input"
	case *nftables.ChainHookForward:
		return "forward"
	case *nftables.ChainHookPostrouting:
		return "postrouting"
	}
	return strconv.Itoa(int(h))
}

// priorityName is nft's name for a chain priority; dstnat is a name only
// in prerouting.
func priorityName(p nftables.ChainPriority, h nftables.ChainHook) string {
	switch {
	case p == *nftables.ChainPriorityMangle:
		return "mangle"
	case p == *nftables.ChainPriorityNATDest && h == *nftables.ChainHookPrerouting:
		return "dstnat"
	case p == *nftables.ChainPriorityFilter:
		return "filter"
	}
	return strconv.Itoa(int(p))
}

// setText prints a set's declaration.
func setText(st nftSet) string {
	typ := "ipv4_addr"
	if st.Family == IPv6 {
		typ = "ipv6_addr"
	}
	return fmt.Sprintf("\tset %s {\n\t\ttype %s\n\t\tflags constant,interval\n\t\telements = { %s }\n\t}\n",
		st.Name, typ, rangesText(st.Ranges))
}

// rangesText prints a set's ranges: a CIDR where a range is one, an
// address, or LO-HI.
func rangesText(rs []addrRange) string {
	var out []string
	for _, r := range rs {
		out = append(out, rangeText(r))
	}
	return strings.Join(out, ", ")
}

func rangeText(r addrRange) string {
	for bits := 0; bits <= r.Lo.BitLen(); bits++ {
		p := netip.PrefixFrom(r.Lo, bits)
		if p.Masked().Addr() == r.Lo && lastAddr(p) == r.Hi {
			if bits == r.Lo.BitLen() {
				return r.Lo.String()
			}
			return p.String()
		}
	}
	return r.Lo.String() + "-" + r.Hi.String()
}

// nftRuleText prints one rule in nft syntax, with its comment.
func nftRuleText(r nftRule) string {
	s := renderExprs(r.Exprs)
	if r.Comment != "" {
		s += " comment " + strconv.Quote(r.Comment)
	}
	return s
}

// operand is what a register holds: a loaded key (its nft name and what
// its values look like), a masked key, or an immediate value.
type operand struct {
	key  string // "meta mark", "ip saddr", "th dport", ...; "" for an immediate
	data []byte // an immediate's value
	mask []byte // a bitwise mask applied to the key
	xor  []byte
}

// renderExprs decompiles the expressions detour generates (and any rule
// made of the same kinds) into nft syntax. An expression it does not know
// is printed as a comment-like placeholder, never dropped.
func renderExprs(exprs []expr.Any) string {
	var out []string
	regs := map[uint32]operand{}
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Meta:
			name := metaKeyName(e.Key)
			if e.SourceRegister {
				out = append(out, name+" set "+operandText(regs[e.Register]))
				continue
			}
			regs[e.Register] = operand{key: name}
		case *expr.Payload:
			regs[e.DestRegister] = operand{key: payloadName(e)}
		case *expr.Bitwise:
			op := regs[e.SourceRegister]
			op.mask, op.xor = e.Mask, e.Xor
			regs[e.DestRegister] = op
		case *expr.Fib:
			key := "fib daddr type"
			if e.FlagSADDR {
				key = "fib saddr type"
			}
			regs[e.Register] = operand{key: key}
		case *expr.Ct:
			regs[e.Register] = operand{key: "ct " + ctKeyName(e.Key)}
		case *expr.Socket:
			key := "socket transparent"
			if e.Key != expr.SocketKeyTransparent {
				key = fmt.Sprintf("socket key%d", e.Key)
			}
			regs[e.Register] = operand{key: key}
		case *expr.Immediate:
			regs[e.Register] = operand{data: e.Data}
		case *expr.Cmp:
			op := regs[e.Register]
			rel := " "
			switch {
			case e.Op == expr.CmpOpNeq:
				rel = " != "
			case e.Op != expr.CmpOpEq:
				rel = fmt.Sprintf(" <op%d> ", e.Op)
			case op.mask != nil && op.key != "tcp flags" && !isPrefixOp(op):
				rel = " == "
			}
			if isPrefixOp(op) {
				out = append(out, op.key+" "+prefixText(e.Data, op.mask))
				continue
			}
			out = append(out, operandText(op)+rel+valueText(op.key, e.Data))
		case *expr.Lookup:
			neg := ""
			if e.Invert {
				neg = "!= "
			}
			out = append(out, operandText(regs[e.SourceRegister])+" "+neg+"@"+e.SetName)
		case *expr.Range:
			op := regs[e.Register]
			neg := ""
			if e.Op == expr.CmpOpNeq {
				neg = "!= "
			}
			out = append(out, op.key+" "+neg+valueText(op.key, e.FromData)+"-"+valueText(op.key, e.ToData))
		case *expr.TProxy:
			fam := ""
			switch e.Family {
			case unix.NFPROTO_IPV4:
				fam = " ip"
			case unix.NFPROTO_IPV6:
				fam = " ip6"
			}
			out = append(out, "tproxy"+fam+" to "+hostPort(regs, e.RegAddr, e.RegPort))
		case *expr.Redir:
			s := "redirect"
			if e.RegisterProtoMin != 0 {
				s += " to " + hostPort(regs, 0, e.RegisterProtoMin)
			}
			out = append(out, s)
		case *expr.NAT:
			kind := "dnat"
			if e.Type == expr.NATTypeSourceNAT {
				kind = "snat"
			}
			fam := " ip"
			if e.Family == unix.NFPROTO_IPV6 {
				fam = " ip6"
			}
			out = append(out, kind+fam+" to "+hostPort(regs, e.RegAddrMin, e.RegProtoMin))
		case *expr.Verdict:
			out = append(out, verdictText(e))
		case *unknownExpr:
			out = append(out, "<"+e.name+">")
		default:
			out = append(out, fmt.Sprintf("<%T>", e))
		}
	}
	return strings.Join(out, " ")
}

// isPrefixOp: an address under a network mask, printed as a CIDR.
func isPrefixOp(op operand) bool {
	return op.mask != nil && (strings.HasSuffix(op.key, "saddr") || strings.HasSuffix(op.key, "daddr")) &&
		strings.HasPrefix(op.key, "ip")
}

func prefixText(addr, mask []byte) string {
	a, ok := netip.AddrFromSlice(addr)
	if !ok {
		return fmt.Sprintf("%x", addr)
	}
	ones := 0
	for _, b := range mask {
		for i := 7; i >= 0 && b&(1<<i) != 0; i-- {
			ones++
		}
	}
	return netip.PrefixFrom(a, ones).String()
}

// operandText prints a register's content where nft takes an expression:
// "meta mark", "meta mark & 0x00000100", "meta mark | 0x00000100",
// "tcp flags & (fin | syn | rst | ack)".
func operandText(op operand) string {
	if op.key == "" {
		return valueText("", op.data)
	}
	if op.mask == nil {
		return op.key
	}
	allZero := func(b []byte) bool {
		for _, c := range b {
			if c != 0 {
				return false
			}
		}
		return true
	}
	if op.key == "tcp flags" && allZero(op.xor) {
		return op.key + " & (" + tcpFlagsText(op.mask) + ")"
	}
	if allZero(op.xor) {
		return op.key + " & " + valueText(op.key, op.mask)
	}
	// mask = ^x and xor = x: the bits of x are set.
	orBits := true
	for i := range op.mask {
		if i >= len(op.xor) || op.mask[i] != ^op.xor[i] {
			orBits = false
		}
	}
	if orBits {
		return op.key + " | " + valueText(op.key, op.xor)
	}
	return "(" + op.key + " & " + valueText(op.key, op.mask) + ") ^ " + valueText(op.key, op.xor)
}

// valueText prints a value the way nft does for the key it is compared
// with.
func valueText(key string, b []byte) string {
	switch key {
	case "meta nfproto":
		if len(b) == 1 {
			switch b[0] {
			case unix.NFPROTO_IPV4:
				return "ipv4"
			case unix.NFPROTO_IPV6:
				return "ipv6"
			}
		}
	case "meta l4proto":
		if len(b) == 1 {
			switch b[0] {
			case unix.IPPROTO_TCP:
				return "tcp"
			case unix.IPPROTO_UDP:
				return "udp"
			}
			return strconv.Itoa(int(b[0]))
		}
	case "meta mark":
		if len(b) == 4 {
			return fmt.Sprintf("0x%08x", binary.NativeEndian.Uint32(b))
		}
	case "iifname", "oifname":
		name := strings.TrimRight(string(b), "\x00")
		if len(b) < unix.IFNAMSIZ && !strings.HasSuffix(string(b), "\x00") {
			name += "*"
		}
		return strconv.Quote(name)
	case "th dport", "th sport":
		if len(b) == 2 {
			return strconv.Itoa(int(binary.BigEndian.Uint16(b)))
		}
	case "tcp flags":
		return tcpFlagsText(b)
	case "fib daddr type", "fib saddr type":
		if len(b) == 4 && binary.NativeEndian.Uint32(b) == unix.RTN_LOCAL {
			return "local"
		}
	case "ct direction":
		if len(b) == 1 {
			return map[byte]string{0: "original", 1: "reply"}[b[0]]
		}
	case "socket transparent":
		if len(b) == 1 {
			return strconv.Itoa(int(b[0]))
		}
	}
	if a, ok := netip.AddrFromSlice(b); ok && (len(b) == 4 || len(b) == 16) && strings.Contains(key, "addr") {
		return a.String()
	}
	return fmt.Sprintf("0x%x", b)
}

func tcpFlagsText(b []byte) string {
	if len(b) != 1 {
		return fmt.Sprintf("0x%x", b)
	}
	var names []string
	for _, f := range []struct {
		bit  byte
		name string
	}{{0x01, "fin"}, {0x02, "syn"}, {0x04, "rst"}, {0x08, "psh"}, {0x10, "ack"}, {0x20, "urg"}, {0x40, "ecn"}, {0x80, "cwr"}} {
		if b[0]&f.bit != 0 {
			names = append(names, f.name)
		}
	}
	if len(names) == 0 {
		return "0x0"
	}
	return strings.Join(names, " | ")
}

// hostPort prints the address and port registers of a tproxy, redirect or
// dnat: ":7777", "198.18.1.1:7777", "[fd00::1]:7777".
func hostPort(regs map[uint32]operand, addrReg, portReg uint32) string {
	host := ""
	if addrReg != 0 {
		if a, ok := netip.AddrFromSlice(regs[addrReg].data); ok {
			host = a.String()
			if a.Is6() {
				host = "[" + host + "]"
			}
		}
	}
	port := ""
	if d := regs[portReg].data; portReg != 0 && len(d) == 2 {
		port = ":" + strconv.Itoa(int(binary.BigEndian.Uint16(d)))
	}
	return host + port
}

func metaKeyName(k expr.MetaKey) string {
	switch k {
	case expr.MetaKeyMARK:
		return "meta mark"
	case expr.MetaKeyNFPROTO:
		return "meta nfproto"
	case expr.MetaKeyL4PROTO:
		return "meta l4proto"
	case expr.MetaKeyIIFNAME:
		return "iifname"
	case expr.MetaKeyOIFNAME:
		return "oifname"
	}
	return fmt.Sprintf("meta key%d", k)
}

func ctKeyName(k expr.CtKey) string {
	switch k {
	case expr.CtKeyDIRECTION:
		return "direction"
	case expr.CtKeySTATE:
		return "state"
	case expr.CtKeyMARK:
		return "mark"
	}
	return fmt.Sprintf("key%d", k)
}

func payloadName(p *expr.Payload) string {
	switch {
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 4 && p.Offset == 12:
		return "ip saddr"
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 4 && p.Offset == 16:
		return "ip daddr"
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 16 && p.Offset == 8:
		return "ip6 saddr"
	case p.Base == expr.PayloadBaseNetworkHeader && p.Len == 16 && p.Offset == 24:
		return "ip6 daddr"
	case p.Base == expr.PayloadBaseTransportHeader && p.Len == 2 && p.Offset == 0:
		return "th sport"
	case p.Base == expr.PayloadBaseTransportHeader && p.Len == 2 && p.Offset == 2:
		return "th dport"
	case p.Base == expr.PayloadBaseTransportHeader && p.Len == 1 && p.Offset == 13:
		return "tcp flags"
	}
	return fmt.Sprintf("@base%d,%d,%d", p.Base, p.Offset*8, p.Len*8)
}

func verdictText(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictContinue:
		return "continue"
	case expr.VerdictJump:
		return "jump " + v.Chain
	case expr.VerdictGoto:
		return "goto " + v.Chain
	}
	return fmt.Sprintf("verdict%d", v.Kind)
}

// NFTScript returns the nft script that installs detour's table for o as
// detour does (what `detour rules install --dry-run --firewall nftables`
// prints; `nft -f` takes it): add, delete and add the table, replacing any
// earlier one in the same transaction. Or o's first invalid field.
func (o RuleOptions) NFTScript() (string, error) {
	t, err := o.nftRules()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("table inet %s\ndelete table inet %s\n", NFTTable, NFTTable) + nftScript(t), nil
}
