package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/redirect"
)

// captureFlags are the rule flags shared by `detour rules` and
// `detour run --install-rules`: which connections the kernel hands to
// detour.
type captureFlags struct {
	install bool          // run --install-rules
	recheck time.Duration // run --rules-recheck
	dryRun  bool          // rules install --dry-run

	interfaces []string
	sources    []netip.Prefix
	bypass     []netip.Prefix
	bypassNone bool
	ports      []ports.Range
	ipv6       bool
	table      int
	tproxyMark uint32
	output     bool
	firewall   redirect.Firewall // --firewall: auto, iptables or nftables
	udp        udpSetting        // --udp (udp.go)

	given []string // the rule flags on the command line, by name

	// opts is the result, set by finish.
	opts redirect.RuleOptions
}

// ruleFlagNames are the flags that shape the rules.
var ruleFlagNames = []string{"interface", "source", "bypass", "ports", "ipv6", "table", "tproxy-mark", "output", "firewall"}

// register adds the rule flags to fs.
func (cf *captureFlags) register(fs *flag.FlagSet) {
	cf.ipv6 = true
	cf.firewall = redirect.FirewallAuto
	fs.Func("firewall", "rules `backend`: auto, iptables or nftables (auto: nftables where there is no iptables command "+
		"or the host's firewall is nftables-native, else iptables)", func(s string) (err error) {
		cf.firewall, err = redirect.ParseFirewall(s)
		return err
	})
	cf.udp.register(fs)
	fs.Func("interface", "capture only connections arriving on interface `IF` (repeatable; eth+ matches a prefix)", func(s string) error {
		for name := range strings.SplitSeq(s, ",") {
			cf.interfaces = append(cf.interfaces, strings.TrimSpace(name))
		}
		return nil
	})
	fs.Func("source", "capture only connections from `CIDR` (repeatable)", func(s string) error {
		for part := range strings.SplitSeq(s, ",") {
			p, err := redirect.ParsePrefix(strings.TrimSpace(part))
			if err != nil {
				return err
			}
			cf.sources = append(cf.sources, p)
		}
		return nil
	})
	fs.Func("bypass", "never capture connections to `CIDR` (repeatable; replaces the default list of local, private and "+
		"reserved ranges; \"default\" adds that list back, \"none\" clears it)", func(s string) error {
		for part := range strings.SplitSeq(s, ",") {
			switch part = strings.TrimSpace(part); part {
			case "none":
				cf.bypassNone = true
			case "default":
				cf.bypass = append(cf.bypass, redirect.DefaultBypass()...)
			default:
				p, err := redirect.ParsePrefix(part)
				if err != nil {
					return err
				}
				cf.bypass = append(cf.bypass, p)
			}
		}
		return nil
	})
	fs.Func("ports", "capture only connections to these destination `ports`, e.g. 80,443,8000-9000 (default all)", func(s string) error {
		ports, err := ports.Parse(s)
		cf.ports = append(cf.ports, ports...)
		return err
	})
	fs.BoolVar(&cf.ipv6, "ipv6", true, "also install IPv6 rules (ip6tables, or the ip6 rules of the nftables table); --ipv6=false for IPv4 only")
	fs.Func("table", "policy-routing table `N` for TPROXY (default 100)", func(s string) error {
		v, err := strconv.ParseUint(s, 10, 32)
		if err != nil || v == 0 {
			return fmt.Errorf("%q is not a table number from 1 to 4294967295", s)
		}
		cf.table = int(v)
		return nil
	})
	fs.Func("tproxy-mark", "packet `mark` TPROXY sets and policy routing matches; must share no bit with --mark (default 0x100)", func(s string) (err error) {
		cf.tproxyMark, err = redirect.ParseMark(s)
		return err
	})
	fs.BoolVar(&cf.output, "output", false, "also capture connections made by the gateway's own processes")
}

// registerRun adds --install-rules, --rules-recheck and the rule flags to
// the flags of `detour run`.
func (cf *captureFlags) registerRun(fs *flag.FlagSet) {
	fs.BoolVar(&cf.install, "install-rules", false, "install the kernel rules before serving and remove them on exit")
	cf.recheck = 10 * time.Second
	fs.DurationVar(&cf.recheck, "rules-recheck", cf.recheck, "with --install-rules, how often to check the rules are still there (0: never; SIGUSR1: now)")
	cf.register(fs)
}

// finish checks the rule flags against the other flags once fs is parsed
// and sets cf.opts. Errors are usageErrors naming the flag.
func (cf *captureFlags) finish(fs *flag.FlagSet, mode redirect.Mode, listen string, mark uint32) error {
	fs.Visit(func(f *flag.Flag) {
		if slices.Contains(ruleFlagNames, f.Name) {
			cf.given = append(cf.given, f.Name)
		}
	})
	if err := cf.udp.finish(fs, mode); err != nil {
		return err
	}
	if fs.Lookup("install-rules") != nil && !cf.install {
		if len(cf.given) > 0 {
			return usageError{fmt.Sprintf("--%s: only with --install-rules", cf.given[0])}
		}
		if isSet(fs, "rules-recheck") {
			return usageError{"--rules-recheck: only with --install-rules"}
		}
		return nil // run without rules: they are someone else's business
	}
	if cf.recheck < 0 {
		return usageError{fmt.Sprintf("--rules-recheck %s: must not be negative", cf.recheck)}
	}
	if mode != redirect.TProxy {
		for _, name := range []string{"table", "tproxy-mark"} {
			if slices.Contains(cf.given, name) {
				return usageError{fmt.Sprintf("--%s: only with --mode tproxy", name)}
			}
		}
	}
	if cf.bypassNone && len(cf.bypass) > 0 {
		return usageError{"--bypass none: cannot be combined with other --bypass values"}
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return usageError{fmt.Sprintf("--listen %q: not host:port", listen)}
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return usageError{fmt.Sprintf("--listen %q: port is not a number from 1 to 65535", listen)}
	}
	o := redirect.RuleOptions{
		Mode:       mode,
		Port:       uint16(p),
		Mark:       mark,
		TProxyMark: cf.tproxyMark,
		Table:      cf.table,
		Interfaces: cf.interfaces,
		Sources:    cf.sources,
		Ports:      cf.ports,
		NoIPv6:     !cf.ipv6,
		Output:     cf.output,
		UDP:        cf.udp.on,
	}
	if host != "" {
		if o.ListenIP, err = netip.ParseAddr(host); err != nil {
			return usageError{fmt.Sprintf("--listen %q: host is not an IP address", listen)}
		}
	}
	switch {
	case cf.bypassNone:
		o.Bypass = []netip.Prefix{}
	case len(cf.bypass) > 0:
		slices.SortFunc(cf.bypass, func(a, b netip.Prefix) int {
			if c := a.Addr().Compare(b.Addr()); c != 0 {
				return c
			}
			return a.Bits() - b.Bits()
		})
		o.Bypass = slices.Compact(cf.bypass)
	}
	if err := o.Validate(); err != nil {
		var oe *redirect.OptionError
		if errors.As(err, &oe) {
			return usageError{optionFlag[oe.Field] + ": " + oe.Msg}
		}
		return usageError{err.Error()}
	}
	cf.opts = o
	return nil
}

// optionFlag names the flag behind each RuleOptions field.
var optionFlag = map[string]string{
	"Mode":       "--mode",
	"Port":       "--listen",
	"TProxyMark": "--tproxy-mark",
	"Table":      "--table",
	"Interfaces": "--interface",
	"Sources":    "--source",
	"Ports":      "--ports",
	"NoIPv6":     "--ipv6",
	"UDP":        "--udp",
}

// rulesBackend is what `detour rules`, `run --install-rules` and `doctor`
// need of a rules backend: *redirect.Installer (iptables) or
// *redirect.NFTInstaller (nftables).
type rulesBackend interface {
	Check(redirect.RuleOptions) []redirect.Problem
	Install(redirect.RuleOptions) (changed bool, warnings []redirect.Problem, err error)
	Ensure(redirect.RuleOptions) (restored bool, missing string, err error)
	Remove() error
	Show(io.Writer) error
	Close()
}

// openBackend resolves --firewall (auto decides by what this host has) and
// opens that backend. It returns the backend chosen and why.
func openBackend(fw redirect.Firewall) (rulesBackend, redirect.Firewall, string, error) {
	fw, why := redirect.ChooseFirewall(fw)
	if fw == redirect.FirewallNftables {
		in, err := redirect.NewNFTInstaller()
		if err != nil {
			return nil, fw, why, err
		}
		return in, fw, why, nil
	}
	in, err := redirect.NewInstaller()
	if err != nil {
		return nil, fw, why, err
	}
	return in, fw, why, nil
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// flagError turns the flag package's message into one line naming --flag.
func flagError(err error) error {
	msg := strings.Replace(err.Error(), "flag -", "flag --", 1)
	if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: -"); ok {
		msg = "unknown flag --" + name
	}
	return usageError{msg}
}

const rulesUsage = `usage: detour rules install|remove|show|check [flags]

  install   install the kernel rules for the flags (replacing any earlier set of detour's);
            --dry-run prints them as iptables and ip commands (or, for nftables, an nft script) instead
  remove    remove every rule, chain, ip rule and route of detour's, whatever made them
  show      print what of detour's the kernel holds now
  check     print what on this machine would keep the rules from working

flags:
`

// rulesCommand is `detour rules VERB [flags]`.
func rulesCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		out, code := stdout, exitOK
		if len(args) == 0 {
			out, code = stderr, exitUsage
		}
		fmt.Fprint(out, rulesUsage)
		fs := rulesFlagSet(new(rulesArgs))
		fs.SetOutput(out)
		fs.PrintDefaults()
		return code
	}
	verb := args[0]
	if !slices.Contains([]string{"install", "remove", "show", "check"}, verb) {
		fmt.Fprintf(stderr, "detour rules: unknown command %q (want install, remove, show or check)\n", verb)
		return exitUsage
	}
	ra := &rulesArgs{listen: ":7777", mode: redirect.Redirect, mark: redirect.DefaultMark}
	fs := rulesFlagSet(ra)
	fs.SetOutput(io.Discard)
	err := fs.Parse(args[1:])
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, rulesUsage)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return exitOK
	}
	if err == nil && fs.NArg() > 0 {
		err = usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	if err == nil && ra.capture.dryRun && verb != "install" {
		err = usageError{"--dry-run: only with install"}
	}
	if err == nil {
		err = ra.capture.finish(fs, ra.mode, ra.listen, ra.mark)
	}
	if err != nil {
		if _, ok := err.(usageError); !ok {
			err = flagError(err)
		}
		fmt.Fprintf(stderr, "detour rules %s: %v\n", verb, err)
		return exitUsage
	}
	o := ra.capture.opts

	if verb == "install" && ra.capture.dryRun {
		fw, why := redirect.ChooseFirewall(ra.capture.firewall)
		sets, err := o.RuleSets()
		if err != nil {
			fmt.Fprintf(stderr, "detour rules install: %v\n", err)
			return exitUsage
		}
		if fw == redirect.FirewallNftables {
			script, err := o.NFTScript()
			if err != nil {
				fmt.Fprintf(stderr, "detour rules install: %v\n", err)
				return exitUsage
			}
			fmt.Fprintf(stdout, "# firewall nftables (%s)\n", why)
			fmt.Fprintln(stdout, "# detour rules install would apply this table in one batch (replacing any earlier table inet detour):")
			fmt.Fprint(stdout, script)
			for _, rs := range sets {
				if rs.Route != nil {
					fmt.Fprintln(stdout, "# "+strings.Join(rs.Route.Commands(), "\n# "))
				}
			}
			return exitOK
		}
		fmt.Fprintf(stdout, "# firewall iptables (%s)\n", why)
		fmt.Fprintln(stdout, "# detour rules install would run (after removing any earlier set of detour's):")
		for _, rs := range sets {
			for _, c := range rs.Commands() {
				fmt.Fprintln(stdout, c)
			}
		}
		return exitOK
	}

	in, fw, why, err := openBackend(ra.capture.firewall)
	if err != nil {
		fmt.Fprintf(stderr, "detour rules %s: %v\n", verb, err)
		return exitFailure
	}
	defer in.Close()
	switch verb {
	case "install":
		changed, warnings, err := in.Install(o)
		for _, w := range warnings {
			fmt.Fprintf(stderr, "detour rules install: %s\n", w)
		}
		if err != nil {
			for line := range strings.SplitSeq(err.Error(), "\n") {
				fmt.Fprintf(stderr, "detour rules install: error: %s\n", line)
			}
			return exitFailure
		}
		if changed {
			fmt.Fprintf(stdout, "detour rules installed (%s mode, port %d, firewall %s: %s)\n", o.Mode, o.Port, fw, why)
		} else {
			fmt.Fprintf(stdout, "detour rules already installed (%s mode, port %d, firewall %s): nothing changed\n", o.Mode, o.Port, fw)
		}
	case "remove":
		if err := in.Remove(); err != nil {
			fmt.Fprintf(stderr, "detour rules remove: %v\n", err)
			return exitFailure
		}
		fmt.Fprintf(stdout, "detour rules removed (firewall %s)\n", fw)
	case "show":
		if err := in.Show(stdout); err != nil {
			fmt.Fprintf(stderr, "detour rules show: %v\n", err)
			return exitFailure
		}
	case "check":
		problems := in.Check(o)
		code := exitOK
		for _, p := range problems {
			fmt.Fprintln(stdout, p)
			if p.Fatal {
				code = exitFailure
			}
		}
		if len(problems) == 0 {
			fmt.Fprintf(stdout, "ok: this machine can take detour's %s rules\n", o.Mode)
		}
		return code
	}
	return exitOK
}

// rulesArgs is the command line of `detour rules`.
type rulesArgs struct {
	listen  string
	mode    redirect.Mode
	mark    uint32
	capture captureFlags
}

func rulesFlagSet(ra *rulesArgs) *flag.FlagSet {
	fs := flag.NewFlagSet("detour rules", flag.ContinueOnError)
	addTargetFlags(fs, &ra.listen, &ra.mode, &ra.mark)
	fs.BoolVar(&ra.capture.dryRun, "dry-run", false, "install: print the commands instead of running them")
	ra.capture.register(fs)
	return fs
}

// ruleKeeper keeps detour's rules installed while `detour run
// --install-rules` serves: it re-checks them every --rules-recheck and on
// SIGUSR1, restores them when something (a firewall reload) removed them,
// and removes them when stopped, unless another detour process (the
// successor of an upgrade, or the predecessor still draining) holds the
// rules lease: only the last one out removes them.
type ruleKeeper struct {
	in     rulesBackend
	opts   redirect.RuleOptions
	log    *slog.Logger
	lease  *rulesLease
	paused atomic.Bool   // during an upgrade: the new process checks them
	now    chan struct{} // a check at once, after an upgrade failed
	quit   chan struct{}
	ended  chan struct{}
}

// startRuleKeeper installs the rules (nothing without --install-rules), or
// adopts those of the process it upgrades: the same rules are left as they
// are. lease is the one handed over, or nil. On error nothing of detour's
// is left installed, unless another process holds the lease.
func startRuleKeeper(log *slog.Logger, cf captureFlags, lease *os.File) (*ruleKeeper, error) {
	if !cf.install {
		if lease != nil {
			lease.Close()
		}
		return nil, nil
	}
	adopting := lease != nil
	l, err := newRulesLease(lease)
	if err != nil {
		return nil, err
	}
	in, fw, why, err := openBackend(cf.firewall)
	if err != nil {
		return nil, err
	}
	log.Info("rules backend", "firewall", string(fw), "why", why)
	changed, warnings, err := in.Install(cf.opts)
	for _, w := range warnings {
		log.Warn("rules check", "problem", w.Msg)
	}
	if err != nil {
		in.Close()
		return nil, err
	}
	if adopting && !changed {
		log.Info("rules adopted", "mode", cf.opts.Mode.String(), "port", cf.opts.Port)
	} else {
		log.Info("rules installed", "mode", cf.opts.Mode.String(), "port", cf.opts.Port, "replaced", changed)
	}
	k := &ruleKeeper{in: in, opts: cf.opts, log: log, lease: l, now: make(chan struct{}, 1), quit: make(chan struct{}), ended: make(chan struct{})}
	go k.loop(cf.recheck)
	return k, nil
}

func (k *ruleKeeper) loop(every time.Duration) {
	defer close(k.ended)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-k.quit:
			return
		case <-tick:
			k.check(false)
		case <-usr1:
			k.check(true)
		case <-k.now:
			k.check(false)
		}
	}
}

func (k *ruleKeeper) check(asked bool) {
	if k.paused.Load() {
		return
	}
	restored, missing, err := k.in.Ensure(k.opts)
	switch {
	case err != nil:
		k.log.Error("rules check failed", "missing", missing, "error", err.Error())
	case restored:
		k.log.Warn("rules restored", "missing", missing)
	case asked:
		k.log.Info("rules checked", "ok", true)
	}
}

// pause stops the re-checks while a new process takes over; nothing on a
// nil keeper.
func (k *ruleKeeper) pause() {
	if k != nil {
		k.paused.Store(true)
	}
}

// resume restarts the re-checks after a failed upgrade, with one at once:
// the new process may have changed the rules before it failed.
func (k *ruleKeeper) resume() {
	if k != nil {
		k.paused.Store(false)
		select {
		case k.now <- struct{}{}:
		default:
		}
	}
}

// leaseFile is the lease to hand to a successor, nil without rules.
func (k *ruleKeeper) leaseFile() *os.File {
	if k == nil {
		return nil
	}
	return k.lease.file()
}

// stop ends the re-checks and removes the rules if no other detour process
// holds them. It does nothing on a nil keeper (no --install-rules).
func (k *ruleKeeper) stop() {
	if k == nil {
		return
	}
	close(k.quit)
	<-k.ended
	if !k.lease.last() {
		k.log.Info("rules left installed: another detour process serves with them")
	} else if err := k.in.Remove(); err != nil {
		k.log.Error("cannot remove rules", "error", err.Error())
	} else {
		k.log.Info("rules removed")
	}
	k.in.Close()
}
