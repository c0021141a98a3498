package redirect

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Problem is something on this machine that keeps the rules from working
// as asked.
type Problem struct {
	// Fatal problems stop an install before it changes anything; the others
	// are warnings.
	Fatal bool
	Msg   string
}

func (p Problem) String() string {
	if p.Fatal {
		return "error: " + p.Msg
	}
	return "warning: " + p.Msg
}

// splitProblems separates Check's problems for an install: the warnings,
// and the fatal ones joined into one error (nil when there are none).
func splitProblems(ps []Problem) (warnings []Problem, err error) {
	var fatal []error
	for _, p := range ps {
		if p.Fatal {
			fatal = append(fatal, errors.New(p.Msg))
		} else {
			warnings = append(warnings, p)
		}
	}
	return warnings, errors.Join(fatal...)
}

// rolledBack is an install's error once remove has undone what it did:
// whether anything of detour's is left, and err saying so.
func rolledBack(err error, remove func() error) (changed bool, _ error) {
	if rerr := remove(); rerr != nil {
		return true, fmt.Errorf("%w; rolling back also failed: %v", err, rerr)
	}
	return false, fmt.Errorf("%w (rolled back: none of detour's rules is left)", err)
}

// sysctlProblems judges the sysctls that matter to the rules of o. get
// returns a sysctl by its path under /proc/sys ("net/ipv4/ip_forward"; an
// interface name may hold dots) and whether it exists; ifaces are the
// interfaces the kernel has.
func sysctlProblems(o RuleOptions, get func(string) (string, bool), ifaces []string) []Problem {
	o = o.withDefaults()
	var out []Problem
	fams := o.families()
	if slices.Contains(fams, IPv4) {
		if v, ok := get("net/ipv4/ip_forward"); ok && v == "0" {
			out = append(out, Problem{Msg: "net.ipv4.ip_forward is 0: this host does not forward IPv4, so on a gateway " +
				"everything detour does not capture (bypassed ranges; UDP unless --udp in TPROXY mode) is dropped; set it to 1 (scripts/setup.sh --sysctl does)"})
		}
	}
	if slices.Contains(fams, IPv6) {
		if v, ok := get("net/ipv6/conf/all/forwarding"); ok && v == "0" {
			out = append(out, Problem{Msg: "net.ipv6.conf.all.forwarding is 0: this host does not forward IPv6, so on a gateway " +
				"everything detour does not capture is dropped; set it to 1 (scripts/setup.sh --sysctl does), or pass --ipv6=false"})
		}
	}
	if o.Mode == TProxy && slices.Contains(fams, IPv4) {
		all, _ := get("net/ipv4/conf/all/rp_filter")
		for _, name := range ifaces {
			if name == "lo" || !matchesInterface(o.Interfaces, name) {
				continue
			}
			v, ok := get("net/ipv4/conf/" + name + "/rp_filter")
			if !ok {
				continue
			}
			// The kernel uses the larger of "all" and the interface's value.
			if max(atoi(v), atoi(all)) == 1 {
				out = append(out, Problem{Msg: fmt.Sprintf("rp_filter is strict (1) on %s: TPROXY packets whose source is not "+
					"routed back through %s (asymmetric routing) are dropped before detour sees them; set "+
					"net.ipv4.conf.all.rp_filter and net.ipv4.conf.%s.rp_filter to 2 (loose) or 0", name, name, name)})
			}
		}
	}
	return out
}

func atoi(s string) int {
	n, _ := strconv.Atoi(strings.TrimSpace(s))
	return n
}

// matchesInterface reports whether iptables' -i list (empty: any) matches
// the interface name; "eth+" matches every name starting with "eth".
func matchesInterface(list []string, name string) bool {
	if len(list) == 0 {
		return true
	}
	for _, pat := range list {
		if prefix, ok := strings.CutSuffix(pat, "+"); ok && strings.HasPrefix(name, prefix) || pat == name {
			return true
		}
	}
	return false
}

// probe is one rule the readiness probe appends to a scratch chain to learn
// whether iptables and the kernel have an extension.
type probe struct {
	ext  string // what the rule needs, for the message
	rule Rule
}

// probes returns, for each table the rule sets use, the rules that exercise
// every match and target they need, one extension at a time.
func probes(o RuleOptions, f Family) map[string][]probe {
	o = o.withDefaults()
	c := []string{"-m", "comment", "--comment", commentProbe}
	base := []probe{
		{"comment match (xt_comment)", append(Rule{}, append(c, "-j", "RETURN")...)},
		{"mark match (xt_mark)", append(Rule{"-m", "mark", "--mark", hex(o.Mark)}, append(c, "-j", "RETURN")...)},
		{"addrtype match (xt_addrtype)", append(Rule{"-m", "addrtype", "--dst-type", "LOCAL"}, append(c, "-j", "RETURN")...)},
	}
	if len(o.Ports) > 0 {
		base = append(base, probe{"multiport match (xt_multiport)",
			append(Rule{"-p", "tcp", "-m", "multiport", "--dports", "1,2:3"}, append(c, "-j", "RETURN")...)})
	}
	target := append(append(Rule{"-p", "tcp"}, c...), o.target(f)...)
	if o.Mode == Redirect {
		name := "REDIRECT target (xt_REDIRECT, nf_nat)"
		if slices.Contains(target, "DNAT") {
			name = "DNAT target (xt_nat, nf_nat)"
		}
		return map[string][]probe{"nat": append(base, probe{name, target})}
	}
	mark := hex(o.TProxyMark) + "/" + hex(o.TProxyMark)
	ps := append(base,
		probe{"socket match (xt_socket)", append(Rule{"-p", "tcp", "-m", "socket", "--transparent"}, append(c, "-j", "RETURN")...)},
		probe{"MARK target (xt_mark)", append(append(Rule{}, c...), "-j", "MARK", "--set-xmark", mark)},
		probe{"conntrack match (xt_conntrack)", append(Rule{"-m", "conntrack", "--ctdir", "REPLY"}, append(c, "-j", "RETURN")...)},
		probe{"TPROXY target (xt_TPROXY)", target},
	)
	if o.UDP {
		ps = append(ps, probe{"TPROXY target for UDP (xt_TPROXY)", append(append(Rule{"-p", "udp"}, c...), o.target(f)...)})
	}
	return map[string][]probe{"mangle": ps}
}
