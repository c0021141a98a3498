package sniff

import (
	"slices"
	"strings"
	"testing"
)

func TestParseTLS(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	name253 := strings.Repeat(long63+".", 3) + strings.Repeat("b", 61) // 253 bytes
	echExt := ext(extECH, []byte{0, 0, 1, 0, 1, 7, 0, 0, 0, 0})
	nameTypes := ext(extServerName, slices.Concat(u16(12), []byte{1}, u16(9), []byte("x.example")))
	tests := []struct {
		name string
		in   []byte
		st   Status
		host string
		alpn []string
		ech  bool
	}{
		{"plain", hello(sniExt("www.example.com")), Match, "www.example.com", nil, false},
		{"alpn", hello(sniExt("a.example"), alpnExt("h2", "http/1.1")), Match, "a.example", []string{"h2", "http/1.1"}, false},
		{"alpn before sni", hello(alpnExt("acme-tls/1"), sniExt("a.example")), Match, "a.example", []string{"acme-tls/1"}, false},
		{"no extensions", hello(), Match, "", nil, false},
		{"no sni", hello(alpnExt("h2")), Match, "", []string{"h2"}, false},
		{"only other name types", hello(nameTypes), Match, "", nil, false},
		{"ipv4 literal", hello(sniExt("192.0.2.1")), Match, "", nil, false},
		{"ipv6 literal", hello(sniExt("2001:db8::1")), Match, "", nil, false},
		{"bracketed ipv6", hello(sniExt("[::1]")), Match, "", nil, false},
		{"inet_aton short form", hello(sniExt("127.1")), Match, "", nil, false},
		{"inet_aton hex", hello(sniExt("0x7f000001")), Match, "", nil, false},
		{"numeric tld", hello(sniExt("host.123")), Match, "", nil, false},
		{"numeric first label", hello(sniExt("123.example")), Match, "123.example", nil, false},
		{"ech outer", hello(sniExt("public.example"), alpnExt("h2"), echExt), Match, "public.example", []string{"h2"}, true},
		{"ech without sni", hello(echExt), Match, "", nil, true},
		{"trailing dot", hello(sniExt("www.example.com.")), Match, "www.example.com", nil, false},
		{"two trailing dots", hello(sniExt("www.example.com..")), Match, "", nil, false},
		{"only a dot", hello(sniExt(".")), Match, "", nil, false},
		{"upper case", hello(sniExt("WWW.Example.COM")), Match, "www.example.com", nil, false},
		{"underscore", hello(sniExt("_acme.my_host.example")), Match, "_acme.my_host.example", nil, false},
		{"punycode", hello(sniExt("xn--bcher-kva.example")), Match, "xn--bcher-kva.example", nil, false},
		{"single label", hello(sniExt("localhost")), Match, "localhost", nil, false},
		{"utf-8", hello(sniExt("bücher.example")), Match, "", nil, false},
		{"leading hyphen", hello(sniExt("-a.example")), Match, "", nil, false},
		{"trailing hyphen", hello(sniExt("a-.example")), Match, "", nil, false},
		{"empty label", hello(sniExt("a..example")), Match, "", nil, false},
		{"leading dot", hello(sniExt(".a.example")), Match, "", nil, false},
		{"space", hello(sniExt("a example")), Match, "", nil, false},
		{"nul", hello(sniExt("a.example\x00.evil")), Match, "", nil, false},
		{"percent", hello(sniExt("a%2eexample")), Match, "", nil, false},
		{"label of 63", hello(sniExt(long63 + ".example")), Match, long63 + ".example", nil, false},
		{"label of 64", hello(sniExt(long63 + "a.example")), Match, "", nil, false},
		{"253 bytes", hello(sniExt(name253)), Match, name253, nil, false},
		{"253 bytes and a dot", hello(sniExt(name253 + ".")), Match, name253, nil, false},
		{"254 bytes", hello(sniExt(name253 + "b")), Match, "", nil, false},

		// Malformed hellos: TLS, nothing else.
		{"two host_names", hello(sniExt("a.example", "b.example")), Match, "", nil, false},
		{"duplicate sni", hello(sniExt("a.example"), sniExt("a.example")), Match, "", nil, false},
		{"duplicate alpn", hello(sniExt("a.example"), alpnExt("h2"), alpnExt("h2")), Match, "", nil, false},
		{"duplicate ech", hello(sniExt("a.example"), echExt, echExt), Match, "", nil, false},
		{"empty sni list", hello(ext(extServerName, u16(0))), Match, "", nil, false},
		{"empty sni ext", hello(ext(extServerName, nil)), Match, "", nil, false},
		{"empty name", hello(ext(extServerName, slices.Concat(u16(3), []byte{0}, u16(0)))), Match, "", nil, false},
		{"sni list too long", hello(ext(extServerName, slices.Concat(u16(20), []byte{0}, u16(3), []byte("a.b")))), Match, "", nil, false},
		{"sni bytes after list", hello(ext(extServerName, slices.Concat(u16(6), []byte{0}, u16(3), []byte("a.bX")))), Match, "", nil, false},
		{"empty alpn list", hello(sniExt("a.example"), ext(extALPN, u16(0))), Match, "", nil, false},
		{"empty alpn name", hello(sniExt("a.example"), ext(extALPN, slices.Concat(u16(3), []byte{0, 1, 'x'}))), Match, "", nil, false},
		{"alpn name too long", hello(sniExt("a.example"), ext(extALPN, slices.Concat(u16(2), []byte{5, 'x'}))), Match, "", nil, false},
		{"extension overruns", record(handshake(slices.Concat(helloBody(), u16(4), []byte{0, 0, 0, 9}))), Match, "", nil, false},
		{"extension block short", record(handshake(slices.Concat(helloBody(), u16(9), sniExt("a.b")))), Match, "", nil, false},
		{"bytes after extensions", record(handshake(slices.Concat(helloBody(sniExt("a.example")), []byte{0}))), Match, "", nil, false},
		{"odd cipher suites", record(handshake(slices.Concat([]byte{3, 3}, make([]byte, 32), []byte{0}, u16(3), []byte{0x13, 1, 0}, []byte{1, 0}))), Match, "", nil, false},
		{"session id overruns", record(handshake(slices.Concat([]byte{3, 3}, make([]byte, 32), []byte{200}))), Match, "", nil, false},
		{"body too short", record(handshake([]byte{3, 3, 0})), Match, "", nil, false},
		{"empty body", record(handshake(nil)), Match, "", nil, false},

		// Not TLS framing: no match.
		{"empty", nil, NeedMore, "", nil, false},
		{"http", []byte("GET / HTTP/1.1\r\n"), NoMatch, "", nil, false},
		{"sslv2 hello", []byte{0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10}, NoMatch, "", nil, false},
		{"application data record", []byte{0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5}, NoMatch, "", nil, false},
		{"alert record", []byte{0x15, 3, 1, 0, 2, 1, 0}, NoMatch, "", nil, false},
		{"change cipher spec first", slices.Concat([]byte{0x14, 3, 3, 0, 1, 1}, hello(sniExt("a.example"))), NoMatch, "", nil, false},
		{"record major 2", []byte{0x16, 2, 0}, NoMatch, "", nil, false},
		{"record major 0x13", []byte{0x16, 0x13}, NoMatch, "", nil, false},
		{"zero-length record", []byte{0x16, 3, 1, 0, 0}, NoMatch, "", nil, false},
		{"oversized record", []byte{0x16, 3, 1, 0x40, 0x01}, NoMatch, "", nil, false},
		{"oversized record prefix", []byte{0x16, 3, 1, 0x41}, NoMatch, "", nil, false},
		{"server hello", record([]byte{2, 0, 0, 1, 0}), NoMatch, "", nil, false},
		{"server hello prefix", []byte{0x16, 3, 3, 0, 40, 2}, NoMatch, "", nil, false},
		{"hello over 64 KiB", []byte{0x16, 3, 1, 0, 4, 1, 1, 0, 1}, NoMatch, "", nil, false},
		{"second record not handshake", slices.Concat(record([]byte{1, 0, 0, 10, 3, 3}), []byte{0x17, 3, 3, 0, 1, 0}), NoMatch, "", nil, false},
		{"second record major 2", slices.Concat(record([]byte{1, 0, 0, 10, 3, 3}), []byte{0x16, 2}), NoMatch, "", nil, false},

		// Incomplete.
		{"one byte", []byte{0x16}, NeedMore, "", nil, false},
		{"record header", []byte{0x16, 3, 1, 0, 100}, NeedMore, "", nil, false},
		{"handshake header split", []byte{0x16, 3, 1, 0, 1, 1, 0x16, 3, 1, 0, 2, 0, 0}, NeedMore, "", nil, false},
		{"hello 64 KiB", []byte{0x16, 3, 1, 0, 4, 1, 1, 0, 0}, NeedMore, "", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, st := parseTLSHello(tt.in)
			checkResult(t, r, st)
			if st != tt.st || r.Host != tt.host || r.ECH != tt.ech || !slices.Equal(r.ALPN(), tt.alpn) {
				t.Fatalf("got %v %+v alpn %q; want %v host %q alpn %q ech %v", st, r, r.ALPN(), tt.st, tt.host, tt.alpn, tt.ech)
			}
			if st == Match && r.Proto != TLS {
				t.Fatalf("proto %v", r.Proto)
			}
			if r2, st2 := parseAny(tt.in); len(tt.in) > 0 && tt.in[0] == 0x16 && (r2 != r || st2 != st) {
				t.Fatalf("Parse answers %v %+v", st2, r2)
			}
			// Every prefix: NeedMore or this answer; all of them if it is a
			// match, since a match needs the whole message.
			checkPrefixes(t, parseTLS, tt.in, allCuts(len(tt.in)))
			if st == Match {
				for k := range len(tt.in) {
					if _, st, _ := parseTLS(tt.in[:k]); st != NeedMore {
						t.Fatalf("prefix %d of %d answers %v", k, len(tt.in), st)
					}
				}
				// The same hello in 1-byte and 2-byte records.
				msg := handshakeStream(t, tt.in)
				for _, size := range []int{1, 2} {
					r2, st2 := parseTLSHello(fragment(msg, func() int { return size }))
					if r2 != r || st2 != st {
						t.Fatalf("in %d-byte records: %v %+v", size, st2, r2)
					}
				}
			}
			// Where crypto/tls accepts the hello, it must agree.
			if name, alpn, ok := cryptoTLSHello(tt.in); ok {
				if st != Match || wantHost(name) != r.Host || !slices.Equal(alpn, r.ALPN()) {
					t.Fatalf("crypto/tls reads %q %q", name, alpn)
				}
			}
		})
	}
}

// TestParseTLSNeed checks the length hints Peek grows its buffer by.
func TestParseTLSNeed(t *testing.T) {
	h := hello(sniExt("a.example"))
	msg := handshakeStream(t, h)
	split := slices.Concat(record(msg[:10]), record(msg[10:]))
	tests := []struct {
		name string
		in   []byte
		need int
	}{
		{"nothing", nil, 5},
		{"part of the record header", h[:3], 5},
		{"record header", h[:5], len(h)},
		{"part of the record", h[:20], len(h)},
		{"first of two records", split[:15], 15 + 5 + len(msg) - 10},
		{"into the second record", split[:17], 15 + 5 + len(msg) - 10},
		{"handshake header in 1-byte records", fragment(msg[:3], func() int { return 1 }), 18 + 5},
	}
	for _, tt := range tests {
		_, st, need := parseTLS(tt.in)
		if st != NeedMore || need != tt.need {
			t.Errorf("%s: %v, need %d; want need-more, need %d", tt.name, st, need, tt.need)
		}
	}
}

// TestParseTLSLargeHello covers a hello too large for the stack buffer used
// when reassembling fragments.
func TestParseTLSLargeHello(t *testing.T) {
	pad := ext(0x15, make([]byte, 9000)) // padding extension
	body := helloBody(sniExt("big.example"), pad, alpnExt("h2"))
	msg := handshake(body)
	for _, size := range []int{maxRecordLen, 1000, 1} {
		b := fragment(msg, func() int { return size })
		r, st := parseTLSHello(b)
		if st != Match || r.Host != "big.example" || !r.OffersALPN("h2") {
			t.Errorf("records of %d: %v %+v", size, st, r)
		}
		if name, _, ok := cryptoTLSHello(b); !ok || name != "big.example" {
			t.Errorf("records of %d: crypto/tls reads %q %v", size, name, ok)
		}
	}
}

func TestResultALPN(t *testing.T) {
	r, _ := parseTLSHello(hello(sniExt("a.example"), alpnExt("h2", "http/1.1", "x")))
	if !r.OffersALPN("h2") || !r.OffersALPN("x") || r.OffersALPN("h3") || r.OffersALPN("") {
		t.Errorf("OffersALPN wrong for %q", r.ALPN())
	}
	if (Result{}).ALPN() != nil || (Result{}).OffersALPN("h2") {
		t.Error("zero Result offers ALPN")
	}
}

func TestStrings(t *testing.T) {
	for v, want := range map[interface{ String() string }]string{
		Unknown: "unknown", TLS: "tls", HTTP: "http", H2C: "h2c", Proto(9): "unknown",
		NeedMore: "need-more", Match: "match", NoMatch: "no-match",
		None: "none", Found: "found", Timeout: "timeout", TooLarge: "too-large", Closed: "closed", Outcome(9): "unknown",
	} {
		if got := v.String(); got != want {
			t.Errorf("%#v.String() = %q, want %q", v, got, want)
		}
	}
}
