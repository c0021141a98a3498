//go:build !linux

package redirect

import "io"

// Installer manages kernel rules; only Linux has them.
type Installer struct{}

// NewInstaller fails on this OS.
func NewInstaller() (*Installer, error) { return nil, errNotLinux }

// Close does nothing on this OS.
func (in *Installer) Close() {}

// Check reports that this OS has no netfilter.
func (in *Installer) Check(o RuleOptions) []Problem {
	return []Problem{{Fatal: true, Msg: errNotLinux.Error()}}
}

// Install fails on this OS.
func (in *Installer) Install(o RuleOptions) (bool, []Problem, error) { return false, nil, errNotLinux }

// Ensure fails on this OS.
func (in *Installer) Ensure(o RuleOptions) (bool, string, error) { return false, "", errNotLinux }

// Remove fails on this OS.
func (in *Installer) Remove() error { return errNotLinux }

// Show fails on this OS.
func (in *Installer) Show(w io.Writer) error { return errNotLinux }

// NFTInstaller manages nftables rules; only Linux has them.
type NFTInstaller struct{}

// NewNFTInstaller fails on this OS.
func NewNFTInstaller() (*NFTInstaller, error) { return nil, errNotLinux }

// Close does nothing on this OS.
func (in *NFTInstaller) Close() {}

// Check reports that this OS has no netfilter.
func (in *NFTInstaller) Check(o RuleOptions) []Problem {
	return []Problem{{Fatal: true, Msg: errNotLinux.Error()}}
}

// Install fails on this OS.
func (in *NFTInstaller) Install(o RuleOptions) (bool, []Problem, error) {
	return false, nil, errNotLinux
}

// Ensure fails on this OS.
func (in *NFTInstaller) Ensure(o RuleOptions) (bool, string, error) { return false, "", errNotLinux }

// Remove fails on this OS.
func (in *NFTInstaller) Remove() error { return errNotLinux }

// Show fails on this OS.
func (in *NFTInstaller) Show(w io.Writer) error { return errNotLinux }

// NFTScript fails on this OS.
func (o RuleOptions) NFTScript() (string, error) { return "", errNotLinux }

// ChooseFirewall resolves auto to iptables on this OS, which has neither.
func ChooseFirewall(fw Firewall) (Firewall, string) {
	if fw == FirewallAuto {
		return FirewallIptables, errNotLinux.Error()
	}
	return fw, "--firewall " + string(fw)
}
