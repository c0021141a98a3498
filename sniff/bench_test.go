package sniff

import (
	"testing"
)

func benchParse(b *testing.B, data []byte, parser func([]byte) (Result, Status)) {
	b.Helper()
	if _, st := parser(data); st != Match {
		b.Fatalf("no match: %v", st)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		parser(data)
	}
}

func benchFlight(b *testing.B, name string) []byte {
	b.Helper()
	for _, fl := range loadCorpus(b) {
		if fl.file == name {
			return fl.data
		}
	}
	b.Fatalf("no %s", name)
	return nil
}

// BenchmarkParseTLSChromium: a 1.9 KB post-quantum ClientHello in one record.
func BenchmarkParseTLSChromium(b *testing.B) {
	benchParse(b, benchFlight(b, "chromium-https.bin"), parseTLSHello)
}

// BenchmarkParseTLSChromiumRecords: the same hello in 1-byte records.
func BenchmarkParseTLSChromium1ByteRecords(b *testing.B) {
	msg := handshakeStream(b, benchFlight(b, "chromium-https.bin"))
	benchParse(b, fragment(msg, func() int { return 1 }), parseTLSHello)
}

func BenchmarkParseTLSCurl(b *testing.B) {
	benchParse(b, benchFlight(b, "curl-https.bin"), parseTLSHello)
}

// BenchmarkParseHTTPChromium: a typical browser request head (445 bytes).
func BenchmarkParseHTTPChromium(b *testing.B) {
	benchParse(b, benchFlight(b, "chromium-http.bin"), ParseHTTP)
}

func BenchmarkParseHTTPCurl(b *testing.B) {
	benchParse(b, benchFlight(b, "curl-http.bin"), ParseHTTP)
}

// BenchmarkParseH2C: curl's h2c preface, SETTINGS and Huffman-coded HEADERS.
func BenchmarkParseH2C(b *testing.B) {
	benchParse(b, benchFlight(b, "curl-h2c.bin"), ParseHTTP)
}

// BenchmarkParseNeedMore: the Chromium hello missing its last byte, as Peek
// sees it between segments.
func BenchmarkParseNeedMore(b *testing.B) {
	data := benchFlight(b, "chromium-https.bin")
	data = data[:len(data)-1]
	b.ReportAllocs()
	for b.Loop() {
		parseAny(data)
	}
}

// TestAllocs pins the allocations the parsers promise.
func TestAllocs(t *testing.T) {
	if testing.CoverMode() != "" {
		t.Skip("coverage instrumentation allocates")
	}
	chromium := corpusFile(t, "chromium-https.bin").data
	tests := []struct {
		name  string
		in    []byte
		parse func([]byte) (Result, Status)
		want  float64
	}{
		{"tls host", chromium, parseTLSHello, 1},
		{"tls 1-byte records", fragment(handshakeStream(t, chromium), func() int { return 1 }), parseTLSHello, 1},
		{"tls need more", chromium[:len(chromium)-1], parseTLSHello, 0},
		{"tls no host, no alpn", hello(), parseTLSHello, 0},
		{"tls no match", []byte("GET /"), parseTLSHello, 0},
		{"http host", corpusFile(t, "chromium-http.bin").data, ParseHTTP, 1},
		{"http no host", []byte("GET / HTTP/1.0\r\n\r\n"), ParseHTTP, 0},
		{"http need more", []byte("GET / HTTP/1.1\r\nHost: a"), ParseHTTP, 0},
		{"h2c host", corpusFile(t, "curl-h2c.bin").data, ParseHTTP, 1},
		{"parse", chromium, parseAny, 1},
	}
	for _, tt := range tests {
		if got := testing.AllocsPerRun(100, func() { tt.parse(tt.in) }); got != tt.want {
			t.Errorf("%s: %v allocations, want %v", tt.name, got, tt.want)
		}
	}
}
