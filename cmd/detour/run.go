package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/redirect"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// runConfig is everything `detour run` was asked to do.
type runConfig struct {
	listen      string
	mode        redirect.Mode
	mark        uint32
	dialTimeout time.Duration
	idleTimeout time.Duration
	grace       time.Duration
	logFormat   string
	capture     captureFlags // --install-rules and the rule flags (rules.go)

	configPath string
	check      bool        // --check: validate and exit
	file       *fileConfig // the --config file, nil without one
	upstreams  []string    // --upstream, repeatable
	strategy   string      // --strategy
	sniff      tunnel.SniffOptions
	routing    routing
	proxy      proxyFlags // --proxy-listen, --proxy-allow, --proxy-users

	metricsAddr string // --metrics
	pprofAddr   string // --pprof
	maxConns    int    // --max-conns; 0: from the open-file limit
	maxSniffing int    // --max-sniffing
	udp         udpRunFlags
}

const runSignals = `
signals:
  SIGINT, SIGTERM  stop accepting, let live connections finish (--grace), reset the rest,
                   remove the rules, exit; a second one cuts at once
  SIGHUP           reload the routes (groups, rules, default) from --config
  SIGUSR1          log a stats line, and re-check the kernel rules now (--install-rules)
  SIGUSR2          upgrade: start the binary at detour's own path with the same flags and hand
                   it the listening sockets; once it serves, stop accepting, drain, exit (the
                   rules stay); if it fails to start, serve on
`

// usageError is a bad flag or value: exit status 2 and one line.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func parseRunFlags(args []string, stdout io.Writer) (runConfig, error) {
	cfg := runConfig{
		listen:      ":7777",
		mode:        redirect.Redirect,
		mark:        redirect.DefaultMark,
		dialTimeout: 10 * time.Second,
		idleTimeout: 5 * time.Minute,
		grace:       10 * time.Second,
		logFormat:   "text",
	}
	fs := flag.NewFlagSet("detour run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	addTargetFlags(fs, &cfg.listen, &cfg.mode, &cfg.mark)
	fs.DurationVar(&cfg.dialTimeout, "dial-timeout", cfg.dialTimeout, "timeout for connecting to a destination")
	fs.DurationVar(&cfg.idleTimeout, "idle-timeout", cfg.idleTimeout, "close a connection after this long without traffic either way")
	fs.DurationVar(&cfg.grace, "grace", cfg.grace, "on SIGINT/SIGTERM, or once an upgrade handed over, how long live connections may take to finish")
	fs.StringVar(&cfg.logFormat, "log-format", cfg.logFormat, "log format: text or json")
	fs.StringVar(&cfg.configPath, "config", "", "YAML configuration `file` (flags override it)")
	fs.BoolVar(&cfg.check, "check", false, "check the configuration and flags, then exit")
	fs.Func("upstream", "send all traffic through this upstream `URL`: direct, socks5://[user:pass@]host:port or http://[user:pass@]host:port, ?weight=N (repeatable: one group)", func(s string) error {
		cfg.upstreams = append(cfg.upstreams, s)
		return nil
	})
	fs.StringVar(&cfg.strategy, "strategy", "", "how the --upstream group picks: round-robin, weighted, least-conn or consistent-hash (default round-robin)")
	sniffOn := true
	fs.BoolVar(&sniffOn, "sniff", true, "read the host name from the client's first bytes (TLS SNI, HTTP Host)")
	fs.DurationVar(&cfg.sniff.Timeout, "sniff-timeout", sniff.DefaultTimeout, "how long to wait for the client's first bytes")
	fs.Func("sniff-skip-ports", "server-first destination `ports` never sniffed, e.g. 22,25,3306 (none: sniff all; default 22,25,110,143,587,3306,5432)", func(s string) (err error) {
		cfg.sniff.SkipPorts, err = parseSkipPorts(s)
		return err
	})
	fs.StringVar(&cfg.metricsAddr, "metrics", "", "serve Prometheus metrics at http://`ADDR`/metrics (off by default)")
	fs.StringVar(&cfg.pprofAddr, "pprof", "", "serve Go's runtime profiles at http://`ADDR`/debug/pprof/ (off by default; bind it to loopback)")
	fs.IntVar(&cfg.maxConns, "max-conns", 0, "connections served at once; beyond it new ones are reset (0: as many as the open-file limit allows)")
	fs.IntVar(&cfg.sniff.MaxBytes, "sniff-max-bytes", sniff.DefaultMaxBytes, "most bytes read while looking for the host name (1 to 1048576)")
	fs.DurationVar(&cfg.sniff.SilentTTL, "sniff-silent-ttl", sniff.DefaultSilentTTL, "how long a destination whose server was seen speaking first is not sniffed")
	fs.IntVar(&cfg.sniff.SilentEntries, "sniff-silent-entries", sniff.DefaultSilentMaxEntries, "most destinations remembered as speaking first")
	fs.IntVar(&cfg.maxSniffing, "max-sniffing", 1024, "connections waiting for their first bytes at once; beyond it new ones are routed by IP")
	cfg.capture.registerRun(fs)
	cfg.proxy.register(fs)
	cfg.udp.register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stdout, "usage: detour run [flags]")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			fmt.Fprint(stdout, runSignals)
			return cfg, err
		}
		// The flag package writes "-name"; the documented spelling is "--name".
		msg := strings.Replace(err.Error(), "flag -", "flag --", 1)
		if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: -"); ok {
			msg = "unknown flag --" + name
		}
		return cfg, usageError{msg}
	}
	if fs.NArg() > 0 {
		return cfg, usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	if cfg.proxy.usersErr != nil {
		return cfg, usageError{fmt.Sprintf("--proxy-users: %v", cfg.proxy.usersErr)}
	}
	switch {
	case cfg.dialTimeout <= 0:
		return cfg, usageError{fmt.Sprintf("--dial-timeout %s: must be positive", cfg.dialTimeout)}
	case cfg.idleTimeout <= 0:
		return cfg, usageError{fmt.Sprintf("--idle-timeout %s: must be positive", cfg.idleTimeout)}
	case cfg.grace < 0:
		return cfg, usageError{fmt.Sprintf("--grace %s: must not be negative", cfg.grace)}
	case cfg.logFormat != "text" && cfg.logFormat != "json":
		return cfg, usageError{fmt.Sprintf("--log-format %q: want text or json", cfg.logFormat)}
	case cfg.maxConns < 0:
		return cfg, usageError{fmt.Sprintf("--max-conns %d: must not be negative", cfg.maxConns)}
	case cfg.maxSniffing < 1:
		return cfg, usageError{fmt.Sprintf("--max-sniffing %d: must be at least 1", cfg.maxSniffing)}
	case cfg.metricsAddr != "" && checkMetricsAddr(cfg.metricsAddr) != nil:
		return cfg, usageError{fmt.Sprintf("--metrics: %v", checkMetricsAddr(cfg.metricsAddr))}
	case cfg.pprofAddr != "" && checkMetricsAddr(cfg.pprofAddr) != nil:
		return cfg, usageError{fmt.Sprintf("--pprof: %v", checkMetricsAddr(cfg.pprofAddr))}
	case cfg.sniff.Timeout <= 0:
		return cfg, usageError{fmt.Sprintf("--sniff-timeout %s: must be positive (use --sniff=false to turn sniffing off)", cfg.sniff.Timeout)}
	case cfg.sniff.MaxBytes < 1 || cfg.sniff.MaxBytes > 1<<20:
		return cfg, usageError{fmt.Sprintf("--sniff-max-bytes %d: must be from 1 to 1048576", cfg.sniff.MaxBytes)}
	case cfg.sniff.SilentTTL <= 0:
		return cfg, usageError{fmt.Sprintf("--sniff-silent-ttl %s: must be positive", cfg.sniff.SilentTTL)}
	case cfg.sniff.SilentEntries < 1:
		return cfg, usageError{fmt.Sprintf("--sniff-silent-entries %d: must be at least 1", cfg.sniff.SilentEntries)}
	}
	cfg.sniff.Disabled = !sniffOn
	if err := cfg.udp.check(); err != nil {
		return cfg, err
	}
	if cfg.configPath != "" {
		fc, err := loadConfig(cfg.configPath)
		if err != nil {
			return cfg, usageError{err.Error()}
		}
		if err := cfg.applyFile(fc, flagsSet(fs)); err != nil {
			return cfg, usageError{fmt.Sprintf("config %s: %v", cfg.configPath, err)}
		}
	}
	if err := cfg.capture.finish(fs, cfg.mode, cfg.listen, cfg.mark); err != nil {
		return cfg, err
	}
	return cfg, nil
}

// applyFile takes from the config file every setting whose flag was not
// given: flags override the file.
func (cfg *runConfig) applyFile(fc *fileConfig, set map[string]bool) error {
	cfg.file = fc
	field := func(name string) string { return fmt.Sprintf("%s (line %d)", name, fc.line[name]) }
	var err error
	if fc.Listen != "" && !set["listen"] {
		if err := checkListen(fc.Listen); err != nil {
			return fmt.Errorf("%s: %v", field("listen"), err)
		}
		cfg.listen = fc.Listen
	}
	if fc.Mode != "" && !set["mode"] {
		if cfg.mode, err = redirect.ParseMode(fc.Mode); err != nil {
			return fmt.Errorf("%s: %v", field("mode"), err)
		}
	}
	if fc.Mark != "" && !set["mark"] {
		if cfg.mark, err = redirect.ParseMark(fc.Mark); err != nil {
			return fmt.Errorf("%s: %v", field("mark"), err)
		}
	}
	for name, d := range map[string]struct {
		v   duration
		dst *time.Duration
	}{"dial_timeout": {fc.DialTimeout, &cfg.dialTimeout}, "idle_timeout": {fc.IdleTimeout, &cfg.idleTimeout}, "grace": {fc.Grace, &cfg.grace}} {
		flagName := strings.ReplaceAll(name, "_", "-")
		if d.v.set && !set[flagName] {
			if d.v.Duration <= 0 && name != "grace" {
				return fmt.Errorf("%s: must be positive", field(name))
			}
			*d.dst = d.v.Duration
		}
	}
	if fc.Firewall != "" && !set["firewall"] {
		if cfg.capture.firewall, err = redirect.ParseFirewall(fc.Firewall); err != nil {
			return fmt.Errorf("%s: %v", field("firewall"), err)
		}
	}
	cfg.capture.udp.fromFile = fc.UDP
	if err := cfg.udp.applyFile(fc, set, field); err != nil {
		return err
	}
	if fc.LogFormat != "" && !set["log-format"] {
		if fc.LogFormat != "text" && fc.LogFormat != "json" {
			return fmt.Errorf("%s: %q: want text or json", field("log_format"), fc.LogFormat)
		}
		cfg.logFormat = fc.LogFormat
	}
	if err := cfg.proxy.applyFile(fc.Proxy, set); err != nil {
		return err
	}
	if sc := fc.Sniff; sc != nil {
		where := fmt.Sprintf("sniff (line %d)", sc.line)
		if sc.Enabled != nil && !set["sniff"] {
			cfg.sniff.Disabled = !*sc.Enabled
		}
		if sc.Timeout.set && !set["sniff-timeout"] {
			if sc.Timeout.Duration <= 0 {
				return fmt.Errorf("%s: timeout must be positive", where)
			}
			cfg.sniff.Timeout = sc.Timeout.Duration
		}
		if sc.MaxBytes < 0 || sc.MaxBytes > 1<<20 {
			return fmt.Errorf("%s: max_bytes %d is not from 1 to 1048576", where, sc.MaxBytes)
		}
		if sc.MaxBytes != 0 && !set["sniff-max-bytes"] {
			cfg.sniff.MaxBytes = sc.MaxBytes
		}
		if sc.SkipPorts != nil && !set["sniff-skip-ports"] {
			if cfg.sniff.SkipPorts, err = parseSkipPorts(strings.Join(*sc.SkipPorts, ",")); err != nil {
				return fmt.Errorf("%s: skip_ports: %v", where, err)
			}
		}
		if sc.SilentEntries < 0 {
			return fmt.Errorf("%s: silent_entries must not be negative", where)
		}
		if sc.SilentTTL.Duration < 0 {
			return fmt.Errorf("%s: silent_ttl must not be negative", where)
		}
		if sc.SilentTTL.Duration != 0 && !set["sniff-silent-ttl"] {
			cfg.sniff.SilentTTL = sc.SilentTTL.Duration
		}
		if sc.SilentEntries != 0 && !set["sniff-silent-entries"] {
			cfg.sniff.SilentEntries = sc.SilentEntries
		}
	}
	return nil
}

// parseSkipPorts parses --sniff-skip-ports: a port list, or none.
func parseSkipPorts(s string) ([]ports.Range, error) {
	if s == "none" || s == "" {
		return []ports.Range{}, nil
	}
	return ports.Parse(s)
}

func flagsSet(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}

// addTargetFlags registers --listen, --mode and --mark, which `run` and
// `rules` share.
func addTargetFlags(fs *flag.FlagSet, listen *string, mode *redirect.Mode, mark *uint32) {
	fs.Func("listen", "detour's listening `address` host:port; [::]:PORT or :PORT serves IPv4 and IPv6, and the rules send connections to its port (default :7777)", func(s string) error {
		if err := checkListen(s); err != nil {
			return err
		}
		*listen = s
		return nil
	})
	fs.Func("mode", "how the kernel redirects: redirect or tproxy (default redirect)", func(s string) (err error) {
		*mode, err = redirect.ParseMode(s)
		return err
	})
	fs.Func("mark", "socket mark on detour's outbound connections, which the rules exempt (default 0x2d)", func(s string) (err error) {
		*mark, err = redirect.ParseMark(s)
		return err
	})
}

// checkListen accepts host:port where host is empty or an IP literal and
// port is 1-65535.
func checkListen(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if host != "" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("host %q in %q is not an IP address", host, s)
		}
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("port %q in %q is not a number from 1 to 65535", port, s)
	}
	return nil
}

func runCommand(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseRunFlags(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "detour run: %v\n", err)
		return exitUsage
	}

	logw := newLogWriter(stderr, logFlushEvery)
	defer logw.Close()
	log := slog.New(newFastHandler(logw, cfg.logFormat == "json"))

	// No keepalive on outbound sockets: the idle timeout ends dead
	// connections (and upstreams have their probe).
	// Every outbound socket (direct and to upstreams) is known to loops,
	// so that a connection coming back from one is refused at accept.
	loops := &tunnel.LoopGuard{Cause: loopCause(cfg.mode, cfg.mark)}
	forward := &net.Dialer{Timeout: cfg.dialTimeout, Control: loops.Control(tunnel.MarkControl(cfg.mark, nil)), KeepAlive: -1}
	cfg.routing, err = buildRouting(cfg.upstreams, cfg.strategy, cfg.file, forward, log)
	if err != nil {
		if cfg.file != nil && len(cfg.upstreams) == 0 {
			err = fmt.Errorf("config %s: %w", cfg.configPath, err)
		}
		fmt.Fprintf(stderr, "detour run: %v\n", err)
		return exitUsage
	}
	if len(cfg.upstreams) > 0 {
		fb, _ := upstream.ParseUDPFallback(cfg.udp.upstreamUDP)
		for _, g := range cfg.routing.groups {
			g.UDPFallback = fb
		}
	}
	if cfg.check {
		if cfg.capture.udp.on {
			for _, w := range udpWarnings(cfg.routing) {
				fmt.Fprintf(stdout, "warning: %s\n", w)
			}
		}
		fmt.Fprintf(stdout, "configuration OK: %d upstream groups, %d routing rules", len(cfg.routing.groups), ruleCount(cfg.routing.router))
		if n := len(cfg.proxy.listen); n > 0 {
			fmt.Fprintf(stdout, ", proxy port on %s (clients: %s, %d users)", strings.Join(cfg.proxy.listen, " "), allowString(cfg.proxy.allow), len(cfg.proxy.users))
		}
		fmt.Fprintln(stdout)
		return exitOK
	}
	if len(cfg.upstreams) > 0 && cfg.file != nil && (len(cfg.file.Groups) > 0 || len(cfg.file.Rules) > 0) {
		log.Warn("--upstream given: the config file's groups and rules are not used")
	}

	// What an old process handed over on SIGUSR2 (nothing when started
	// afresh), and SIGUSR2 caught before anything is served: its default
	// action would end the process.
	inh, err := takeInherited()
	if err != nil {
		log.Error("cannot start", "error", err.Error())
		return exitFailure
	}
	self := startPath()
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	defer signal.Stop(usr2)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := inh.listen(cfg.mode, cfg.listen, log, func() (*redirect.Listener, error) {
		return redirect.Listen(ctx, cfg.mode, cfg.listen)
	})
	if err != nil {
		log.Error("cannot start", "error", err.Error())
		return exitFailure
	}
	if cfg.mode == redirect.TProxy {
		warnMarkRoutes(log, cfg.mark)
	}
	var udp *udpRunner
	if cfg.capture.udp.on {
		if udp, err = openUDP(ctx, inh, cfg.listen, cfg.mark, log); err != nil {
			ln.Close()
			log.Error("cannot start", "error", err.Error())
			return exitFailure
		}
		defer udp.shutdown()
	}
	// Rules go in once the listener is there and out on every return below
	// (unless a successor serves with them).
	keeper, err := startRuleKeeper(log, cfg.capture, inh.take(fdRulesLease))
	if err != nil {
		ln.Close()
		log.Error("cannot install rules", "error", err.Error())
		return exitFailure
	}
	defer keeper.stop()
	var pass handover // what a successor gets on SIGUSR2
	pass.add(fdListener, ln)
	if udp != nil {
		pass.add(fdUDP, udp.ln.Conn())
	}
	if f := keeper.leaseFile(); f != nil {
		pass.add(fdRulesLease, f)
	}
	nofile := raiseFileLimit(log)
	if cfg.maxConns == 0 {
		// Two descriptors per connection, and some to spare.
		cfg.maxConns = max(int(nofile)-256, 64) / 2
	}
	t := &tunnel.Tunnel{
		Loops:       loops,
		Mark:        cfg.mark,
		DialTimeout: cfg.dialTimeout,
		IdleTimeout: cfg.idleTimeout,
		Log:         log,
		Mode:        cfg.mode.String(),
		Sniff:       cfg.sniff,
		MaxConns:    cfg.maxConns,
		MaxSniffing: cfg.maxSniffing,
	}
	var groups groupsBox
	probes := &probeRunner{parent: ctx}
	defer probes.stop()
	use := func(rt routing) {
		t.SetRouter(rt.router)
		groups.set(rt.groups)
		probes.start(rt.groups)
	}
	use(cfg.routing)
	var m *metrics
	var servers []io.Closer // metrics and profiles, closed on handover
	var proxyObs tunnel.Observer
	if cfg.metricsAddr != "" {
		m = newMetrics(t.Active, t.RelayStats, groups.get)
		t.Observer = m.inbound("transparent")
		proxyObs = m.inbound("proxy")
		mln, err := inh.listenTCP(fdMetrics, cfg.metricsAddr, log)
		if err != nil {
			ln.Close()
			log.Error("cannot serve metrics", "addr", cfg.metricsAddr, "error", err.Error())
			return exitFailure
		}
		pass.add(fdMetrics, mln.(syscall.Conn))
		srv := serveMetrics(mln, m, log)
		defer srv.Close()
		servers = append(servers, srv)
		log.Info("serving metrics", "addr", cfg.metricsAddr)
	}
	if cfg.pprofAddr != "" {
		pln, err := inh.listenTCP(fdPprof, cfg.pprofAddr, log)
		if err != nil {
			ln.Close()
			log.Error("cannot serve profiles", "addr", cfg.pprofAddr, "error", err.Error())
			return exitFailure
		}
		pass.add(fdPprof, pln.(syscall.Conn))
		srv := servePprof(pln, log)
		defer srv.Close()
		servers = append(servers, srv)
		log.Info("serving profiles", "addr", cfg.pprofAddr)
	}
	if udp != nil {
		if cfg.udp.opts.MaxSessions == 0 {
			cfg.udp.opts.MaxSessions = min(16384, max(int(nofile)/4, 64))
		}
		udp.serve(t, cfg.udp.opts, cfg.sniff.Disabled, m)
		logUDPWarnings(log, cfg.routing)
	}
	log.Info("listening", "addr", ln.Addr().String(), "mode", cfg.mode.String(),
		"mark", fmt.Sprintf("%#x", cfg.mark), "udp", udp != nil, "version", versionString(), "pid", os.Getpid(), "inherited", inh.upgrade())

	proxyLns, err := listenProxy(inh, &pass, cfg.proxy.listen, log)
	if err != nil {
		ln.Close()
		log.Error("cannot start", "error", err.Error())
		return exitFailure
	}
	serveErr := make(chan error, 1+len(proxyLns))
	go func() { serveErr <- t.Serve(ln) }()
	udpOpts := cfg.udp.opts
	udpOpts.SniffDisabled = cfg.sniff.Disabled
	if udpOpts.MaxSessions == 0 {
		udpOpts.MaxSessions = min(16384, max(int(nofile)/4, 64))
	}
	port := cfg.proxy.port(proxyObs, udpOpts)
	if m != nil && len(proxyLns) > 0 {
		port.UDPObserver = m.addProxyUDP(port.UDPSessions)
	}
	for _, pl := range proxyLns {
		log.Info("proxy port listening", "addr", pl.Addr().String(), "users", len(cfg.proxy.users), "allow", allowString(cfg.proxy.allow))
		go func() { serveErr <- t.ServeProxy(pl, port) }()
	}
	if inh.upgrade() {
		// The old process hands over (and tells systemd our PID) once it
		// reads this.
		if err := inh.signalReady(); err != nil {
			log.Warn("upgrade: cannot tell the old process this one serves", "error", err.Error())
		}
	} else if err := sdNotify("READY=1"); err != nil {
		log.Warn("cannot notify systemd", "error", err.Error())
	}
	inh.closeRest(log)
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var up *upgrade // the upgrade under way, if any
	successor := 0  // the PID that took over, once one has
wait:
	for {
		select {
		case err := <-serveErr:
			log.Error("listener failed", "error", err.Error())
			return exitFailure
		case <-usr1:
			logStats(log, t, "udp_sessions", udp.sessions())
		case <-usr2:
			if up != nil {
				log.Warn("upgrade already under way; SIGUSR2 ignored", "new_pid", up.pid)
				continue
			}
			path, err := self.resolve()
			if err != nil {
				log.Error("upgrade failed", "reason", fmt.Sprintf("cannot find this binary's path: %v", err), "kept", "this process serves on")
				continue
			}
			keeper.pause() // the new process adopts the rules; no tug of war
			up = startUpgrade(path, &pass, log)
		case res := <-up.result():
			up = nil
			if res.err != nil {
				log.Error("upgrade failed", "reason", res.err.Error(), "kept", "this process serves on")
				keeper.resume()
				continue
			}
			successor = res.pid
			break wait
		case <-hup:
			rt, err := reloadRouting(cfg, forward, log)
			if err != nil {
				log.Error("reload failed", "error", err.Error(), "kept", "the running configuration")
				if m != nil {
					m.reloads.WithLabelValues("error").Inc()
				}
				continue
			}
			// New connections take the new routes; those in flight keep
			// theirs, and the old groups' upstreams drain as they close.
			use(rt)
			if m != nil {
				m.reloads.WithLabelValues("ok").Inc()
			}
			log.Info("reloaded", "config", cfg.configPath, "groups", len(rt.groups), "rules", ruleCount(rt.router))
		case <-ctx.Done():
			break wait
		}
	}
	probes.stop()
	if successor != 0 {
		// systemd follows the new main process (Type=notify).
		if err := sdNotify(fmt.Sprintf("MAINPID=%d", successor)); err != nil {
			log.Warn("cannot notify systemd", "error", err.Error())
		}
		for _, srv := range servers {
			srv.Close() // the successor serves them on the same sockets
		}
		log.Info("upgrade: handed over", "new_pid", successor)
	} else {
		sdNotify("STOPPING=1")
		if up != nil {
			// Stopping mid-upgrade stops the new process too.
			log.Warn("upgrade: stopping the new process too", "new_pid", up.pid)
			up.stop()
		}
	}
	log.Info("shutting down", "active", t.Active(), "grace", cfg.grace, "handed_to", successor)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.grace)
	defer cancel()
	// A second signal ends the grace period at once; the rules still go.
	again := make(chan os.Signal, 1)
	signal.Notify(again, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(again)
	go func() {
		select {
		case <-again:
			log.Warn("second signal: cutting the connections left now")
			cancel()
		case <-sctx.Done():
		}
	}()
	udp.shutdown()
	port.ShutdownUDP()
	if err := t.Shutdown(sctx); err != nil {
		log.Warn("grace period over; reset the connections left", "grace", cfg.grace)
	}
	<-serveErr
	log.Info("stopped")
	return exitOK
}

// logStats answers SIGUSR1 with what the process holds, so an operator (and
// the end-to-end tests) can see that finished connections left nothing.
//
// It collects garbage first: Go keeps splice pipes of finished copies in a
// pool until two collections pass, and those are not held by connections.
func logStats(log *slog.Logger, t *tunnel.Tunnel, extra ...any) {
	for range 3 {
		runtime.GC()
	}
	time.Sleep(10 * time.Millisecond) // let the pipes' cleanups run
	fds := -1
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		fds = len(ents)
	}
	rs := t.RelayStats()
	log.Info("stats", append([]any{"active", t.Active(), "goroutines", runtime.NumGoroutine(), "fds", fds,
		"parked", rs.Parked, "pipes", rs.Pipes}, extra...)...)
}

func ruleCount(r *tunnel.Router) int {
	if r == nil {
		return 0
	}
	return len(r.Rules)
}

// reloadRouting re-reads --config and builds new routes (SIGHUP). Only the
// routing part (groups, rules, default) changes; listener, mode, mark and
// sniff settings need a restart.
func reloadRouting(cfg runConfig, forward *net.Dialer, log *slog.Logger) (routing, error) {
	if cfg.configPath == "" {
		return routing{}, errors.New("no --config file to reload")
	}
	if len(cfg.upstreams) > 0 {
		return routing{}, errors.New("--upstream given: routes come from the command line, not the file")
	}
	fc, err := loadConfig(cfg.configPath)
	if err != nil {
		return routing{}, err
	}
	rt, err := buildRouting(nil, "", fc, forward, log)
	if err != nil {
		return routing{}, fmt.Errorf("config %s: %w", cfg.configPath, err)
	}
	return rt, nil
}

// raiseFileLimit raises the soft open-file limit to the hard one and
// returns it; each connection takes two descriptors.
func raiseFileLimit(log *slog.Logger) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read the open-file limit", "error", err.Error())
		return 1024
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise the open-file limit", "error", err.Error())
		}
	}
	if lim.Cur < 4096 {
		log.Warn("open-file limit is low: each connection takes two descriptors", "limit", lim.Cur)
	}
	return lim.Cur
}

// checkMetricsAddr accepts host:port with a numeric port.
func checkMetricsAddr(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("port %q in %q is not a number from 1 to 65535", port, s)
	}
	return nil
}

// probeRunner runs the active health probes of the groups in use, and stops
// the previous groups' probes when they are replaced.
type probeRunner struct {
	parent context.Context
	cancel context.CancelFunc
}

func (p *probeRunner) start(groups []*upstream.Group) {
	p.stop()
	ctx, cancel := context.WithCancel(p.parent)
	p.cancel = cancel
	for _, g := range groups {
		g.StartProbe(ctx)
	}
}

func (p *probeRunner) stop() {
	if p.cancel != nil {
		p.cancel()
	}
}

// warnMarkRoutes warns (TPROXY mode) about ip rules of others that would
// route detour's own marked connections back to this host.
func warnMarkRoutes(log *slog.Logger, mark uint32) {
	problems, err := redirect.MarkLoops(mark)
	if err != nil {
		log.Warn("cannot check the ip rules against detour's mark", "error", err.Error())
	}
	for _, p := range problems {
		log.Warn("ip rule overlaps detour's mark", "problem", p.Msg)
	}
}

// loopCause is the likely cause of a routing loop, for its log line.
func loopCause(mode redirect.Mode, mark uint32) string {
	c := fmt.Sprintf("a connection detour made came back to it: a rule that captures connections (iptables/nft %s, not detour's own) does not exempt detour's socket mark %#x (add `-m mark ! --mark %#x` or a RETURN for it first)", strings.ToUpper(mode.String()), mark, mark)
	if mode == redirect.TProxy {
		c += fmt.Sprintf(", or an ip rule whose fwmark/mask matches %#x sends detour's own packets to a local route (`detour doctor` names it; pick a --mark it does not match)", mark)
	}
	return c
}
