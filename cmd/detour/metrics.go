package main

import (
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/relay"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// metrics is detour's Prometheus registry; it implements tunnel.Observer.
// All names start with detour_.
type metrics struct {
	reg      *prometheus.Registry
	accepted prometheus.Counter
	refused  *prometheus.CounterVec
	closed   *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	sniffs   *prometheus.CounterVec
	sniffECH prometheus.Counter
	sniffDur prometheus.Histogram
	dialDur  *prometheus.HistogramVec
	dialFail *prometheus.CounterVec
	reloads  *prometheus.CounterVec
	loops    prometheus.Counter
	preconn  *prometheus.CounterVec

	// per inbound (transparent, proxy)
	inAccepted *prometheus.CounterVec
	inRefused  *prometheus.CounterVec
	inClosed   *prometheus.CounterVec
	inBytes    *prometheus.CounterVec
}

var (
	_ tunnel.Observer           = (*metrics)(nil)
	_ tunnel.PreconnectObserver = inboundObserver{}
)

// newMetrics registers detour's metrics. active reports the connections
// being served; relays what the relay engine holds; groups the upstream
// groups in use now (they change on reload).
func newMetrics(active func() int, relays func() relay.Stats, groups func() []*upstream.Group) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	f := func(c prometheus.Collector) { m.reg.MustRegister(c) }
	m.accepted = prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_connections_accepted_total", Help: "Connections accepted and served."})
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_connections_refused_total", Help: "Connections closed before routing: not redirected, or over --max-conns."}, []string{"reason"})
	m.closed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_connections_closed_total", Help: "Served connections that ended, by route (direct, reject or a group)."}, []string{"route"})
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_bytes_total", Help: "Bytes relayed: up is client to destination, down the reverse."}, []string{"direction"})
	m.sniffECH = prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_sniff_ech_total", Help: "TLS ClientHellos with encrypted_client_hello (GREASE or real, which cannot be told apart); their outer name is routed on and sent upstream."})
	m.sniffs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_sniff_total", Help: "Sniffing outcomes by protocol found."}, []string{"proto", "outcome"})
	m.sniffDur = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "detour_sniff_duration_seconds", Help: "Time from accept to the end of sniffing.",
		Buckets: []float64{.0001, .0005, .001, .005, .01, .05, .1, .3, 1}})
	m.dialDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "detour_dial_duration_seconds", Help: "Time to connect to the destination or through an upstream, by route.",
		Buckets: []float64{.0005, .001, .005, .01, .05, .1, .5, 1, 5}}, []string{"route"})
	m.dialFail = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_dial_failures_total", Help: "Failed dials, by route."}, []string{"route"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_reloads_total", Help: "Configuration reloads on SIGHUP, by result."}, []string{"result"})
	m.inAccepted = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_inbound_accepted_total", Help: "Connections accepted, by inbound (transparent: redirected by the kernel; proxy: the explicit proxy port)."}, []string{"inbound"})
	m.inRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_inbound_refused_total", Help: "Connections or requests refused before routing, by inbound and reason (proxy: not_allowed, auth, bad_request)."}, []string{"inbound", "reason"})
	m.inClosed = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_inbound_closed_total", Help: "Routed connections (for the proxy port's HTTP forwarding: requests) that ended, by inbound and route."}, []string{"inbound", "route"})
	m.inBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_inbound_bytes_total", Help: "Bytes carried by inbound: up is client to destination, down the reverse."}, []string{"inbound", "direction"})
	m.loops = prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_loops_total", Help: "Connections refused as routing loops: detour's own connections that came back to it."})
	m.preconn = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_upstream_preconnects_total", Help: "Upstream connections opened while the client's first bytes were awaited (the group's pick cannot depend on the name), by outcome: used, or unused (closed: the client went away or a fresh dial replaced it)."}, []string{"outcome"})
	for _, c := range []prometheus.Collector{m.accepted, m.refused, m.closed, m.bytes, m.sniffs, m.sniffECH, m.sniffDur, m.dialDur, m.dialFail, m.reloads, m.loops, m.preconn,
		m.inAccepted, m.inRefused, m.inClosed, m.inBytes} {
		f(c)
	}
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_connections_active", Help: "Connections being served."},
		func() float64 { return float64(active()) }))
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_relay_parked", Help: "Relay directions waiting for bytes without a goroutine (two per idle connection)."},
		func() float64 { return float64(relays().Parked) }))
	f(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_relay_pipes", Help: "Splice pipes open, in use or pooled (two descriptors each)."},
		func() float64 { return float64(relays().Pipes) }))
	f(&upstreamCollector{groups: groups})
	f(collectors.NewGoCollector())
	f(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) Accepted() { m.accepted.Inc() }
func (m *metrics) Refused(reason string) {
	m.refused.WithLabelValues(reason).Inc()
	if reason == "loop" {
		m.loops.Inc()
	}
}
func (m *metrics) Sniffed(found sniff.Result, outcome string, took time.Duration) {
	m.sniffs.WithLabelValues(found.Proto.String(), outcome).Inc()
	if found.ECH {
		m.sniffECH.Inc()
	}
	if took > 0 {
		m.sniffDur.Observe(took.Seconds())
	}
}
func (m *metrics) Dialed(route string, took time.Duration, err error) {
	m.dialDur.WithLabelValues(route).Observe(took.Seconds())
	if err != nil {
		m.dialFail.WithLabelValues(route).Inc()
	}
}
func (m *metrics) Preconnected(used bool) {
	if used {
		m.preconn.WithLabelValues("used").Inc()
	} else {
		m.preconn.WithLabelValues("unused").Inc()
	}
}
func (m *metrics) Closed(route string, up, down int64) {
	m.closed.WithLabelValues(route).Inc()
	m.bytes.WithLabelValues("up").Add(float64(up))
	m.bytes.WithLabelValues("down").Add(float64(down))
}

// inbound is the observer for one inbound: detour's totals, and the
// inbound's own counters.
func (m *metrics) inbound(name string) tunnel.Observer { return inboundObserver{m, name} }

type inboundObserver struct {
	*metrics
	name string
}

func (o inboundObserver) Accepted() {
	o.metrics.Accepted()
	o.inAccepted.WithLabelValues(o.name).Inc()
}
func (o inboundObserver) Refused(reason string) {
	o.metrics.Refused(reason)
	o.inRefused.WithLabelValues(o.name, reason).Inc()
}
func (o inboundObserver) Closed(route string, up, down int64) {
	o.metrics.Closed(route, up, down)
	o.inClosed.WithLabelValues(o.name, route).Inc()
	o.inBytes.WithLabelValues(o.name, "up").Add(float64(up))
	o.inBytes.WithLabelValues(o.name, "down").Add(float64(down))
}

// upstreamCollector reports each upstream's state at scrape time.
type upstreamCollector struct{ groups func() []*upstream.Group }

var (
	upDesc     = prometheus.NewDesc("detour_upstream_up", "1 if the upstream is usable, 0 while it is in back-off after a failure.", []string{"group", "upstream"}, nil)
	activeDesc = prometheus.NewDesc("detour_upstream_active", "Connections carried by the upstream now.", []string{"group", "upstream"}, nil)
)

func (c *upstreamCollector) Describe(ch chan<- *prometheus.Desc) { ch <- upDesc; ch <- activeDesc }
func (c *upstreamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, g := range c.groups() {
		for _, u := range g.Upstreams {
			up := 0.0
			if u.Up() {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(upDesc, prometheus.GaugeValue, up, g.Name, u.Name)
			ch <- prometheus.MustNewConstMetric(activeDesc, prometheus.GaugeValue, float64(u.Active()), g.Name, u.Name)
		}
	}
}

// serveMetrics serves /metrics on ln until the returned server is closed.
func serveMetrics(ln net.Listener, m *metrics, log *slog.Logger) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return serveHTTP(ln, mux, "metrics", log)
}

// servePprof serves Go's runtime profiles (net/http/pprof) on ln.
func servePprof(ln net.Listener, log *slog.Logger) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return serveHTTP(ln, mux, "profile", log)
}

// serveHTTP serves h on ln in the background until the server is closed.
func serveHTTP(ln net.Listener, h http.Handler, what string, log *slog.Logger) *http.Server {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error(what+" server failed", "addr", ln.Addr().String(), "error", err.Error())
		}
	}()
	return srv
}

// groupsBox holds the groups in use, swapped on reload.
type groupsBox struct {
	p atomic.Pointer[[]*upstream.Group]
}

func (b *groupsBox) set(g []*upstream.Group) { b.p.Store(&g) }
func (b *groupsBox) get() []*upstream.Group {
	if g := b.p.Load(); g != nil {
		return *g
	}
	return nil
}

// proxyUDPMetrics are the proxy port's UDP ASSOCIATE sessions; it
// implements tunnel.UDPObserver.
type proxyUDPMetrics struct {
	started prometheus.Counter
	closed  *prometheus.CounterVec
	bytes   *prometheus.CounterVec
	dropped *prometheus.CounterVec
}

// addProxyUDP registers the proxy port's UDP metrics; sessions reports
// its sessions now.
func (m *metrics) addProxyUDP(sessions func() int) *proxyUDPMetrics {
	u := &proxyUDPMetrics{
		started: prometheus.NewCounter(prometheus.CounterOpts{Name: "detour_proxy_udp_sessions_total", Help: "UDP sessions of the proxy port's SOCKS5 UDP associations."}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_proxy_udp_sessions_closed_total",
			Help: "The proxy port's UDP sessions ended, by route and how (idle, evicted, error, shutdown)."}, []string{"route", "end"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_proxy_udp_bytes_total",
			Help: "Payload bytes carried by the proxy port's ended UDP sessions."}, []string{"direction"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "detour_proxy_udp_dropped_total",
			Help: "Datagrams on a UDP association dropped outside any session: not_associated (another source), bad_header, unresolved; reply_failed."}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{u.started, u.closed, u.bytes, u.dropped} {
		m.reg.MustRegister(c)
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "detour_proxy_udp_sessions_active", Help: "The proxy port's UDP sessions now."},
		func() float64 { return float64(sessions()) }))
	return u
}

func (u *proxyUDPMetrics) UDPSessionStarted() { u.started.Inc() }
func (u *proxyUDPMetrics) UDPSessionEnded(route, end string, _, _, up, down int64) {
	u.closed.WithLabelValues(route, end).Inc()
	u.bytes.WithLabelValues("up").Add(float64(up))
	u.bytes.WithLabelValues("down").Add(float64(down))
}
func (u *proxyUDPMetrics) UDPDropped(reason string)           { u.dropped.WithLabelValues(reason).Inc() }
func (u *proxyUDPMetrics) UDPSniffed(_ sniff.Proto, _ string) {}
