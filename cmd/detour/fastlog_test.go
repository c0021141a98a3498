package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// stdLine is what the standard handler prints for r.
func stdLine(t testing.TB, json bool, r slog.Record) string {
	t.Helper()
	var buf bytes.Buffer
	var h slog.Handler = slog.NewTextHandler(&buf, nil)
	if json {
		h = slog.NewJSONHandler(&buf, nil)
	}
	if err := h.Handle(context.Background(), r); err != nil {
		t.Fatalf("std handler: %v", err)
	}
	return buf.String()
}

// fastLine is what fastHandler appends for r itself, and whether it does;
// given as a Record or as its parts, it must be the same.
func fastLine(t testing.TB, json bool, r slog.Record) (string, bool) {
	t.Helper()
	h := &fastHandler{json: json}
	b, ok := h.appendRecord(nil, &r)
	p, pok := h.appendParts(nil, r.Time, r.Level, r.Message, attrsOf(r))
	if ok != pok || ok && string(b) != string(p) {
		t.Fatalf("%s: the record gives %v %q, its parts %v %q", format(json), ok, b, pok, p)
	}
	return string(b), ok
}

func attrsOf(r slog.Record) []slog.Attr {
	var as []slog.Attr
	r.Attrs(func(a slog.Attr) bool {
		as = append(as, a)
		return true
	})
	return as
}

func format(json bool) string {
	if json {
		return "json"
	}
	return "text"
}

// accessRecord is a transparent connection's access line as tunnel's
// logConn builds it.
func accessRecord(when time.Time) slog.Record {
	client, dst := netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("198.18.2.2:443")
	r := slog.NewRecord(when, slog.LevelInfo, "conn", 0)
	r.AddAttrs(
		slog.Any("client", &client),
		slog.Any("dst", &dst),
		slog.String("inbound", "transparent"),
		slog.String("mode", "redirect"),
		slog.String("host", "site.test"),
		slog.String("proto", "tls"),
		slog.String("sniff", "found"),
		slog.Duration("sniff_time", 1234567*time.Nanosecond),
		slog.String("route", "direct"),
		slog.String("alpn", "h2,http/1.1"),
		slog.Int64("up", 517),
		slog.Int64("down", 4096),
		slog.Duration("duration", 2*time.Second+3*time.Millisecond),
		slog.String("error", ""))
	return r
}

func TestFastHandlerMatchesStd(t *testing.T) {
	now := time.Date(2026, 12, 6, 7, 8, 9, 123456789, time.UTC)
	zone := time.FixedZone("X", -(3*3600 + 30*60))
	odd := []string{"", " ", "a b", "k=v", `"q"`, `back\slash`, "new\nline", "tab\t", "cr\r", "\x00\x01\x1f\x7f",
		"\b\f", "\xff", "a\xc3", "héllo", "日本", "\u2028\u2029", "\u00a0", "\ufeff", "\U0001F600", "\u200b", "\ufffd", "<&>", "-", "1.5"}
	type tc struct {
		name  string
		rec   func() slog.Record
		fast  bool // both formats are written by fastHandler itself
		fastJ bool // only JSON is (when fast is false)
		fastT bool // only text is
	}
	cases := []tc{
		{name: "access", rec: func() slog.Record { return accessRecord(now) }, fast: true},
		{name: "zero time", rec: func() slog.Record { return accessRecord(time.Time{}) }, fast: true},
		{name: "monotonic", rec: func() slog.Record { return accessRecord(time.Now()) }, fast: true},
		{name: "no attrs", rec: func() slog.Record { return slog.NewRecord(now, slog.LevelWarn, "", 0) }, fast: true},
		{name: "levels", rec: func() slog.Record {
			r := slog.NewRecord(now.In(zone), slog.LevelError+2, "m", 0)
			r.AddAttrs(slog.Int("n", -1))
			return r
		}, fast: true},
		{name: "odd strings", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, strings.Join(odd, ""), 0)
			for _, s := range odd {
				r.AddAttrs(slog.String(s, s))
			}
			return r
		}, fast: true},
		{name: "numbers", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "n", 0)
			r.AddAttrs(slog.Int64("min", math.MinInt64), slog.Uint64("max", math.MaxUint64), slog.Bool("t", true), slog.Bool("f", false))
			for _, f := range []float64{0, math.Copysign(0, -1), 1, -1.5, 1e-7, 1e-6, 123456789, 1e20, 1e21, 1e300, -1e-300, 5e-324, math.MaxFloat64, 0.1, 1.0 / 3} {
				r.AddAttrs(slog.Float64("f", f))
			}
			return r
		}, fast: true},
		{name: "durations", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "d", 0)
			for _, d := range []time.Duration{0, 1, -1, 999, 1000, 1500, time.Millisecond, 1234567, -1234567, time.Second, 90 * time.Second,
				time.Hour, 3*time.Hour + 100*time.Nanosecond, 61 * time.Minute, math.MaxInt64, math.MinInt64, -time.Hour - time.Nanosecond} {
				r.AddAttrs(slog.Duration("d", d))
			}
			return r
		}, fast: true},
		{name: "times", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "t", 0)
			r.AddAttrs(slog.Time("zero", time.Time{}), slog.Time("zone", now.In(zone)), slog.Time("utc", time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)),
				slog.Time("ms", time.Date(2000, 1, 1, 0, 0, 0, 999_950_000, time.UTC)), slog.Time("local", now.Local()))
			return r
		}, fast: true},
		{name: "addresses", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "a", 0)
			ap, ap0, a := netip.MustParseAddrPort("[fd00::2]:8080"), netip.AddrPort{}, netip.MustParseAddr("198.18.0.2")
			r.AddAttrs(slog.Any("ap0", netip.AddrPort{}), slog.Any("a0", netip.Addr{}),
				slog.Any("ap0port", netip.AddrPortFrom(netip.Addr{}, 80)),
				slog.Any("v6", netip.MustParseAddrPort("[fd00::1]:53")), slog.Any("zone", netip.MustParseAddrPort("[fe80::1%eth0]:53")),
				slog.Any("mapped", netip.MustParseAddrPort("[::ffff:198.18.0.1]:1")), slog.Any("a4", netip.MustParseAddr("198.18.0.1")),
				slog.Any("a6", netip.MustParseAddr("fe80::1%lo")), slog.Any("ptr", &ap), slog.Any("ptr0", &ap0), slog.Any("addrptr", &a))
			return r
		}, fast: true},
		{name: "zone with a space", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "a", 0)
			r.AddAttrs(slog.Any("a", netip.MustParseAddr("fe80::1").WithZone("a b\"\b")))
			return r
		}, fastT: true},
		{name: "year 10000", rec: func() slog.Record { return accessRecord(time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)) }},
		{name: "attr year -1", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			r.AddAttrs(slog.Time("t", time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)))
			return r
		}},
		{name: "NaN", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			r.AddAttrs(slog.Float64("nan", math.NaN()), slog.Float64("inf", math.Inf(-1)))
			return r
		}, fastT: true},
		{name: "group", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			r.AddAttrs(slog.String("a", "b"), slog.Group("g", slog.Int("x", 1)))
			return r
		}},
		{name: "error", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			r.AddAttrs(slog.Any("err", errors.New("boom")))
			return r
		}},
		{name: "pointer", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			ap := netip.MustParseAddrPort("198.18.0.1:1")
			var nilAP *netip.AddrPort
			r.AddAttrs(slog.Any("p", &ap), slog.Any("nilp", nilAP), slog.Any("nil", nil))
			return r
		}},
		{name: "valuer", rec: func() slog.Record {
			r := slog.NewRecord(now, slog.LevelInfo, "m", 0)
			r.AddAttrs(slog.Any("v", valuer{}))
			return r
		}},
	}
	for _, c := range cases {
		for _, json := range []bool{false, true} {
			t.Run(c.name+"/"+format(json), func(t *testing.T) {
				r := c.rec()
				want := stdLine(t, json, r)
				got, ok := fastLine(t, json, r)
				wantFast := c.fast || (json && c.fastJ) || (!json && c.fastT)
				if ok != wantFast {
					t.Errorf("written by fastHandler: %v, want %v", ok, wantFast)
				}
				if ok && got != want {
					t.Errorf("fast:\n%q\nstd:\n%q", got, want)
				}
				// Through Handle and logWriter: the same bytes, from
				// whichever handler writes them.
				if through := handleAll(t, json, []slog.Record{r}, nil); through != want {
					t.Errorf("through logWriter:\n%q\nstd:\n%q", through, want)
				}
				var buf bytes.Buffer
				l := newLogWriter(&buf, time.Hour)
				if err := newFastHandler(l, json).HandleAttrs(context.Background(), r.Time, r.Level, r.Message, attrsOf(r)); err != nil {
					t.Fatalf("HandleAttrs: %v", err)
				}
				l.Close()
				if buf.String() != want {
					t.Errorf("HandleAttrs through logWriter:\n%q\nstd:\n%q", buf.String(), want)
				}
			})
		}
	}
}

type valuer struct{}

func (valuer) LogValue() slog.Value { return slog.StringValue("resolved") }

// handleAll logs rs through a fastHandler on a logWriter (then with
// extra(h)'s handler, if any) and returns what reached the writer.
func handleAll(t testing.TB, json bool, rs []slog.Record, extra func(slog.Handler) slog.Handler) string {
	t.Helper()
	var buf bytes.Buffer
	l := newLogWriter(&buf, time.Hour)
	var h slog.Handler = newFastHandler(l, json)
	if extra != nil {
		h = extra(h)
	}
	for _, r := range rs {
		if err := h.Handle(context.Background(), r); err != nil {
			t.Fatalf("Handle: %v", err)
		}
	}
	l.Close()
	return buf.String()
}

// Records the fast path writes and those it leaves to the standard handler
// reach the writer in order, and WithAttrs/WithGroup print as the standard
// handler's do.
func TestFastHandlerFallbackInOrder(t *testing.T) {
	now := time.Date(2026, 12, 6, 7, 8, 9, 0, time.UTC)
	group := slog.NewRecord(now, slog.LevelInfo, "g", 0)
	group.AddAttrs(slog.Group("g", slog.String("k", "v")))
	rs := []slog.Record{accessRecord(now), group, accessRecord(now)}
	for _, json := range []bool{false, true} {
		want := stdLine(t, json, rs[0]) + stdLine(t, json, rs[1]) + stdLine(t, json, rs[2])
		if got := handleAll(t, json, rs, nil); got != want {
			t.Errorf("%s:\n%s\nwant\n%s", format(json), got, want)
		}
		with := func(h slog.Handler) slog.Handler { return h.WithAttrs([]slog.Attr{slog.Int("pid", 1)}).WithGroup("x") }
		var buf bytes.Buffer
		var std slog.Handler = slog.NewTextHandler(&buf, nil)
		if json {
			std = slog.NewJSONHandler(&buf, nil)
		}
		std = with(std)
		std.Handle(context.Background(), rs[0])
		if got := handleAll(t, json, rs[:1], with); got != buf.String() {
			t.Errorf("%s WithAttrs/WithGroup:\n%s\nwant\n%s", format(json), got, buf.String())
		}
	}
}

func TestFastHandlerEnabled(t *testing.T) {
	h := newFastHandler(newLogWriter(io.Discard, time.Hour), false)
	defer h.w.Close()
	std := slog.NewTextHandler(io.Discard, nil)
	for _, l := range []slog.Level{slog.LevelDebug, slog.LevelInfo - 1, slog.LevelInfo, slog.LevelWarn, slog.LevelError + 4} {
		if got, want := h.Enabled(context.Background(), l), std.Enabled(context.Background(), l); got != want {
			t.Errorf("Enabled(%v) = %v, want %v", l, got, want)
		}
	}
}

// An access record costs no allocation in the handler, in either format.
func TestFastHandlerAllocs(t *testing.T) {
	r := accessRecord(time.Now())
	for _, json := range []bool{false, true} {
		l := newLogWriter(io.Discard, time.Hour)
		h := newFastHandler(l, json)
		ctx := context.Background()
		h.Handle(ctx, r) // the buffer's first growth
		if n := testing.AllocsPerRun(100, func() { h.Handle(ctx, r) }); n != 0 {
			t.Errorf("%s: %v allocations per access record, want 0", format(json), n)
		}
		as := attrsOf(r)
		if n := testing.AllocsPerRun(100, func() { h.HandleAttrs(ctx, r.Time, r.Level, r.Message, as) }); n != 0 {
			t.Errorf("%s: %v allocations per access line's parts, want 0", format(json), n)
		}
		l.Close()
	}
}

// FuzzFastHandler checks that whatever fastHandler writes itself is what
// the standard handler would, and that it writes all it should.
func FuzzFastHandler(f *testing.F) {
	f.Add("conn", "client", "198.18.0.1", "", int64(517), uint64(4096), 1.5, int64(1234567), true, int64(1765000000), int64(123456789), int32(0),
		[]byte{198, 18, 0, 1}, uint16(40000), "", uint16(0))
	f.Add("a\"b\\c\nd", "k=v", "a b", "\xff\x00", int64(-1), uint64(0), 1e-7, int64(-1), false, int64(0), int64(0), int32(-12600),
		[]byte{0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint16(53), "eth0", uint16(0xffff))
	f.Add("", "", "\u2028", "日本\t", int64(math.MinInt64), uint64(math.MaxUint64), math.Inf(1), int64(math.MaxInt64), true, int64(-62135596800), int64(0), int32(3600),
		[]byte{}, uint16(0), "a b", uint16(1))
	f.Add("m", " ", "\x7f", "=", int64(0), uint64(1), math.NaN(), int64(0), false, int64(253402300800), int64(999999999), int32(59),
		[]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 0, 1}, uint16(1), "\"", uint16(2))
	f.Fuzz(func(t *testing.T, msg, key, s1, s2 string, i int64, u uint64, fl float64, d int64, b bool, sec, nsec int64, offset int32,
		ip []byte, port uint16, zone string, sel uint16) {
		tz := time.FixedZone("Z", int(offset))
		when := time.Unix(sec, nsec).In(tz)
		if sel&1 != 0 {
			when = time.Time{}
		}
		levels := []slog.Level{slog.LevelInfo, slog.LevelWarn, slog.LevelError, slog.LevelInfo + 2, slog.LevelDebug}
		r := slog.NewRecord(when, levels[int(sel>>1)%len(levels)], msg, 0)
		addr, _ := netip.AddrFromSlice(ip)
		if addr.Is6() {
			addr = addr.WithZone(zone)
		}
		ap := netip.AddrPortFrom(addr, port)
		attrs := []slog.Attr{
			slog.String(key, s1), slog.String("s", s2), slog.String(s1, s2),
			slog.Int64("i", i), slog.Uint64("u", u), slog.Float64("f", fl), slog.Duration("d", time.Duration(d)),
			slog.Bool("b", b), slog.Time("t", time.Unix(nsec, sec).In(tz)),
			slog.Any("ap", netip.AddrPortFrom(addr, port)), slog.Any("a", addr),
			slog.Any("ap0", netip.AddrPort{}), slog.Any("a0", netip.Addr{}), slog.Any("app", &ap), slog.Any("addrp", &addr),
		}
		// sel's upper bits leave some out.
		for n, a := range attrs {
			if sel&(1<<(n%13+3)) == 0 || n < 2 || n > 12 {
				r.AddAttrs(a)
			}
		}
		yearOK := func(t time.Time) bool { return t.IsZero() || (t.Year() >= 0 && t.Year() < 10000) }
		for _, json := range []bool{false, true} {
			want := stdLine(t, json, r)
			got, ok := fastLine(t, json, r)
			if ok && got != want {
				t.Fatalf("%s:\nfast %q\nstd  %q", format(json), got, want)
			}
			// What it must not leave to the standard handler.
			fallback := !yearOK(when)
			r.Attrs(func(a slog.Attr) bool {
				switch v := a.Value; v.Kind() {
				case slog.KindTime:
					fallback = fallback || !yearOK(v.Time())
				case slog.KindFloat64:
					fallback = fallback || json && (math.IsNaN(v.Float64()) || math.IsInf(v.Float64(), 0))
				case slog.KindAny:
					if a, ok := v.Any().(netip.Addr); ok && json && a.Zone() != "" && !plainText([]byte(a.Zone())) {
						fallback = true
					}
					if ap, ok := v.Any().(netip.AddrPort); ok && json && ap.Addr().Zone() != "" && !plainText([]byte(ap.Addr().Zone())) {
						fallback = true
					}
					if json && !plainText([]byte(addr.Zone())) && addr.Zone() != "" && (v.Any() == any(&ap) || v.Any() == any(&addr)) {
						fallback = true
					}
				}
				return true
			})
			if ok == fallback {
				t.Fatalf("%s: written by fastHandler %v, want %v for\n%q", format(json), ok, !fallback, want)
			}
		}
	})
}

// BenchmarkLogAccess is one access record to a logWriter that writes to
// io.Discard: "logger" through slog.Logger.LogAttrs with the standard
// handler (how tunnel logged before fastHandler), "record" a Record built
// and handed to the handler, "parts" the same without a Record (as tunnel
// hands fastHandler the access lines), "handle" only the handler's
// work on a record built once.
func BenchmarkLogAccess(b *testing.B) {
	client := netip.MustParseAddrPort("198.18.0.1:40000")
	dst := netip.MustParseAddrPort("198.18.2.2:443")
	// Built anew for each line, on the stack, as tunnel's are.
	attrs := func(as *[13]slog.Attr) []slog.Attr {
		*as = [...]slog.Attr{slog.Any("client", &client), slog.Any("dst", &dst), slog.String("inbound", "transparent"),
			slog.String("mode", "redirect"), slog.String("host", "site.test"), slog.String("proto", "http"),
			slog.String("sniff", "found"), slog.Duration("sniff_time", time.Millisecond), slog.String("route", "direct"),
			slog.Int64("up", 100), slog.Int64("down", 200), slog.Duration("duration", 1234567*time.Nanosecond),
			slog.String("error", "")}
		return as[:]
	}
	ctx := context.Background()
	for _, json := range []bool{false, true} {
		for _, fast := range []bool{false, true} {
			for _, how := range []string{"logger", "record", "parts", "handle"} {
				if how == "parts" && !fast {
					continue // the standard handlers take only Records
				}
				name := format(json) + "/std/" + how
				if fast {
					name = format(json) + "/fast/" + how
				}
				b.Run(name, func(b *testing.B) {
					l := newLogWriter(io.Discard, logFlushEvery)
					defer l.Close()
					var h slog.Handler
					switch {
					case fast:
						h = newFastHandler(l, json)
					case json:
						h = slog.NewJSONHandler(l, nil)
					default:
						h = slog.NewTextHandler(l, nil)
					}
					log := slog.New(h)
					built := slog.NewRecord(time.Now(), slog.LevelInfo, "conn", 0)
					var as [13]slog.Attr
					built.AddAttrs(attrs(&as)...)
					b.ReportAllocs()
					for b.Loop() {
						switch how {
						case "logger":
							log.LogAttrs(ctx, slog.LevelInfo, "conn", attrs(&as)...)
						case "record":
							if h.Enabled(ctx, slog.LevelInfo) {
								r := slog.NewRecord(time.Now(), slog.LevelInfo, "conn", 0)
								r.AddAttrs(attrs(&as)...)
								h.Handle(ctx, r)
							}
						case "parts":
							if h.Enabled(ctx, slog.LevelInfo) {
								h.(*fastHandler).HandleAttrs(ctx, time.Now(), slog.LevelInfo, "conn", attrs(&as))
							}
						default:
							h.Handle(ctx, built)
						}
					}
				})
			}
		}
	}
}
