package sniff

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// flight is one capture of sniff/testdata, with what sniff must report.
type flight struct {
	file string
	data []byte
	want Result
	alpn []string
}

// A manifest entry: a line of testdata/corpus.txt or udp-corpus.txt and
// its five fields (FILE PROTO HOST ALPN ECH-or-QTYPE).
type manifestEntry struct {
	line   string
	fields []string
}

// manifest reads testdata/NAME, skipping blank lines and # comments; a line
// without five fields fails the test.
func manifest(tb testing.TB, name string) []manifestEntry {
	tb.Helper()
	f, err := os.Open(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	var out []manifestEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) != 5 {
			tb.Fatalf("%s: bad line %q", name, line)
		}
		out = append(out, manifestEntry{line, fields})
	}
	if err := sc.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

// loadCorpus reads testdata/corpus.txt and the flights it lists.
func loadCorpus(tb testing.TB) []flight {
	tb.Helper()
	var out []flight
	for _, e := range manifest(tb, "corpus.txt") {
		line, fields := e.line, e.fields
		data, err := os.ReadFile(filepath.Join("testdata", "flights", fields[0]))
		if err != nil {
			tb.Fatal(err)
		}
		fl := flight{file: fields[0], data: data}
		switch fields[1] {
		case "tls":
			fl.want.Proto = TLS
		case "http":
			fl.want.Proto = HTTP
		case "h2c":
			fl.want.Proto = H2C
		default:
			tb.Fatalf("corpus.txt: bad proto in %q", line)
		}
		if fields[2] != "-" {
			fl.want.Host = fields[2]
		}
		if fields[3] != "-" {
			fl.alpn = strings.Split(fields[3], ",")
		}
		fl.want.ECH = fields[4] == "ech"
		out = append(out, fl)
	}
	if len(out) == 0 {
		tb.Fatal("corpus.txt lists no flights")
	}
	return out
}

// check compares a Result with what a flight wants.
func (fl flight) check(t *testing.T, how string, r Result, st Status) {
	t.Helper()
	if st != Match || r.Proto != fl.want.Proto || r.Host != fl.want.Host || r.ECH != fl.want.ECH || !slices.Equal(r.ALPN(), fl.alpn) {
		t.Errorf("%s %s: got %v %+v alpn %q; want match %+v alpn %q", fl.file, how, st, r, r.ALPN(), fl.want, fl.alpn)
	}
}

// --- Building TLS input ---

func u16(n int) []byte { return []byte{byte(n >> 8), byte(n)} }

// ext is one extension: type, length, data.
func ext(typ int, data []byte) []byte {
	return slices.Concat(u16(typ), u16(len(data)), data)
}

// sniExt is a server_name extension of host_name entries.
func sniExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = slices.Concat(list, []byte{0}, u16(len(n)), []byte(n))
	}
	return ext(extServerName, slices.Concat(u16(len(list)), list))
}

// alpnExt is an ALPN extension.
func alpnExt(protos ...string) []byte {
	var list []byte
	for _, p := range protos {
		list = slices.Concat(list, []byte{byte(len(p))}, []byte(p))
	}
	return ext(extALPN, slices.Concat(u16(len(list)), list))
}

// helloBody is a minimal ClientHello body with the given extensions.
func helloBody(exts ...[]byte) []byte {
	b := slices.Concat(
		[]byte{3, 3}, make([]byte, 32), // legacy_version, random
		[]byte{0},                  // legacy_session_id
		u16(2), []byte{0x13, 0x01}, // cipher_suites
		[]byte{1, 0}, // legacy_compression_methods
	)
	if exts == nil {
		return b
	}
	all := slices.Concat(exts...)
	return slices.Concat(b, u16(len(all)), all)
}

// handshake wraps a ClientHello body in its handshake header.
func handshake(body []byte) []byte {
	n := len(body)
	return slices.Concat([]byte{typeClientHello, byte(n >> 16), byte(n >> 8), byte(n)}, body)
}

// record wraps data in one handshake record.
func record(data []byte) []byte {
	return slices.Concat([]byte{recordTypeHandshake, 3, 1}, u16(len(data)), data)
}

// hello is a whole ClientHello in one record.
func hello(exts ...[]byte) []byte {
	return record(handshake(helloBody(exts...)))
}

// handshakeStream returns the concatenated payloads of the leading
// handshake records of a TLS flight and the bytes after the first message
// (which the fragmenters append unchanged).
func handshakeStream(tb testing.TB, b []byte) (msg []byte) {
	tb.Helper()
	var stream []byte
	for off := 0; off+recordHeaderLen <= len(b) && b[off] == recordTypeHandshake; {
		n := int(b[off+3])<<8 | int(b[off+4])
		stream = append(stream, b[off+recordHeaderLen:min(len(b), off+recordHeaderLen+n)]...)
		off += recordHeaderLen + n
	}
	if len(stream) < 4 {
		tb.Fatalf("no handshake message in %d bytes", len(b))
	}
	end := 4 + (int(stream[1])<<16 | int(stream[2])<<8 | int(stream[3]))
	return stream[:end]
}

// fragment splits a handshake message into records whose sizes size gives.
func fragment(msg []byte, size func() int) []byte {
	var out []byte
	for len(msg) > 0 {
		n := min(max(size(), 1), len(msg), maxRecordLen)
		out = append(out, record(msg[:n])...)
		msg = msg[n:]
	}
	return out
}

// fragmentings are the record splits the tests apply to every TLS flight.
func fragmentings(seed uint64) map[string]func() int {
	rng := rand.New(rand.NewPCG(seed, 1))
	return map[string]func() int{
		"1-byte records":  func() int { return 1 },
		"3-byte records":  func() int { return 3 },
		"random records":  func() int { return 1 + rng.IntN(200) },
		"two records":     func() int { return 40 },
		"large records":   func() int { return 1000 },
		"mixed 1 and big": func() int { return []int{1, 1, 1, 700}[rng.IntN(4)] },
	}
}

// --- Reference answers ---

// cryptoTLSHello runs crypto/tls's server over data and returns the server
// name and ALPN list it sees in the ClientHello, and whether it accepted the
// bytes as a ClientHello at all.
func cryptoTLSHello(data []byte) (name string, alpn []string, ok bool) {
	stop := errors.New("stop")
	cfg := &tls.Config{
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			name, alpn, ok = chi.ServerName, chi.SupportedProtos, true
			return nil, stop
		},
	}
	c := tls.Server(&replayConn{r: bytes.NewReader(data)}, cfg)
	c.Handshake()
	return name, alpn, ok
}

// replayConn is a net.Conn that reads data once and swallows writes.
type replayConn struct{ r *bytes.Reader }

func (c *replayConn) Read(p []byte) (int, error)         { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error)        { return len(p), nil }
func (c *replayConn) Close() error                       { return nil }
func (c *replayConn) LocalAddr() net.Addr                { return &net.TCPAddr{} }
func (c *replayConn) RemoteAddr() net.Addr               { return &net.TCPAddr{} }
func (c *replayConn) SetDeadline(t time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(t time.Time) error { return nil }

var _ net.Conn = (*replayConn)(nil)

// validName matches the host names sniff reports, written independently of
// hostLen: LDH labels with '_', 1..63 bytes, no '-' at either end.
var validName = regexp.MustCompile(`^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$`)

// numericLast matches names whose last label inet_aton would read as a
// number.
var numericLast = regexp.MustCompile(`(^|\.)([0-9]+|0x[0-9a-f]*)$`)

// wantHost is what sniff must report for a raw name: normalised, or "".
func wantHost(name string) string {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	if len(name) > 253 || !validName.MatchString(name) || numericLast.MatchString(name) {
		return ""
	}
	return name
}

// checkResult checks what holds for every answer of every parser.
func checkResult(t *testing.T, r Result, st Status) {
	t.Helper()
	switch st {
	case NeedMore, NoMatch:
		if r != (Result{}) {
			t.Fatalf("%v with a non-zero Result %+v", st, r)
		}
	case Match:
		if r.Proto == Unknown {
			t.Fatalf("match with Proto unknown: %+v", r)
		}
		if r.Host != "" && wantHost(r.Host) != r.Host {
			t.Fatalf("reported host %q is not a normalised host name", r.Host)
		}
		if r.Proto != TLS && (r.ECH || r.alpn != "") {
			t.Fatalf("%v result with TLS fields: %+v", r.Proto, r)
		}
		for _, p := range r.ALPN() {
			if p == "" {
				t.Fatalf("empty ALPN protocol in %+v", r)
			}
		}
	default:
		t.Fatalf("bad status %d", st)
	}
}

// checkPrefixes checks that a parser, given a prefix of b, answers NeedMore
// or what it answers for b, and that NeedMore always asks for more.
func checkPrefixes(t *testing.T, parse func([]byte) (Result, Status, int), b []byte, cuts []int) {
	t.Helper()
	full, fst, _ := parse(b)
	for _, k := range cuts {
		if k < 0 || k > len(b) {
			continue
		}
		r, st, need := parse(b[:k])
		if st == NeedMore {
			if need <= k {
				t.Fatalf("prefix %d: need-more asks for %d bytes", k, need)
			}
			continue
		}
		if st != fst || r != full {
			t.Fatalf("prefix %d of %d answers %v %+v, all of it %v %+v", k, len(b), st, r, fst, full)
		}
	}
}

// withNeed adapts a parser without a need hint for checkPrefixes.
func withNeed(f func([]byte) (Result, Status)) func([]byte) (Result, Status, int) {
	return func(b []byte) (Result, Status, int) {
		r, st := f(b)
		return r, st, len(b) + 1
	}
}

// allCuts returns 0..n.
func allCuts(n int) []int {
	cuts := make([]int, n+1)
	for i := range cuts {
		cuts[i] = i
	}
	return cuts
}

// parseAny and parseTLSHello are parse and parseTLS without the length
// hint, as the tests compare them with other parsers.
func parseAny(b []byte) (Result, Status) {
	r, st, _ := parse(b)
	return r, st
}

func parseTLSHello(b []byte) (Result, Status) {
	r, st, _ := parseTLS(b)
	return r, st
}
