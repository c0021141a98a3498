//go:build linux

package redirect

import (
	"os/exec"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// ChooseFirewall resolves fw: iptables and nftables stand; auto is decided
// by what this host has (see chooseFirewall), reading the nftables ruleset
// over netlink without changing it. It returns the backend and why.
func ChooseFirewall(fw Firewall) (Firewall, string) {
	switch fw {
	case FirewallIptables:
		return fw, "--firewall iptables"
	case FirewallNftables:
		return fw, "--firewall nftables"
	}
	path, lookErr := exec.LookPath("iptables")
	var names []NFTTableName
	c, err := nftables.New()
	if err == nil {
		var tables []*nftables.Table
		tables, err = c.ListTablesOfFamily(nftables.TableFamilyUnspecified)
		for _, t := range tables {
			names = append(names, NFTTableName{familyName(t.Family), t.Name})
		}
	}
	return chooseFirewall(path, lookErr, names, err)
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case unix.NFPROTO_IPV4:
		return "ip"
	case unix.NFPROTO_IPV6:
		return "ip6"
	case unix.NFPROTO_INET:
		return "inet"
	case unix.NFPROTO_ARP:
		return "arp"
	case unix.NFPROTO_BRIDGE:
		return "bridge"
	case unix.NFPROTO_NETDEV:
		return "netdev"
	}
	return "unknown"
}
