package test

// detour doctor.

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestOperateDoctor: `detour doctor` prints one line per check: in a ready
// gateway nothing fatal (exit 0), detour's rules reported once a detour runs;
// forwarding off is a warning; iptables missing makes auto choose nftables,
// and is fatal (exit 1) with --firewall iptables.
func TestOperateDoctor(t *testing.T) {
	tp := newTopo(t)
	doctor := func(ns string, env ...string) (string, int) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		args := []string{"doctor"}
		if len(env) > 0 && strings.HasPrefix(env[len(env)-1], "--") {
			args, env = append(args, env[len(env)-1]), env[:len(env)-1]
		}
		argv := append([]string{"netns", "exec", ns, "env"}, env...)
		out, err := exec.CommandContext(ctx, "ip", append(append(argv, detourBin), args...)...).CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("detour doctor: %v", err)
		}
		t.Logf("detour doctor in %s %v: exit %d\n%s", ns, env, code, out)
		if strings.TrimSpace(string(out)) == "" {
			t.Errorf("detour doctor printed nothing")
		}
		return string(out), code
	}
	// line is the first line of out that mentions every one of subs.
	line := func(out string, subs ...string) string {
	next:
		for _, l := range strings.Split(out, "\n") {
			for _, s := range subs {
				if !strings.Contains(strings.ToLower(l), s) {
					continue next
				}
			}
			return l
		}
		return ""
	}

	// The gateway: forwarding on, iptables there, no rules yet.
	before, code := doctor(tp.G)
	if n := len(strings.Split(strings.TrimSpace(before), "\n")); n < 4 {
		t.Errorf("detour doctor printed %d lines, want one per check (iptables, kernel features, sysctls, rules)", n)
	}
	if code != 0 {
		t.Errorf("detour doctor exit %d in a ready gateway, want 0", code)
	}
	for _, want := range []string{"iptables", "forward", "rules"} {
		if line(before, want) == "" {
			t.Errorf("detour doctor has no line about %s", want)
		}
	}

	// The client namespace forwards nothing: a warning, not fatal.
	client, code := doctor(tp.C)
	if code != 0 || line(client, "ip_forward") == "" {
		t.Errorf("detour doctor where forwarding is off: exit %d, line about ip_forward %q; want exit 0 and a warning", code, line(client, "ip_forward"))
	}

	// No iptables to be found: --firewall auto takes nftables and says why.
	noIpt, code := doctor(tp.G, "PATH=/var/empty")
	if code != 0 || line(noIpt, "firewall: nftables", "no iptables command") == "" {
		t.Errorf("detour doctor without iptables: exit %d, %q; want exit 0 and nftables chosen", code, line(noIpt, "firewall"))
	}
	// Asked for iptables that is not there: fatal, and says what to install.
	missing, code := doctor(tp.G, "PATH=/var/empty", "--firewall=iptables")
	if code != 1 || line(missing, "iptables", "install") == "" {
		t.Errorf("detour doctor --firewall iptables without iptables: exit %d, %q; want exit 1 and a line saying to install iptables", code, line(missing, "iptables", "install"))
	}

	startOp(t, tp)
	after, code := doctor(tp.G)
	if code != 0 {
		t.Errorf("detour doctor exit %d with detour running, want 0", code)
	}
	rules := line(after, "rules")
	if rules == line(before, "rules") {
		t.Errorf("detour doctor's line about the rules is the same with and without them: %q", rules)
	}
	if l := strings.ToLower(rules); !strings.Contains(l, "installed") && !strings.Contains(l, "present") || strings.Contains(l, "not") {
		t.Errorf("with detour's rules installed, doctor says %q; want them reported present", rules)
	}
}
