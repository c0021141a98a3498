package sniff

import (
	"fmt"
	"testing"
)

// TestCorpus parses every captured first flight whole.
func TestCorpus(t *testing.T) {
	for _, fl := range loadCorpus(t) {
		r, st := parseAny(fl.data)
		fl.check(t, "Parse", r, st)
		var other Status
		switch fl.want.Proto {
		case TLS:
			r, st = parseTLSHello(fl.data)
			_, other = ParseHTTP(fl.data)
		default:
			r, st = ParseHTTP(fl.data)
			_, other = parseTLSHello(fl.data)
		}
		fl.check(t, "own parser", r, st)
		if other != NoMatch {
			t.Errorf("%s: the other parser answers %v", fl.file, other)
		}
	}
}

// TestCorpusCryptoTLS checks the TLS flights against crypto/tls's own reading
// of them, so that a wrong manifest line cannot hide a parser bug.
func TestCorpusCryptoTLS(t *testing.T) {
	for _, fl := range loadCorpus(t) {
		if fl.want.Proto != TLS {
			continue
		}
		name, alpn, ok := cryptoTLSHello(fl.data)
		if !ok {
			t.Errorf("%s: crypto/tls does not accept it", fl.file)
			continue
		}
		if got := wantHost(name); got != fl.want.Host {
			t.Errorf("%s: crypto/tls sees server name %q, corpus.txt says %q", fl.file, name, fl.want.Host)
		}
		if fmt.Sprint(alpn) != fmt.Sprint(fl.alpn) {
			t.Errorf("%s: crypto/tls sees ALPN %q, corpus.txt says %q", fl.file, alpn, fl.alpn)
		}
	}
}

// TestCorpusPrefixes feeds every prefix of every flight: the parsers must
// answer NeedMore until the message is complete, then the full answer.
func TestCorpusPrefixes(t *testing.T) {
	for _, fl := range loadCorpus(t) {
		checkPrefixes(t, parse, fl.data, allCuts(len(fl.data)))
		// The answer comes exactly at the end of the message.
		end := 0
		for end <= len(fl.data) {
			if _, st, _ := parse(fl.data[:end]); st != NeedMore {
				break
			}
			end++
		}
		if want := messageEnd(t, fl); end != want {
			t.Errorf("%s: answered after %d bytes, the message ends at %d", fl.file, end, want)
		}
	}
}

// messageEnd finds where the first message of a flight ends, by its framing.
func messageEnd(t *testing.T, fl flight) int {
	switch fl.want.Proto {
	case TLS:
		return recordHeaderLen + len(handshakeStream(t, fl.data)) // one record in every capture
	case HTTP:
		for i := 3; i < len(fl.data); i++ {
			if string(fl.data[i-3:i+1]) == "\r\n\r\n" {
				return i + 1
			}
		}
	case H2C:
		off := len(h2Preface)
		for off+frameHeaderLen <= len(fl.data) {
			n, typ, flags, _ := frameHeader(fl.data[off:])
			off += frameHeaderLen + n
			if typ == frameContinuation || typ == frameHeaders && flags&flagEndHeaders != 0 {
				return off
			}
		}
	}
	t.Fatalf("%s: cannot find the end of the message", fl.file)
	return 0
}

// TestCorpusFragmented re-records every TLS flight with small, random and
// mixed record sizes: the answer must not change, and every prefix must
// answer NeedMore or the same.
func TestCorpusFragmented(t *testing.T) {
	for _, fl := range loadCorpus(t) {
		if fl.want.Proto != TLS {
			continue
		}
		msg := handshakeStream(t, fl.data)
		for how, size := range fragmentings(uint64(len(fl.data))) {
			b := fragment(msg, size)
			r, st := parseTLSHello(b)
			fl.check(t, how, r, st)
			if name, _, ok := cryptoTLSHello(b); !ok || wantHost(name) != fl.want.Host {
				t.Errorf("%s %s: crypto/tls reads %q, %v", fl.file, how, name, ok)
			}
			cuts := allCuts(len(b))
			if testing.Short() {
				cuts = cuts[len(cuts)-64:]
			}
			checkPrefixes(t, parseTLS, b, cuts)
		}
	}
}
