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

	"github.com/detour-proxy/detour/redirect"
	"github.com/detour-proxy/detour/tunnel"
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
}

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
	fs.Func("listen", "listening `address` host:port; [::]:PORT or :PORT serves IPv4 and IPv6 (default :7777)", func(s string) error {
		if err := checkListen(s); err != nil {
			return err
		}
		cfg.listen = s
		return nil
	})
	fs.Func("mode", "how the kernel redirects: redirect or tproxy (default redirect)", func(s string) (err error) {
		cfg.mode, err = redirect.ParseMode(s)
		return err
	})
	fs.Func("mark", "socket mark on detour's outbound connections, exempted by the rules (default 0x2d)", func(s string) (err error) {
		cfg.mark, err = redirect.ParseMark(s)
		return err
	})
	fs.DurationVar(&cfg.dialTimeout, "dial-timeout", cfg.dialTimeout, "timeout for connecting to a destination")
	fs.DurationVar(&cfg.idleTimeout, "idle-timeout", cfg.idleTimeout, "close a connection after this long without traffic either way")
	fs.DurationVar(&cfg.grace, "grace", cfg.grace, "on SIGINT/SIGTERM, how long live connections may take to finish")
	fs.StringVar(&cfg.logFormat, "log-format", cfg.logFormat, "log format: text or json")
	cfg.capture.registerRun(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(stdout, "usage: detour run [flags]")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
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
	switch {
	case cfg.dialTimeout <= 0:
		return cfg, usageError{fmt.Sprintf("--dial-timeout %s: must be positive", cfg.dialTimeout)}
	case cfg.idleTimeout <= 0:
		return cfg, usageError{fmt.Sprintf("--idle-timeout %s: must be positive", cfg.idleTimeout)}
	case cfg.grace < 0:
		return cfg, usageError{fmt.Sprintf("--grace %s: must not be negative", cfg.grace)}
	case cfg.logFormat != "text" && cfg.logFormat != "json":
		return cfg, usageError{fmt.Sprintf("--log-format %q: want text or json", cfg.logFormat)}
	}
	if err := cfg.capture.finish(fs, cfg.mode, cfg.listen, cfg.mark); err != nil {
		return cfg, err
	}
	return cfg, nil
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

	var handler slog.Handler = slog.NewTextHandler(stderr, nil)
	if cfg.logFormat == "json" {
		handler = slog.NewJSONHandler(stderr, nil)
	}
	log := slog.New(handler)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := redirect.Listen(ctx, cfg.mode, cfg.listen)
	if err != nil {
		log.Error("cannot start", "error", err.Error())
		return exitFailure
	}
	// Rules go in once the listener is there and out on every return below.
	keeper, err := startRuleKeeper(log, cfg.capture)
	if err != nil {
		ln.Close()
		log.Error("cannot install rules", "error", err.Error())
		return exitFailure
	}
	defer keeper.stop()
	t := &tunnel.Tunnel{
		Control:     redirect.MarkControl(cfg.mark),
		DialTimeout: cfg.dialTimeout,
		IdleTimeout: cfg.idleTimeout,
		Log:         log,
		Mode:        cfg.mode.String(),
	}
	log.Info("listening", "addr", ln.Addr().String(), "mode", cfg.mode.String(),
		"mark", fmt.Sprintf("%#x", cfg.mark), "version", versionString())

	serveErr := make(chan error, 1)
	go func() { serveErr <- t.Serve(ln) }()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
wait:
	for {
		select {
		case err := <-serveErr:
			log.Error("listener failed", "addr", ln.Addr().String(), "error", err.Error())
			return exitFailure
		case <-usr1:
			logStats(log, t)
		case <-ctx.Done():
			break wait
		}
	}
	stop() // a second signal kills the process the default way
	log.Info("shutting down", "active", t.Active(), "grace", cfg.grace)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.grace)
	defer cancel()
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
func logStats(log *slog.Logger, t *tunnel.Tunnel) {
	for range 3 {
		runtime.GC()
	}
	time.Sleep(10 * time.Millisecond) // let the pipes' cleanups run
	fds := -1
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		fds = len(ents)
	}
	log.Info("stats", "active", t.Active(), "goroutines", runtime.NumGoroutine(), "fds", fds)
}
