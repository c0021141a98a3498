package sniff

import (
	"bytes"
	"encoding/hex"
	"slices"
	"strings"
	"testing"
)

func TestParseHTTP(t *testing.T) {
	tests := []struct {
		name string
		in   string
		st   Status
		host string
	}{
		{"get", "GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n", Match, "www.example.com"},
		{"port stripped", "GET / HTTP/1.1\r\nHost: www.example.com:8080\r\n\r\n", Match, "www.example.com"},
		{"empty port", "GET / HTTP/1.1\r\nHost: www.example.com:\r\n\r\n", Match, "www.example.com"},
		{"upper case, trailing dot", "GET / HTTP/1.1\r\nHost: WWW.Example.COM.:80\r\n\r\n", Match, "www.example.com"},
		{"host name case", "GET / HTTP/1.1\r\nhOsT: a.example\r\n\r\n", Match, "a.example"},
		{"bare LF", "GET / HTTP/1.1\nHost: a.example\n\n", Match, "a.example"},
		{"mixed line ends", "GET / HTTP/1.1\r\nHost: a.example\n\r\n", Match, "a.example"},
		{"OWS", "GET / HTTP/1.1\r\nHost:\t  a.example \t\r\n\r\n", Match, "a.example"},
		{"no space after colon", "GET / HTTP/1.1\r\nHost:a.example\r\n\r\n", Match, "a.example"},
		{"other headers", "POST /x?y=1 HTTP/1.1\r\nUser-Agent: t\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabc", Match, "a.example"},
		{"any method", "PURGE /cache HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"lower-case method", "get / HTTP/1.1\r\nHost: a.example\r\n\r\n", NoMatch, ""},
		{"lower-case word, no space yet", "Eping", NoMatch, ""},
		{"registered method with dash", "BASELINE-CONTROL / HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"options asterisk", "OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"http/1.0 with host", "GET / HTTP/1.0\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"http/1.0 without host", "GET / HTTP/1.0\r\nUser-Agent: old\r\n\r\n", Match, ""},
		{"http/1.1 without host", "GET / HTTP/1.1\r\n\r\n", Match, ""},
		{"underscore", "GET / HTTP/1.1\r\nHost: my_host.lan\r\n\r\n", Match, "my_host.lan"},

		{"absolute-form", "GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"absolute-form wins", "GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, "a.example"},
		{"absolute-form without host field", "GET http://a.example HTTP/1.1\r\n\r\n", Match, "a.example"},
		{"absolute-form port, case, query", "GET HTTPS://A.Example:8443?q=/x HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, "a.example"},
		{"absolute-form userinfo", "GET http://u:p@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, ""},
		{"absolute-form fragment", "GET http://a.example#f HTTP/1.1\r\n\r\n", Match, ""},
		{"absolute-form backslash", "GET http://a.example\\@b.example/ HTTP/1.1\r\n\r\n", Match, ""},
		{"absolute-form ip", "GET http://192.0.2.1/ HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, ""},
		{"absolute-form ipv6", "GET http://[2001:db8::1]:80/ HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, ""},
		{"absolute-form no authority", "GET urn:isbn:1 HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, ""},
		{"absolute-form empty authority", "GET http:///x HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, ""},
		{"authority-form with GET", "GET a.example:80 HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, ""},
		{"connect", "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", Match, "a.example"},
		{"connect without host field", "CONNECT A.example:443 HTTP/1.1\r\n\r\n", Match, "a.example"},
		{"connect wins", "CONNECT a.example:443 HTTP/1.1\r\nHost: b.example\r\n\r\n", Match, "a.example"},
		{"connect ipv6", "CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n", Match, ""},
		{"connect ipv4", "CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n", Match, ""},
		{"connect bad port", "CONNECT a.example:https HTTP/1.1\r\n\r\n", Match, ""},

		{"ipv6 literal", "GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n", Match, ""},
		{"ipv6 literal without port", "GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", Match, ""},
		{"ipv4 literal", "GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", Match, ""},
		{"bare ipv6", "GET / HTTP/1.1\r\nHost: 2001:db8::1\r\n\r\n", Match, ""},
		{"duplicate host", "GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n", Match, ""},
		{"duplicate host, other case", "GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n", Match, ""},
		{"empty host", "GET / HTTP/1.1\r\nHost:\r\n\r\n", Match, ""},
		{"host with userinfo", "GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n", Match, ""},
		{"host with path", "GET / HTTP/1.1\r\nHost: a.example/x\r\n\r\n", Match, ""},
		{"host port not digits", "GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n", Match, ""},
		{"host port too long", "GET / HTTP/1.1\r\nHost: a.example:123456\r\n\r\n", Match, ""},
		{"host two colons", "GET / HTTP/1.1\r\nHost: a.example:1:2\r\n\r\n", Match, ""},
		{"host with space", "GET / HTTP/1.1\r\nHost: a example\r\n\r\n", Match, ""},
		{"host invalid name", "GET / HTTP/1.1\r\nHost: -a.example\r\n\r\n", Match, ""},
		{"host folded", "GET / HTTP/1.1\r\nHost: a.example\r\n b.example\r\n\r\n", Match, ""},
		{"other field folded", "GET / HTTP/1.1\r\nX-A: 1\r\n\t2\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"whitespace before first field", "GET / HTTP/1.1\r\n Host: b.example\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"space before colon", "GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", Match, ""},
		{"line without colon", "GET / HTTP/1.1\r\nHost a.example\r\n", Match, ""},
		{"empty field name", "GET / HTTP/1.1\r\n: x\r\nHost: a.example\r\n\r\n", Match, ""},

		{"empty", "", NeedMore, ""},
		{"method prefix", "GE", NeedMore, ""},
		{"request line prefix", "GET /index.html HTTP/1.", NeedMore, ""},
		{"request line and CR", "GET / HTTP/1.1\r", NeedMore, ""},
		{"head without end", "GET / HTTP/1.1\r\nHost: a.example\r\n", NeedMore, ""},
		{"head without end, no LF", "GET / HTTP/1.1\r\nHost: a.example", NeedMore, ""},
		{"h2c preface prefix", "PRI * HTTP/2", NeedMore, ""},
		{"h2c preface", h2Preface, NeedMore, ""},

		{"tls", "\x16\x03\x01\x02\x00\x01", NoMatch, ""},
		{"binary", "\x00\x01\x02", NoMatch, ""},
		{"ssh", "SSH-2.0-OpenSSH_9.6\r\n", NoMatch, ""},
		{"leading CRLF", "\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n", NoMatch, ""},
		{"leading space", " GET / HTTP/1.1\r\n", NoMatch, ""},
		{"long method", strings.Repeat("A", 33) + " / HTTP/1.1\r\n", NoMatch, ""},
		{"long method prefix", strings.Repeat("A", 33), NoMatch, ""},
		{"method of 24", strings.Repeat("A", 24) + " / HTTP/1.1\r\nHost: a.example\r\n\r\n", Match, "a.example"},
		{"method of 25", strings.Repeat("A", 25) + " / HTTP/1.1\r\nHost: a.example\r\n\r\n", NoMatch, ""},
		{"http/0.9", "GET /\r\n", NoMatch, ""},
		{"http/2.0", "GET / HTTP/2.0\r\n", NoMatch, ""},
		{"http/2.0 prefix", "GET / HTTP/2", NoMatch, ""},
		{"http/1.10", "GET / HTTP/1.10\r\n", NoMatch, ""},
		{"http/1.x", "GET / HTTP/1.x\r\n", NoMatch, ""},
		{"lower-case version", "GET / http/1.1\r\n", NoMatch, ""},
		{"two spaces", "GET  / HTTP/1.1\r\n", NoMatch, ""},
		{"trailing space", "GET / HTTP/1.1 \r\n", NoMatch, ""},
		{"CR inside version", "GET / HTTP/1\r", NoMatch, ""},
		{"tab in target", "GET /\t HTTP/1.1\r\n", NoMatch, ""},
		{"DEL in target", "GET /\x7f HTTP/1.1\r\n", NoMatch, ""},
		{"not the preface", "PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", NoMatch, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := []byte(tt.in)
			r, st := ParseHTTP(in)
			checkResult(t, r, st)
			if st != tt.st || r.Host != tt.host {
				t.Fatalf("got %v %+v; want %v host %q", st, r, tt.st, tt.host)
			}
			if st == Match && r.Proto != HTTP {
				t.Fatalf("proto %v", r.Proto)
			}
			if r2, st2 := parseAny(in); len(in) > 0 && in[0] != 0x16 && (r2 != r || st2 != st) {
				t.Fatalf("Parse answers %v %+v", st2, r2)
			}
			checkPrefixes(t, withNeed(ParseHTTP), in, allCuts(len(in)))
		})
	}
}

// TestParseHTTPHeadEnd checks that a match waits for the end of the head,
// and that anything after it changes nothing.
func TestParseHTTPHeadEnd(t *testing.T) {
	head := "GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n"
	for k := range len(head) {
		if _, st := ParseHTTP([]byte(head[:k])); st != NeedMore {
			t.Fatalf("prefix %d: %v", k, st)
		}
	}
	for _, tail := range []string{"", "body", "Host: b.example\r\n\r\n", "\x00\xff"} {
		if r, st := ParseHTTP([]byte(head + tail)); st != Match || r.Host != "a.example" {
			t.Errorf("with %q after the head: %v %+v", tail, st, r)
		}
	}
}

// --- h2c ---

// frame is an HTTP/2 frame.
func frame(typ, flags byte, stream uint32, payload []byte) []byte {
	n := len(payload)
	return slices.Concat([]byte{byte(n >> 16), byte(n >> 8), byte(n), typ, flags,
		byte(stream >> 24), byte(stream >> 16), byte(stream >> 8), byte(stream)}, payload)
}

// hpInt encodes an HPACK integer with an n-bit prefix under the pattern bits.
func hpInt(pattern byte, n uint, v int) []byte {
	limit := 1<<n - 1
	if v < limit {
		return []byte{pattern | byte(v)}
	}
	out := []byte{pattern | byte(limit)}
	v -= limit
	for v >= 128 {
		out = append(out, byte(v%128+128))
		v /= 128
	}
	return append(out, byte(v))
}

// hpStr encodes an HPACK string literal, Huffman-coded if huff.
func hpStr(s string, huff bool) []byte {
	if !huff {
		return append(hpInt(0, 7, len(s)), s...)
	}
	enc := huffmanEncode(s)
	return append(hpInt(0x80, 7, len(enc)), enc...)
}

// huffmanCodes derives the codes from the canonical code lengths.
func huffmanCodes() (codes [257]uint32) {
	code, prev := uint32(0), uint8(0)
	for l := uint8(1); l <= huffmanMaxLen; l++ {
		for s, sl := range huffmanCodeLen {
			if sl == l {
				code <<= l - prev
				prev = l
				codes[s] = code
				code++
			}
		}
	}
	return codes
}

// huffmanEncode encodes s with the HPACK Huffman code, padded with ones.
func huffmanEncode(s string) []byte {
	codes := huffmanCodes()
	var out []byte
	var acc uint64
	var n uint
	for i := range len(s) {
		l := uint(huffmanCodeLen[s[i]])
		acc = acc<<l | uint64(codes[s[i]])
		n += l
		for n >= 8 {
			out = append(out, byte(acc>>(n-8)))
			n -= 8
		}
	}
	if n > 0 {
		out = append(out, byte(acc<<(8-n))|byte(0xff>>n))
	}
	return out
}

// h2 is an h2c first flight: preface, SETTINGS, and the given frames.
func h2(frames ...[]byte) []byte {
	settings := frame(0x4, 0, 0, []byte{0, 3, 0, 0, 0, 100})
	return slices.Concat([]byte(h2Preface), settings, slices.Concat(frames...))
}

// headers is a HEADERS frame on stream 1 with END_HEADERS.
func headers(block ...[]byte) []byte {
	return frame(frameHeaders, flagEndHeaders|0x1, 1, slices.Concat(block...))
}

var (
	hpGET   = []byte{0x82} // :method GET, indexed
	hpHTTP  = []byte{0x86} // :scheme http
	hpSlash = []byte{0x84} // :path /
)

// hpAuthority is :authority as a literal with incremental indexing.
func hpAuthority(v string, huff bool) []byte {
	return slices.Concat(hpInt(0x40, 6, staticAuthority), hpStr(v, huff))
}

func TestParseH2C(t *testing.T) {
	long := strings.Repeat("a", 60) + "." + strings.Repeat("b", 60) + "." + strings.Repeat("c", 60) + ".example:8080"
	tests := []struct {
		name string
		in   []byte
		st   Status
		host string
	}{
		{"literal authority", h2(headers(hpGET, hpHTTP, hpSlash, hpAuthority("www.example.com", false))), Match, "www.example.com"},
		{"huffman authority", h2(headers(hpGET, hpAuthority("www.example.com", true), hpHTTP)), Match, "www.example.com"},
		{"authority port, case, dot", h2(headers(hpAuthority("A.Example.:8080", true))), Match, "a.example"},
		{"long authority", h2(headers(hpAuthority(long, true))), Match, long[:len(long)-5]},
		{"authority without indexing", h2(headers(hpInt(0x00, 4, staticAuthority), hpStr("a.example", true))), Match, "a.example"},
		{"authority never indexed", h2(headers(hpInt(0x10, 4, staticAuthority), hpStr("a.example", false))), Match, "a.example"},
		{"literal name :authority", h2(headers([]byte{0x40}, hpStr(":authority", false), hpStr("a.example", false))), Match, "a.example"},
		{"huffman name :authority", h2(headers([]byte{0x00}, hpStr(":authority", true), hpStr("a.example", true))), Match, "a.example"},
		{"host field", h2(headers(hpGET, hpInt(0x40, 6, staticHost), hpStr("h.example", true))), Match, "h.example"},
		{"literal name host", h2(headers([]byte{0x00}, hpStr("host", true), hpStr("h.example", false))), Match, "h.example"},
		{"authority beats host", h2(headers(hpInt(0x40, 6, staticHost), hpStr("h.example", true), hpAuthority("a.example", true))), Match, "a.example"},
		{"first host", h2(headers(hpInt(0x40, 6, staticHost), hpStr("h.example", true), hpInt(0x40, 6, staticHost), hpStr("i.example", true))), Match, "h.example"},
		{"size update first", h2(headers([]byte{0x20}, hpAuthority("a.example", false))), Match, "a.example"},
		{"dynamic references skipped", h2(headers([]byte{0x40}, hpStr("x-a", false), hpStr("1", false), []byte{0xbe}, hpInt(0x40, 6, 62), hpStr("2", false), hpAuthority("a.example", true))), Match, "a.example"},
		{"large index", h2(headers(hpInt(0x80, 7, 5000), hpAuthority("a.example", false))), Match, "a.example"},
		{"other fields with long names", h2(headers([]byte{0x00}, hpStr("x-a-very-long-header-name", true), hpStr("v", true), hpAuthority("a.example", true))), Match, "a.example"},
		{"settings ack, window update, priority first", h2(frame(0x4, 1, 0, nil), frame(0x8, 0, 0, []byte{0, 0, 1, 0}), frame(0x2, 0, 3, []byte{0, 0, 0, 0, 1}), headers(hpAuthority("a.example", true))), Match, "a.example"},
		{"unknown frame type", h2(frame(0xfa, 0, 0, []byte("xyz")), headers(hpAuthority("a.example", true))), Match, "a.example"},
		{"padded and priority", h2(frame(frameHeaders, flagEndHeaders|flagPadded|flagPriority, 1, slices.Concat([]byte{3}, []byte{0, 0, 0, 0, 16}, hpAuthority("a.example", true), []byte{0, 0, 0}))), Match, "a.example"},
		{"continuation", h2(frame(frameHeaders, 0, 1, slices.Concat(hpGET, hpAuthority("a.example", false)[:4])), frame(frameContinuation, 0, 1, hpAuthority("a.example", false)[4:6]), frame(frameContinuation, flagEndHeaders, 1, hpAuthority("a.example", false)[6:])), Match, "a.example"},
		{"big continuation", h2(frame(frameHeaders, 0, 1, slices.Concat(hpGET, []byte{0x00}, hpStr("x-big", false), hpInt(0, 7, 5000))), frame(frameContinuation, 0, 1, make([]byte, 5000)), frame(frameContinuation, flagEndHeaders, 1, hpAuthority("a.example", true))), Match, "a.example"},

		{"no authority", h2(headers(hpGET, hpHTTP, hpSlash)), Match, ""},
		{"empty authority", h2(headers([]byte{0x81})), Match, ""},
		{"empty indexed host", h2(headers([]byte{0x80 | staticHost})), Match, ""},
		{"authority ip", h2(headers(hpAuthority("[::1]:80", true))), Match, ""},
		{"authority userinfo", h2(headers(hpAuthority("u@a.example", true))), Match, ""},
		{"authority too long", h2(headers(hpAuthority(strings.Repeat("a", 300), true))), Match, ""},
		{"authority invalid", h2(headers(hpAuthority("a..example", false))), Match, ""},
		{"index zero", h2(headers([]byte{0x80})), Match, ""},
		{"string overruns", h2(headers(hpInt(0x40, 6, staticAuthority), []byte{0x7f, 0x7f})), Match, ""},
		{"integer overruns", h2(headers([]byte{0xff, 0xff, 0xff, 0xff, 0xff})), Match, ""},
		{"truncated integer", h2(headers([]byte{0xff, 0x80})), Match, ""},
		{"huffman with EOS", h2(headers(hpInt(0x40, 6, staticAuthority), []byte{0x84, 0xff, 0xff, 0xff, 0xff})), Match, ""},
		{"huffman bad padding", h2(headers(hpInt(0x40, 6, staticAuthority), []byte{0x81, 0x00})), Match, ""},
		{"huffman long padding", h2(headers(hpInt(0x40, 6, staticAuthority), append([]byte{0x80 | 4}, append(huffmanEncode("a.b"), 0xff)...))), Match, ""},
		{"headers on stream 0", h2(frame(frameHeaders, flagEndHeaders, 0, hpAuthority("a.example", false))), Match, ""},
		{"continuation first", h2(frame(frameContinuation, flagEndHeaders, 1, hpAuthority("a.example", false))), Match, ""},
		{"continuation of another stream", h2(frame(frameHeaders, 0, 1, hpGET), frame(frameContinuation, flagEndHeaders, 3, hpAuthority("a.example", false))), Match, ""},
		{"data between headers and continuation", h2(frame(frameHeaders, 0, 1, hpGET), frame(0, 0, 1, nil)), Match, ""},
		{"frame too large", h2(frame(0x4, 0, 0, make([]byte, maxFrameLen+1))), Match, ""},
		{"padding too long", h2(frame(frameHeaders, flagEndHeaders|flagPadded, 1, []byte{9, 0x82})), Match, ""},
		{"padded without length", h2(frame(frameHeaders, flagEndHeaders|flagPadded, 1, nil)), Match, ""},
		{"priority too short", h2(frame(frameHeaders, flagEndHeaders|flagPriority, 1, []byte{0, 0})), Match, ""},

		{"settings only", h2(), NeedMore, ""},
		{"half a frame header", h2()[:len(h2())-3], NeedMore, ""},
		{"headers without end", h2(frame(frameHeaders, 0, 1, hpAuthority("a.example", false))), NeedMore, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, st := ParseHTTP(tt.in)
			checkResult(t, r, st)
			if st != tt.st || r.Host != tt.host || st == Match && r.Proto != H2C {
				t.Fatalf("got %v %+v; want %v host %q", st, r, tt.st, tt.host)
			}
			checkPrefixes(t, withNeed(ParseHTTP), tt.in, allCuts(len(tt.in)))
		})
	}
}

// TestHuffman checks the decoder against the examples of RFC 7541 Appendix
// C.4 and C.6, and the canonical codes against codes listed in Appendix B.
func TestHuffman(t *testing.T) {
	vectors := map[string]string{
		"f1e3c2e5f23a6ba0ab90f4ff": "www.example.com",
		"a8eb10649cbf":             "no-cache",
		"25a849e95ba97d7f":         "custom-key",
		"25a849e95bb8e8b4bf":       "custom-value",
		"6402":                     "302",
		"aec3771a4b":               "private",
		"d07abe941054d444a8200595040b8166e082a62d1bff":                                               "Mon, 21 Oct 2013 20:13:21 GMT",
		"9d29ad171863c78f0b97c8e9ae82ae43d3":                                                         "https://www.example.com",
		"94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007": "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
	}
	for h, want := range vectors {
		src, _ := hex.DecodeString(h)
		var dst [128]byte
		n, fits, ok := huffmanDecode(dst[:], src)
		if !ok || !fits || string(dst[:n]) != want {
			t.Errorf("decode %s = %q %v %v, want %q", h, dst[:n], fits, ok, want)
		}
		if got := huffmanEncode(want); !bytes.Equal(got, src) {
			t.Errorf("encode %q = %x, want %s", want, got, h)
		}
		n, fits, ok = huffmanDecode(dst[:3], src)
		if len(want) > 3 && (!ok || fits || n != 3) {
			t.Errorf("decode %s into 3 bytes: %d %v %v", h, n, fits, ok)
		}
	}
	codes := huffmanCodes()
	for sym, want := range map[int]uint32{
		0: 0x1ff8, '0': 0x0, 'a': 0x3, ' ': 0x14, '\n': 0x3ffffffc, '\r': 0x3ffffffd,
		'~': 0x1ffd, 127: 0xffffffc, 200: 0x3ffffe2, 255: 0x3ffffee, huffmanEOS: 0x3fffffff,
	} {
		if codes[sym] != want {
			t.Errorf("code of %d = %#x, want %#x", sym, codes[sym], want)
		}
	}
	// Every byte value round-trips.
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	var dst [256]byte
	if n, fits, ok := huffmanDecode(dst[:], huffmanEncode(string(all))); !ok || !fits || !bytes.Equal(dst[:n], all) {
		t.Errorf("all bytes: %v %v %x", fits, ok, dst[:n])
	}
	// Padding: up to 7 one bits is fine, a zero bit or a whole byte is not.
	for _, tc := range []struct {
		src []byte
		ok  bool
	}{
		{nil, true},
		{[]byte{0xff}, false},                   // 8 bits of padding
		{[]byte{0x1f}, true},                    // 'a' (00011) + 111
		{[]byte{0x1e}, false},                   // 'a' + 110
		{[]byte{0xff, 0xff, 0xff, 0xfc}, false}, // EOS
	} {
		if _, _, ok := huffmanDecode(dst[:], tc.src); ok != tc.ok {
			t.Errorf("decode %x: ok %v, want %v", tc.src, ok, tc.ok)
		}
	}
}

// A request meant for a forward proxy names the proxy's next hop; the
// caller must not send that name on as the destination's.
func TestParseHTTPViaProxy(t *testing.T) {
	for in, via := range map[string]bool{
		"CONNECT next.example:443 HTTP/1.1\r\nHost: next.example:443\r\n\r\n": true,
		"GET http://next.example/x HTTP/1.1\r\nHost: next.example\r\n\r\n":    true,
		"GET http://192.0.2.1/x HTTP/1.1\r\n\r\n":                             true,
		"GET /x HTTP/1.1\r\nHost: origin.example\r\n\r\n":                     false,
		"OPTIONS * HTTP/1.1\r\nHost: origin.example\r\n\r\n":                  false,
	} {
		r, st := ParseHTTP([]byte(in))
		if st != Match || r.ViaProxy != via {
			t.Errorf("ParseHTTP(%q) = %+v, %v; want ViaProxy %v", in, r, st, via)
		}
	}
}
