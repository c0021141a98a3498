package redirect

import (
	"fmt"
	"slices"
)

// Firewall is the rules backend: iptables (go-iptables driving the
// iptables commands) or nftables (detour's own table over netlink).
type Firewall string

const (
	FirewallAuto     Firewall = "auto"     // decided by ChooseFirewall
	FirewallIptables Firewall = "iptables" // iptables and ip6tables commands
	FirewallNftables Firewall = "nftables" // table inet detour over netlink
)

// ParseFirewall parses --firewall: auto, iptables or nftables.
func ParseFirewall(s string) (Firewall, error) {
	switch f := Firewall(s); f {
	case FirewallAuto, FirewallIptables, FirewallNftables:
		return f, nil
	}
	return "", fmt.Errorf("%q: want auto, iptables or nftables", s)
}

// NFTTable is the name of detour's nftables table (family inet). Nothing
// outside it is ever touched.
const NFTTable = "detour"

// NFTTableName is an nftables table: family (ip, ip6, inet, arp, bridge,
// netdev) and name.
type NFTTableName struct{ Family, Name string }

func (t NFTTableName) String() string { return t.Family + " " + t.Name }

// iptablesTables are the tables iptables-nft makes, by family: a host whose
// nftables ruleset holds only these (and detour's own) uses iptables.
var iptablesTables = map[string][]string{
	"ip":     {"filter", "nat", "mangle", "raw", "security"},
	"ip6":    {"filter", "nat", "mangle", "raw", "security"},
	"arp":    {"filter"},
	"bridge": {"filter", "nat", "broute"},
}

// chooseFirewall decides --firewall auto: nftables when there is no
// iptables command, when detour's own table is there (an earlier run used
// nftables), or when the ruleset has tables iptables-nft does not make
// (the host's firewall is written in nftables: nftables.service, fw4,
// firewalld); iptables otherwise. It returns the choice and why, for logs
// and doctor.
func chooseFirewall(iptablesPath string, iptablesErr error, tables []NFTTableName, tablesErr error) (Firewall, string) {
	if iptablesErr != nil {
		return FirewallNftables, "no iptables command (" + iptablesErr.Error() + ")"
	}
	if tablesErr != nil {
		return FirewallIptables, fmt.Sprintf("%s found, and the nftables tables cannot be listed (%v)", iptablesPath, tablesErr)
	}
	var native []string
	for _, t := range tables {
		switch {
		case t.Family == "inet" && t.Name == NFTTable:
			return FirewallNftables, fmt.Sprintf("detour's own table inet %s is installed (an earlier run used nftables)", NFTTable)
		case !slices.Contains(iptablesTables[t.Family], t.Name):
			native = append(native, t.String())
		}
	}
	if len(native) > 0 {
		return FirewallNftables, fmt.Sprintf("the host's firewall is nftables-native (table %s)", native[0])
	}
	return FirewallIptables, fmt.Sprintf("%s found, and every nftables table is one iptables-nft makes", iptablesPath)
}
