package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/detour-proxy/detour/redirect"
)

// doctorCommand is `detour doctor`: one line per check of what detour needs
// on this machine, each failure with what to do about it. Exit status 1 if
// anything would stop detour from working.
func doctorCommand(args []string, stdout, stderr io.Writer) int {
	mark := uint32(redirect.DefaultMark)
	fs := flag.NewFlagSet("detour doctor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Func("mark", "detour's socket mark, checked against the ip rules (default 0x2d)", func(s string) (err error) {
		mark, err = redirect.ParseMark(s)
		return err
	})
	firewall := redirect.FirewallAuto
	fs.Func("firewall", "rules `backend` to check: auto, iptables or nftables", func(s string) (err error) {
		firewall, err = redirect.ParseFirewall(s)
		return err
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stdout, "usage: detour doctor [--mark MARK] [--firewall auto|iptables|nftables]\n\nChecks the kernel features, sysctls, the rules backend, ip rules and detour's rules on this machine.")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return exitOK
		}
		fmt.Fprintf(stderr, "detour doctor: %v\n", flagError(err))
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "detour doctor: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	}
	failed := false
	line := func(status, msg string) {
		if status == "FAIL" {
			failed = true
		}
		fmt.Fprintf(stdout, "%-4s  %s\n", status, msg)
	}

	// The rules backend, and why.
	fw, why := redirect.ChooseFirewall(firewall)
	line("ok", fmt.Sprintf("firewall: %s (%s)", fw, why))

	// iptables and its backend.
	missing := false
	for _, bin := range []string{"iptables", "ip6tables"} {
		if fw == redirect.FirewallNftables {
			break // in nftables mode no iptables command is run
		}
		out, err := exec.Command(bin, "-V").CombinedOutput()
		switch v := strings.TrimSpace(string(out)); {
		case err != nil:
			missing = true
			line("FAIL", fmt.Sprintf("%s: not usable (%v): install the iptables package (apt-get install iptables)", bin, err))
		case strings.Contains(v, "nf_tables"):
			line("ok", fmt.Sprintf("%s: %s", bin, v))
		default:
			line("warn", fmt.Sprintf("%s: %s: the legacy backend works, but mixing it with nftables rules confuses both; prefer iptables-nft", bin, v))
		}
	}

	if missing {
		return exitFailure // nothing below can be checked without it
	}
	in, _, _, err := openBackend(fw)
	if err != nil {
		line("FAIL", fmt.Sprintf("%s: %v", fw, err))
		return exitFailure
	}
	defer in.Close()

	// Kernel features and sysctls, for each mode: the installer tries
	// every match and target it would use in a scratch chain.
	seen := map[string]bool{} // sysctl findings are the same for both modes
	for _, mode := range []redirect.Mode{redirect.Redirect, redirect.TProxy} {
		o := redirect.RuleOptions{Mode: mode, Port: 7777} // zero fields: the defaults
		problems := in.Check(o)
		fatal := false
		for _, p := range problems {
			fatal = fatal || p.Fatal
		}
		if !fatal {
			line("ok", fmt.Sprintf("%s mode: the kernel has every match and target detour uses (%s)", mode, fw))
		}
		for _, p := range problems {
			if seen[p.Msg] {
				continue
			}
			seen[p.Msg] = true
			status := "warn"
			if p.Fatal {
				status = "FAIL"
			}
			line(status, p.Msg)
		}
	}

	// Sysctls that are fine get a line too (the problems are above).
	for _, sc := range []struct{ path, name, what string }{
		{"/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward", "IPv4"},
		{"/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding", "IPv6"},
	} {
		if v, err := os.ReadFile(sc.path); err == nil && strings.TrimSpace(string(v)) == "1" {
			line("ok", fmt.Sprintf("%s is 1: this host forwards %s", sc.name, sc.what))
		}
	}
	rpOK := true
	for msg := range seen {
		rpOK = rpOK && !strings.Contains(msg, "rp_filter")
	}
	if rpOK {
		line("ok", "rp_filter: no interface would drop TPROXY traffic")
	}

	// ip rules of others that send detour's marked packets back to this
	// host (TPROXY's routing loop).
	if problems, err := redirect.MarkLoops(mark); err != nil {
		line("warn", fmt.Sprintf("ip rule: cannot list them: %v", err))
	} else if len(problems) == 0 {
		line("ok", fmt.Sprintf("ip rule: none sends detour's mark %#x to a local route (no loop)", mark))
	} else {
		for _, p := range problems {
			line("warn", p.Msg)
		}
	}

	// detour's own rules.
	var buf bytes.Buffer
	if err := in.Show(&buf); err != nil {
		line("FAIL", fmt.Sprintf("reading detour's rules: %v", err))
	} else if strings.Contains(buf.String(), "none of detour's rules is installed") {
		line("warn", "detour's rules are not installed: run `detour run --install-rules` (or `detour rules install`) so traffic reaches detour")
	} else {
		n := strings.Count(strings.TrimSpace(buf.String()), "\n") + 1
		line("ok", fmt.Sprintf("detour's rules are installed (%d lines; `detour rules show` lists them)", n))
	}

	// Descriptors: two per connection.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		if lim.Max < 4096 {
			line("warn", fmt.Sprintf("open-file hard limit %d: about %d connections at once; raise LimitNOFILE", lim.Max, lim.Max/2))
		} else {
			line("ok", fmt.Sprintf("open-file hard limit %d: about %d connections at once", lim.Max, (lim.Max-256)/2))
		}
	}
	if failed {
		return exitFailure
	}
	return exitOK
}
