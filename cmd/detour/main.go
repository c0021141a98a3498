// Command detour is a transparent proxy for Linux gateways (TCP, and UDP
// in tproxy mode).
//
// This package holds only flags, wiring, signals and exit codes; the work is
// done by packages redirect (kernel side) and tunnel (the data path).
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

// Exit statuses.
const (
	exitOK      = 0
	exitFailure = 1 // detour could not do its job (listen failed, ...)
	exitUsage   = 2 // bad command line or configuration
)

func main() {
	os.Exit(detour(os.Args[1:], os.Stdout, os.Stderr))
}

func detour(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return runCommand(args[1:], stdout, stderr)
	case "rules":
		return rulesCommand(args[1:], stdout, stderr)
	case "doctor":
		return doctorCommand(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "detour", versionString())
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "detour: unknown command %q (want run, rules, doctor or version; see detour help)\n", args[0])
	return exitUsage
}

const usage = `detour: a transparent proxy for Linux gateways (TCP; UDP too in tproxy mode)

usage:
  detour run [flags]    serve redirected connections (detour run --help for flags)
  detour rules install|remove|show|check [flags]
                        manage the kernel rules that redirect connections (detour rules --help)
  detour doctor         check this machine: kernel features, sysctls, the firewall backend, detour's rules
  detour version        print the version
`

func versionString() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " (" + s.Value[:12] + ")"
		}
	}
	return v
}
