package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/detour-proxy/detour/redirect"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// udpSetting is --udp: in tproxy mode, capture and carry UDP too. It is a
// rule flag (`rules install` captures UDP with it) and a run flag.
type udpSetting struct {
	on       bool
	fromFile *bool // the config file's udp, when set (applyFile)
}

func (u *udpSetting) register(fs *flag.FlagSet) {
	fs.BoolVar(&u.on, "udp", true, "in tproxy mode, capture and carry UDP too (QUIC, DNS, …); "+
		"REDIRECT mode is TCP only: the kernel gives no original destination for redirected UDP, so there it is off and --udp is refused")
}

// finish settles --udp once the mode is known: on by default in tproxy
// mode, always off in redirect mode, where asking for it is an error.
func (u *udpSetting) finish(fs *flag.FlagSet, mode redirect.Mode) error {
	explicit := isSet(fs, "udp")
	if !explicit && u.fromFile != nil {
		u.on, explicit = *u.fromFile, true
	}
	if mode != redirect.TProxy {
		if explicit && u.on {
			return usageError{"--udp: only with --mode tproxy (REDIRECT gives no original destination for UDP datagrams)"}
		}
		u.on = false
	}
	return nil
}

// udpRunFlags are the run flags of UDP sessions.
type udpRunFlags struct {
	opts        tunnel.UDPOptions
	upstreamUDP string // --upstream-udp: the --upstream group's fallback
}

func (u *udpRunFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&u.opts.MaxSessions, "max-udp-sessions", 0, "UDP sessions at once; a new one beyond it evicts one: its own client's least recent if that client holds the most, else one of a client holding two more, else the session idle longest (0: 16384, or a quarter of the open-file limit if lower)")
	fs.DurationVar(&u.opts.IdleTimeout, "udp-idle-timeout", time.Minute, "end a UDP session (other than DNS and QUIC) after this long without a datagram either way")
	fs.DurationVar(&u.opts.DNSTimeout, "udp-dns-timeout", 10*time.Second, "end a DNS session after this long without a datagram either way")
	fs.DurationVar(&u.opts.QUICTimeout, "udp-quic-timeout", 30*time.Second, "end a QUIC session after this long without a datagram either way")
	fs.StringVar(&u.upstreamUDP, "upstream-udp", "", "UDP sessions for an --upstream group with no SOCKS5 or direct member (HTTP CONNECT cannot carry UDP): reject or direct (default reject)")
}

// check validates the flags; set says which were given (the file does
// not override them).
func (u *udpRunFlags) check() error {
	switch {
	case u.opts.MaxSessions < 0:
		return usageError{fmt.Sprintf("--max-udp-sessions %d: must not be negative", u.opts.MaxSessions)}
	case u.opts.IdleTimeout <= 0:
		return usageError{fmt.Sprintf("--udp-idle-timeout %s: must be positive", u.opts.IdleTimeout)}
	case u.opts.DNSTimeout <= 0:
		return usageError{fmt.Sprintf("--udp-dns-timeout %s: must be positive", u.opts.DNSTimeout)}
	case u.opts.QUICTimeout <= 0:
		return usageError{fmt.Sprintf("--udp-quic-timeout %s: must be positive", u.opts.QUICTimeout)}
	}
	if _, err := upstream.ParseUDPFallback(u.upstreamUDP); err != nil {
		return usageError{fmt.Sprintf("--upstream-udp: %v", err)}
	}
	return nil
}

// applyFile takes the file's UDP settings whose flags were not given.
func (u *udpRunFlags) applyFile(fc *fileConfig, set map[string]bool, field func(string) string) error {
	if fc.MaxUDPSessions != 0 && !set["max-udp-sessions"] {
		if fc.MaxUDPSessions < 0 {
			return fmt.Errorf("%s: must not be negative", field("max_udp_sessions"))
		}
		u.opts.MaxSessions = fc.MaxUDPSessions
	}
	for _, d := range []struct {
		name string
		v    duration
		dst  *time.Duration
	}{
		{"udp_idle_timeout", fc.UDPIdleTimeout, &u.opts.IdleTimeout},
		{"udp_dns_timeout", fc.UDPDNSTimeout, &u.opts.DNSTimeout},
		{"udp_quic_timeout", fc.UDPQUICTimeout, &u.opts.QUICTimeout},
	} {
		if d.v.set && !set[strings.ReplaceAll(d.name, "_", "-")] {
			if d.v.Duration <= 0 {
				return fmt.Errorf("%s: must be positive", field(d.name))
			}
			*d.dst = d.v.Duration
		}
	}
	return nil
}

// udpWarnings says which groups cannot carry UDP the way their name
// suggests: those with HTTP CONNECT upstreams only (their UDP sessions
// take the group's udp fallback) or some (UDP uses the others).
func udpWarnings(rt routing) []string {
	var out []string
	for _, g := range rt.groups {
		switch capable := g.CarriesUDP(); {
		case capable == 0:
			out = append(out, fmt.Sprintf("group %q has only HTTP CONNECT upstreams, which cannot carry UDP: its UDP sessions are %s (udp: %s)",
				g.Name, map[upstream.UDPFallback]string{upstream.UDPReject: "dropped", upstream.UDPDirect: "sent direct"}[g.UDPFallback], g.UDPFallback))
		case capable < len(g.Upstreams):
			out = append(out, fmt.Sprintf("group %q: its UDP sessions use only its %d SOCKS5 and direct upstreams (HTTP CONNECT cannot carry UDP)", g.Name, capable))
		}
	}
	return out
}

// udpRunner serves the transparent UDP socket.
type udpRunner struct {
	ln   *redirect.UDPListener
	pool *redirect.ReplyPool
	srv  *tunnel.UDPServer
	done chan error
	once sync.Once
}

// fdUDP names the transparent UDP socket in an upgrade's handover.
const fdUDP = "udp"

// openUDP opens the transparent UDP socket on the listening address, or
// adopts the one an upgrade handed over if it is bound there.
func openUDP(ctx context.Context, inh *inherited, listen string, mark uint32, log *slog.Logger) (*udpRunner, error) {
	pool := &redirect.ReplyPool{Mark: mark}
	if f := inh.take(fdUDP); f != nil {
		pc, err := net.FilePacketConn(f)
		f.Close()
		if err == nil {
			uc, ok := pc.(*net.UDPConn)
			if ok && redirect.SameAddr(uc.LocalAddr().(*net.UDPAddr).AddrPort(), listen) {
				var ln *redirect.UDPListener
				if ln, err = redirect.NewUDPListener(uc); err == nil {
					return &udpRunner{ln: ln, pool: pool}, nil
				}
			} else {
				err = fmt.Errorf("bound to %s, not %s", pc.LocalAddr(), listen)
			}
			pc.Close()
		}
		log.Warn("upgrade: not using the inherited UDP socket; listening anew", "error", err.Error())
	}
	ln, err := redirect.ListenUDP(ctx, listen)
	if err != nil {
		return nil, err
	}
	return &udpRunner{ln: ln, pool: pool}, nil
}

// serve starts carrying sessions with t's routes.
func (u *udpRunner) serve(t *tunnel.Tunnel, opts tunnel.UDPOptions, sniffOff bool, m *metrics) {
	opts.SniffDisabled = sniffOff
	u.srv = &tunnel.UDPServer{Tunnel: t, Replies: replyPool{u.pool}, Options: opts}
	if m != nil {
		u.srv.Observer = m.addUDP(u.srv, u.pool)
	}
	u.done = make(chan error, 1)
	go func() { u.done <- u.srv.ServeUDP(udpListener{u.ln}) }()
}

// shutdown ends every session and closes the sockets.
func (u *udpRunner) shutdown() {
	if u == nil {
		return
	}
	u.once.Do(func() {
		if u.srv != nil {
			u.srv.Shutdown()
			<-u.done
		}
		u.ln.Close()
		u.pool.Close()
	})
}

func (u *udpRunner) sessions() int {
	if u == nil || u.srv == nil {
		return 0
	}
	return u.srv.Sessions()
}

// udpListener adapts *redirect.UDPListener to tunnel.PacketListener.
type udpListener struct{ *redirect.UDPListener }

func (l udpListener) ReadDatagram(b, oob []byte) (int, netip.AddrPort, netip.AddrPort, string, error) {
	n, client, dst, err := l.UDPListener.ReadDatagram(b, oob)
	switch {
	case err == nil:
		return n, client, dst, "", nil
	case errors.Is(err, redirect.ErrNoOrigDst):
		return n, client, dst, "no_orig_dst", nil
	case errors.Is(err, redirect.ErrNotRedirected):
		return n, client, dst, "own_port", nil
	case errors.Is(err, redirect.ErrTruncated):
		return n, client, dst, "truncated", nil
	}
	return 0, client, dst, "", err
}

// replyPool adapts *redirect.ReplyPool to tunnel.Replier.
type replyPool struct{ p *redirect.ReplyPool }

func (r replyPool) AcquireReply(from netip.AddrPort) (tunnel.ReplySender, error) {
	s, err := r.p.Acquire(from)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// udpMetrics implements tunnel.UDPObserver.
type udpMetrics struct {
	started prometheus.Counter
	closed  *prometheus.CounterVec
	dgrams  *prometheus.CounterVec
	bytes   *prometheus.CounterVec
	sniffs  *prometheus.CounterVec
	dropped *prometheus.CounterVec
}

// addUDP registers the UDP metrics.
func (m *metrics) addUDP(srv *tunnel.UDPServer, pool *redirect.ReplyPool) *udpMetrics {
	u := &udpMetrics{
		started: prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_udp_sessions_total", Help: "UDP sessions started."}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_udp_sessions_closed_total",
			Help: "UDP sessions ended, by route and how (idle, evicted, error, shutdown)."}, []string{"route", "end"}),
		dgrams: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_udp_datagrams_total",
			Help: "Datagrams carried by ended UDP sessions: up is client to destination, down the reverse."}, []string{"direction"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_udp_bytes_total",
			Help: "Payload bytes carried by ended UDP sessions."}, []string{"direction"}),
		sniffs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_udp_sniff_total",
			Help: "What the first datagrams of UDP sessions said, by protocol (quic, dns, unknown) and outcome."}, []string{"proto", "outcome"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_udp_dropped_total",
			Help: "Datagrams dropped outside any session: no_orig_dst, own_port, truncated; replies that could not be sent: reply_addr_in_use (EADDRINUSE binding the original destination), reply_failed."}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{u.started, u.closed, u.dgrams, u.bytes, u.sniffs, u.dropped} {
		m.reg.MustRegister(c)
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_udp_sessions_active", Help: "UDP sessions now."},
		func() float64 { return float64(srv.Sessions()) }))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_udp_reply_sockets", Help: "Transparent reply sockets open (held by sessions or idle)."},
		func() float64 { return float64(pool.Open()) }))
	// Known labels start at zero, so a scrape shows them before they move.
	for _, r := range []string{"no_orig_dst", "own_port", "truncated", "reply_addr_in_use", "reply_failed"} {
		u.dropped.WithLabelValues(r)
	}
	return u
}

func (u *udpMetrics) UDPSessionStarted() { u.started.Inc() }
func (u *udpMetrics) UDPSessionEnded(route, end string, dgUp, dgDown, up, down int64) {
	u.closed.WithLabelValues(route, end).Inc()
	u.dgrams.WithLabelValues("up").Add(float64(dgUp))
	u.dgrams.WithLabelValues("down").Add(float64(dgDown))
	u.bytes.WithLabelValues("up").Add(float64(up))
	u.bytes.WithLabelValues("down").Add(float64(down))
}
func (u *udpMetrics) UDPDropped(reason string) { u.dropped.WithLabelValues(reason).Inc() }
func (u *udpMetrics) UDPSniffed(p sniff.Proto, outcome string) {
	u.sniffs.WithLabelValues(p.String(), outcome).Inc()
}

var _ tunnel.UDPObserver = (*udpMetrics)(nil)

// logUDPWarnings logs udpWarnings once at start.
func logUDPWarnings(log *slog.Logger, rt routing) {
	for _, w := range udpWarnings(rt) {
		log.Warn(w)
	}
}
