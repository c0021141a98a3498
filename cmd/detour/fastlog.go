package main

import (
	"context"
	"log/slog"
	"net/netip"
	"strconv"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/detour-proxy/detour/tunnel"
)

// fastHandler writes the records detour logs most, the access lines, the
// way slog.NewJSONHandler(w, nil) or slog.NewTextHandler(w, nil) would,
// byte for byte, straight into logWriter's buffer: no per-record buffer,
// no reflection, no allocation. A record it cannot write that way (a value
// of another kind, a nil pointer, a group, a LogValuer, a year outside
// 0-9999, a float JSON cannot hold) goes to the standard handler, which
// writes to the same logWriter; so do the handlers WithAttrs and WithGroup
// return.
type fastHandler struct {
	w    *logWriter
	json bool
	std  slog.Handler
}

// Tunnel hands it the access lines as their parts, without a slog.Record.
var _ tunnel.LineHandler = (*fastHandler)(nil)

// newFastHandler logs to w as JSON or as text (key=value).
func newFastHandler(w *logWriter, json bool) *fastHandler {
	h := &fastHandler{w: w, json: json}
	if json {
		h.std = slog.NewJSONHandler(w, nil)
	} else {
		h.std = slog.NewTextHandler(w, nil)
	}
	return h
}

// Enabled is the standard handlers' default: Info and above.
func (h *fastHandler) Enabled(_ context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo
}

func (h *fastHandler) WithAttrs(as []slog.Attr) slog.Handler { return h.std.WithAttrs(as) }

func (h *fastHandler) WithGroup(name string) slog.Handler { return h.std.WithGroup(name) }

func (h *fastHandler) Handle(ctx context.Context, r slog.Record) error {
	if h.w.appendLine(func(b []byte) ([]byte, bool) { return h.appendRecord(b, &r) }) {
		return nil
	}
	return h.std.Handle(ctx, r)
}

// HandleAttrs is Handle for a record given as its parts, which tunnel uses
// for the access lines (tunnel.LineHandler): a slog.Record would copy the
// attributes past its fifth to the heap. attrs are not kept.
func (h *fastHandler) HandleAttrs(ctx context.Context, t time.Time, level slog.Level, msg string, attrs []slog.Attr) error {
	if h.w.appendLine(func(b []byte) ([]byte, bool) { return h.appendParts(b, t, level, msg, attrs) }) {
		return nil
	}
	r := slog.NewRecord(t, level, msg, 0)
	r.AddAttrs(attrs...)
	return h.std.Handle(ctx, r)
}

// appendRecord appends r as one line, or reports false when the standard
// handler must write it (what it appended is then dropped).
func (h *fastHandler) appendRecord(b []byte, r *slog.Record) ([]byte, bool) {
	b, ok := h.appendHead(b, r.Time, r.Level, r.Message)
	if !ok {
		return b, false
	}
	r.Attrs(func(a slog.Attr) bool {
		b, ok = h.appendAttr(b, a)
		return ok
	})
	if !ok {
		return b, false
	}
	return h.appendEnd(b), true
}

// appendParts is appendRecord for a record's parts.
func (h *fastHandler) appendParts(b []byte, t time.Time, level slog.Level, msg string, attrs []slog.Attr) ([]byte, bool) {
	b, ok := h.appendHead(b, t, level, msg)
	for i := 0; ok && i < len(attrs); i++ {
		b, ok = h.appendAttr(b, attrs[i])
	}
	if !ok {
		return b, false
	}
	return h.appendEnd(b), true
}

// appendHead appends the time (unless zero), level and message.
func (h *fastHandler) appendHead(b []byte, t time.Time, level slog.Level, msg string) ([]byte, bool) {
	if h.json {
		b = append(b, '{')
	}
	sep := false
	if !t.IsZero() {
		t = t.Round(0)
		if !yearFits(t) {
			return b, false
		}
		b = h.appendKey(b, slog.TimeKey, sep)
		b = h.appendTime(b, t)
		sep = true
	}
	b = h.appendKey(b, slog.LevelKey, sep)
	b = h.appendString(b, level.String())
	b = h.appendKey(b, slog.MessageKey, true)
	return h.appendString(b, msg), true
}

func (h *fastHandler) appendEnd(b []byte) []byte {
	if h.json {
		b = append(b, '}')
	}
	return append(b, '\n')
}

// appendAttr appends ` key=value` or `,"key":value`.
func (h *fastHandler) appendAttr(b []byte, a slog.Attr) ([]byte, bool) {
	v := a.Value
	switch v.Kind() {
	case slog.KindString:
		b = h.appendKey(b, a.Key, true)
		return h.appendString(b, v.String()), true
	case slog.KindInt64:
		b = h.appendKey(b, a.Key, true)
		return strconv.AppendInt(b, v.Int64(), 10), true
	case slog.KindUint64:
		b = h.appendKey(b, a.Key, true)
		return strconv.AppendUint(b, v.Uint64(), 10), true
	case slog.KindFloat64:
		f := v.Float64()
		if h.json {
			return appendJSONFloat(h.appendKey(b, a.Key, true), f)
		}
		b = h.appendKey(b, a.Key, true)
		return strconv.AppendFloat(b, f, 'g', -1, 64), true
	case slog.KindBool:
		b = h.appendKey(b, a.Key, true)
		return strconv.AppendBool(b, v.Bool()), true
	case slog.KindDuration:
		b = h.appendKey(b, a.Key, true)
		if h.json {
			return strconv.AppendInt(b, int64(v.Duration()), 10), true
		}
		return appendDuration(b, v.Duration()), true
	case slog.KindTime:
		t := v.Time()
		if !yearFits(t) {
			return b, false
		}
		b = h.appendKey(b, a.Key, true)
		return h.appendTime(b, t), true
	case slog.KindAny:
		// Both handlers print these (also behind a pointer, which is
		// how tunnel passes them: boxing the value would allocate)
		// through MarshalText, which is AppendText into a fresh slice:
		// "" for the zero value.
		var scratch [64]byte
		var text []byte
		switch x := v.Any().(type) {
		case netip.AddrPort:
			text, _ = x.AppendText(scratch[:0])
		case netip.Addr:
			text, _ = x.AppendText(scratch[:0])
		case *netip.AddrPort:
			if x == nil {
				return b, false
			}
			text, _ = x.AppendText(scratch[:0])
		case *netip.Addr:
			if x == nil {
				return b, false
			}
			text, _ = x.AppendText(scratch[:0])
		default:
			return b, false
		}
		switch {
		case len(text) == 0:
			return append(h.appendKey(b, a.Key, true), '"', '"'), true
		case plainText(text):
			b = h.appendKey(b, a.Key, true)
			if h.json {
				b = append(b, '"')
				b = append(b, text...)
				return append(b, '"'), true
			}
			return append(b, text...), true
		case h.json:
			// encoding/json, not slog, escapes these (a zone with
			// odd bytes in it), in its own way.
			return b, false
		}
		// A zone that needs quoting: rare enough to allocate.
		return h.appendString(h.appendKey(b, a.Key, true), string(text)), true
	}
	return b, false // groups, LogValuers
}

// appendKey appends the separator (when sep) and the key.
func (h *fastHandler) appendKey(b []byte, key string, sep bool) []byte {
	if h.json {
		if sep {
			b = append(b, ',')
		}
		b = append(b, '"')
		b = appendJSONEscaped(b, key)
		return append(b, '"', ':')
	}
	if sep {
		b = append(b, ' ')
	}
	b = appendTextString(b, key)
	return append(b, '=')
}

func (h *fastHandler) appendString(b []byte, s string) []byte {
	if h.json {
		b = append(b, '"')
		b = appendJSONEscaped(b, s)
		return append(b, '"')
	}
	return appendTextString(b, s)
}

// appendTime is time.RFC3339Nano in JSON, and in text the same to the
// millisecond, rounded half up at a tenth of it and always three digits.
func (h *fastHandler) appendTime(b []byte, t time.Time) []byte {
	if h.json {
		b = append(b, '"')
		b = t.AppendFormat(b, time.RFC3339Nano)
		return append(b, '"')
	}
	const millis = len("2006-01-02T15:04:05.000")
	n := len(b)
	t = t.Truncate(time.Millisecond).Add(time.Millisecond / 10)
	b = t.AppendFormat(b, time.RFC3339Nano)
	// RFC3339Nano prints the 100µs added above, so there are at least
	// four digits: keep three.
	return append(b[:n+millis], b[n+millis+1:]...)
}

// yearFits is the range both handlers print as a plain four-digit year.
func yearFits(t time.Time) bool {
	y := t.Year()
	return y >= 0 && y < 10000
}

// appendJSONFloat is how encoding/json prints a float64; NaN and the
// infinities are an error there, left to the standard handler.
func appendJSONFloat(b []byte, f float64) ([]byte, bool) {
	if f != f || f > maxFloat || f < -maxFloat {
		return b, false
	}
	format := byte('f')
	if abs := max(f, -f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	n := len(b)
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// e-09 becomes e-9, as in ES6.
		if m := len(b) - n; m >= 4 && b[len(b)-4] == 'e' && b[len(b)-3] == '-' && b[len(b)-2] == '0' {
			b[len(b)-2] = b[len(b)-1]
			b = b[:len(b)-1]
		}
	}
	return b, true
}

const maxFloat = 1.79769313486231570814527423731704356798070e+308

// appendJSONEscaped is slog's JSON string escaping: \" \\ \n \r \t,
// \u00XX for other control bytes, \ufffd for each invalid UTF-8 byte, and
// \u2028 \u2029 escaped; the rest (DEL, <, >, & too) as it is.
func appendJSONEscaped(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if jsonPlain[c] {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(b, s[start:]...)
}

// jsonPlain and textPlain are the ASCII bytes that JSON strings and text
// values hold as they are: in JSON all printable ones (DEL too) but '"'
// and '\\'; in text the same with '\\' but without space and '='.
var jsonPlain, textPlain = func() (j, t [256]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		j[c] = c != '"' && c != '\\'
		t[c] = c != '"' && c != ' ' && c != '='
	}
	return j, t
}()

// plainText reports whether text is printable ASCII that both handlers
// print as it is (in JSON between quotes): no space, '=', '"' or '\\'.
func plainText(text []byte) bool {
	for _, c := range text {
		if c <= ' ' || c >= 0x7f || c == '=' || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// appendTextString is the text handler's value: as it is, or quoted
// (strconv.Quote) when empty or holding a space, '=', '"', a control or
// non-printing character or invalid UTF-8.
func appendTextString(b []byte, s string) []byte {
	if needsQuoting(s) {
		return strconv.AppendQuote(b, s)
	}
	return append(b, s...)
}

func needsQuoting(s string) bool {
	if len(s) == 0 {
		return true
	}
	for i := 0; i < len(s); {
		c := s[i]
		if textPlain[c] {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			return true
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return true
		}
		i += size
	}
	return false
}

// appendDuration is time.Duration.String without the string: "0s",
// "1.5µs", "-2h3m0.5s".
func appendDuration(b []byte, d time.Duration) []byte {
	if d == 0 {
		return append(b, "0s"...)
	}
	u := uint64(d)
	if d < 0 {
		b = append(b, '-')
		u = -u
	}
	if u < uint64(time.Second) {
		// One unit below a second, with a fraction: 1.5ms.
		var unit string
		var prec int
		switch {
		case u < uint64(time.Microsecond):
			return append(strconv.AppendUint(b, u, 10), "ns"...)
		case u < uint64(time.Millisecond):
			unit, prec = "µs", 3
		default:
			unit, prec = "ms", 6
		}
		b = appendFrac(b, u, prec)
		return append(b, unit...)
	}
	h := u / uint64(time.Hour)
	u -= h * uint64(time.Hour)
	m := u / uint64(time.Minute)
	u -= m * uint64(time.Minute)
	if h > 0 {
		b = strconv.AppendUint(b, h, 10)
		b = append(b, 'h')
	}
	if h > 0 || m > 0 {
		b = strconv.AppendUint(b, m, 10)
		b = append(b, 'm')
	}
	b = appendFrac(b, u, 9)
	return append(b, 's')
}

// appendFrac appends u/10^prec with the fraction's trailing zeros (and a
// bare point) left out.
func appendFrac(b []byte, u uint64, prec int) []byte {
	p := uint64(1)
	for range prec {
		p *= 10
	}
	b = strconv.AppendUint(b, u/p, 10)
	frac := u % p
	if frac == 0 {
		return b
	}
	for frac%10 == 0 {
		frac /= 10
		prec--
	}
	b = append(b, '.')
	var digits [9]byte
	for i := prec - 1; i >= 0; i-- {
		digits[i] = byte('0' + frac%10)
		frac /= 10
	}
	return append(b, digits[:prec]...)
}
