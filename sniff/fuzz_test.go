package sniff

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"slices"
	"testing"
)

// seeds adds the captured flights, re-recorded variants of the TLS ones,
// and synthetic inputs to a fuzz target's seed corpus; `go test` runs them
// all as unit tests.
func seeds(f *testing.F, tls, http bool) {
	for _, fl := range loadCorpus(f) {
		isTLS := fl.want.Proto == TLS
		if isTLS && tls || !isTLS && http {
			f.Add(fl.data)
		}
		if isTLS && tls {
			msg := handshakeStream(f, fl.data)
			f.Add(fragment(msg, func() int { return 97 }))
			f.Add(fl.data[:len(fl.data)/2])
		}
	}
	if tls {
		f.Add(hello(sniExt("A.Example."), alpnExt("h2", "http/1.1"), ext(extECH, []byte{0})))
		f.Add(fragment(handshake(helloBody(sniExt("a.example"), alpnExt("h2"))), func() int { return 1 }))
		f.Add(hello(sniExt("192.0.2.1")))
		f.Add(hello())
		f.Add([]byte{0x80, 0x2e, 0x01, 0x03, 0x01})
		f.Add([]byte{0x16, 3, 1, 0, 1, 1, 0x15, 3, 1, 0, 2, 1, 1})
	}
	if http {
		f.Add([]byte("GET http://a.example:80/ HTTP/1.1\r\nHost: b\r\n\r\n"))
		f.Add([]byte("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"))
		f.Add([]byte("GET / HTTP/1.0\nHost: [::1]:80\nHost: x\n\n"))
		f.Add([]byte("GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n"))
		f.Add(h2(headers(hpGET, hpAuthority("www.example.com", true))))
		f.Add(h2(frame(frameHeaders, flagPadded|flagPriority, 1, []byte{1, 0, 0, 0, 0, 0, 0x41, 0x81}),
			frame(frameContinuation, flagEndHeaders, 1, []byte{0x8c, 0})))
	}
}

// cuts are the prefix lengths the fuzz targets check: a few fixed ones, a
// few relative ones.
func cuts(n int) []int {
	return []int{0, 1, 2, 5, 9, 24, n / 3, n / 2, n - 9, n - 1}
}

// FuzzTLS checks ParseTLS's invariants and compares it with crypto/tls:
// wherever crypto/tls's server accepts the bytes as a ClientHello, ParseTLS
// must answer Match with the same server name (normalised, or none if sniff
// rejects the name) and ALPN list — except for the record framings sniff
// refuses by design (see sniffRefusesFraming).
func FuzzTLS(f *testing.F) {
	seeds(f, true, false)
	f.Fuzz(func(t *testing.T, data []byte) {
		r, st, need := parseTLS(data)
		checkResult(t, r, st)
		if st == Match && r.Proto != TLS {
			t.Fatalf("match with proto %v", r.Proto)
		}
		if st == NeedMore && need <= len(data) {
			t.Fatalf("need-more asks for %d of %d bytes", need, len(data))
		}
		checkPrefixes(t, parseTLS, data, cuts(len(data)))

		name, alpn, ok := cryptoTLSHello(data)
		if ok && !sniffRefusesFraming(data) {
			if st != Match {
				t.Fatalf("crypto/tls reads %q, ParseTLS answers %v", name, st)
			}
			if r.Host != wantHost(name) || !slices.Equal(r.ALPN(), alpn) {
				t.Fatalf("crypto/tls reads %q %q, ParseTLS %q %q", name, alpn, r.Host, r.ALPN())
			}
		}

		// The same message in other records gives the same answer.
		if st == Match && len(data) > 0 {
			msg := handshakeStream(t, data)
			size := int(data[len(data)/2]%16) + 1
			r2, st2 := parseTLSHello(fragment(msg, func() int { return size }))
			if st2 != st || r2 != r {
				t.Fatalf("in %d-byte records: %v %+v, in the original ones %v %+v", size, st2, r2, st, r)
			}
		}
	})
}

// sniffRefusesFraming reports whether the records crypto/tls reads up to the
// end of the first handshake message include one sniff refuses by design
// though crypto/tls takes it: a record version whose major byte is not 3, or
// a record of another type (crypto/tls skips warning alerts).
func sniffRefusesFraming(b []byte) bool {
	var hs []byte
	for off := 0; off+recordHeaderLen <= len(b); {
		n := int(b[off+3])<<8 | int(b[off+4])
		if b[off] != recordTypeHandshake || b[off+1] != 3 {
			return true
		}
		end := min(len(b), off+recordHeaderLen+n)
		hs = append(hs, b[off+recordHeaderLen:end]...)
		if len(hs) >= 4 && len(hs) >= 4+(int(hs[1])<<16|int(hs[2])<<8|int(hs[3])) {
			return false
		}
		off = end
	}
	return false
}

// FuzzHTTP checks ParseHTTP's invariants and, where it names a host for an
// HTTP/1.x request that net/http also reads, that net/http names the same.
func FuzzHTTP(f *testing.F) {
	seeds(f, false, true)
	f.Fuzz(func(t *testing.T, data []byte) {
		r, st := ParseHTTP(data)
		checkResult(t, r, st)
		if st == Match && r.Proto != HTTP && r.Proto != H2C {
			t.Fatalf("match with proto %v", r.Proto)
		}
		checkPrefixes(t, withNeed(ParseHTTP), data, cuts(len(data)))

		if st != Match || r.Proto != HTTP || r.Host == "" {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		host := req.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if want := wantHost(host); want != r.Host {
			t.Fatalf("net/http reads host %q, ParseHTTP %q", req.Host, r.Host)
		}
	})
}

// FuzzParse checks that Parse picks its parser by the first byte, and the
// invariants of its answers.
func FuzzParse(f *testing.F) {
	seeds(f, true, true)
	f.Fuzz(func(t *testing.T, data []byte) {
		r, st, need := parse(data)
		checkResult(t, r, st)
		if st == NeedMore && need <= len(data) {
			t.Fatalf("need-more asks for %d of %d bytes", need, len(data))
		}
		checkPrefixes(t, parse, data, cuts(len(data)))
		var r2 Result
		var st2 Status
		if len(data) > 0 && data[0] == 0x16 {
			r2, st2 = parseTLSHello(data)
		} else {
			r2, st2 = ParseHTTP(data)
		}
		if r2 != r || st2 != st {
			t.Fatalf("Parse %v %+v, the parser %v %+v", st, r, st2, r2)
		}
	})
}
