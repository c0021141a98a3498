package upstream

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The replies real proxies sent to the handshake (testdata/replies, made by
// scripts/capture-upstream-replies.sh): dante, microsocks and squid. A
// name with "-auth" was captured with credentials offered.

// captureBanner is what the capture's own target server sent first.
const captureBanner = "SSH-2.0-OpenSSH_9.6 detour-capture\r\n"

// loadReplies returns the captured replies whose names start with prefix.
func loadReplies(tb testing.TB, prefix string) map[string][]byte {
	tb.Helper()
	files, _ := filepath.Glob(filepath.Join("testdata", "replies", prefix+"*"))
	if len(files) == 0 {
		tb.Fatalf("no testdata/replies/%s* seeds; run scripts/capture-upstream-replies.sh", prefix)
	}
	replies := make(map[string][]byte, len(files))
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			tb.Fatal(err)
		}
		replies[filepath.Base(p)] = b
	}
	return replies
}

// outcome is how a handshake went against a proxy's bytes.
type outcome struct {
	consumed int // of the proxy's bytes, before the tunnel's
	done     bool
	err      string
	class    handshakeFailure
	bound    netip.AddrPort
	sent     string // all the client sent
}

// converseWith runs a handshake through d against data, the proxy's
// bytes, fed in pieces of at most chunk bytes (0: all at once), sending
// Out and, once prepared, the request for target, as an event loop would.
// Before the request, a piece is at most what the handshake Needs: a
// proxy answers each message of the negotiation before the next is sent,
// so its answers cannot arrive together (a proxy that talks out of turn is
// TestHandshakeSOCKS5Errors' case). The reply and the tunnel's bytes may.
func converseWith(d Dialer, data []byte, chunk int, target string) outcome {
	h, ok := (&Upstream{Name: "u", Dialer: d}).Handshake()
	if !ok {
		panic("no handshake")
	}
	var o outcome
	var sent []byte
	requested := false
	for !h.Done() {
		sent = h.Out(sent)
		if h.Prepared() {
			var err error
			if sent, err = h.Request(sent, target); err != nil {
				panic(err)
			}
			requested = true
		}
		if h.Need() == 0 {
			panic("the handshake waits for nobody")
		}
		if o.consumed == len(data) {
			break // the proxy said no more
		}
		piece := data[o.consumed:]
		if chunk > 0 && len(piece) > chunk {
			piece = piece[:chunk]
		}
		if !requested && len(piece) > h.Need() {
			piece = piece[:h.Need()]
		}
		n, err := h.Feed(piece)
		if n > len(piece) || n < 0 {
			panic("Feed consumed more than it was given")
		}
		o.consumed += n
		if err != nil {
			o.err, o.class = err.Error(), classify(err)
			break
		}
		if n < len(piece) && !h.Done() {
			panic("Feed left bytes without being done or failing")
		}
	}
	o.done, o.bound, o.sent = h.Done(), h.Bound(), string(sent)
	return o
}

// checkConverse runs converseWith whole, byte by byte and in pieces of
// chunk, and fails unless all three agree, and a done handshake ended
// exactly at its last consumed byte.
func checkConverse(t *testing.T, d Dialer, data []byte, chunk int) outcome {
	t.Helper()
	const target = "site.test:443"
	whole := converseWith(d, data, 0, target)
	for _, c := range []int{1, chunk} {
		if c <= 0 {
			continue
		}
		if got := converseWith(d, data, c, target); got != whole {
			t.Fatalf("fed in pieces of %d: %+v; whole: %+v", c, got, whole)
		}
	}
	if whole.done {
		if short := converseWith(d, data[:whole.consumed-1], 0, target); short.done || short.err != "" {
			t.Fatalf("one byte short of the %d consumed: %+v", whole.consumed, short)
		}
	}
	return whole
}

func socksDialer(auth bool) Dialer {
	if auth {
		return &SOCKS5{Proxy: "198.18.0.2:1080", User: "alice", Password: "s3cret"}
	}
	return &SOCKS5{Proxy: "198.18.0.2:1080"}
}

func httpDialer(auth bool) Dialer {
	if auth {
		return &HTTPConnect{Proxy: "198.18.0.2:3128", User: "alice", Password: "s3cret"}
	}
	return &HTTPConnect{Proxy: "198.18.0.2:3128"}
}

// FuzzSOCKS5Reply: whatever a SOCKS5 proxy answers, the handshake never
// panics, never consumes a byte past the end of the reply, never waits for
// nobody, and ends the same however the answer is cut into reads.
func FuzzSOCKS5Reply(f *testing.F) {
	for name, b := range loadReplies(f, "socks5-") {
		f.Add(b, strings.Contains(name, "-auth"), uint8(3))
	}
	f.Add([]byte{5, 0, 5, 0, 0, 3, 0, 0, 0}, false, uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, auth bool, chunk uint8) {
		o := checkConverse(t, socksDialer(auth), data, int(chunk))
		if o.done && o.consumed > 2+2+4+1+255+2 {
			t.Fatalf("a SOCKS5 handshake of %d bytes", o.consumed)
		}
	})
}

// FuzzHTTPConnectReply: the same for an HTTP CONNECT reply head; a head
// taken ends with an empty line and has a 2xx status line.
func FuzzHTTPConnectReply(f *testing.F) {
	for name, b := range loadReplies(f, "http-") {
		f.Add(b, strings.Contains(name, "-auth"), uint8(7))
	}
	f.Fuzz(func(t *testing.T, data []byte, auth bool, chunk uint8) {
		o := checkConverse(t, httpDialer(auth), data, int(chunk))
		if !o.done {
			return
		}
		head := data[:o.consumed]
		if !bytes.HasSuffix(head, []byte("\n\n")) && !bytes.HasSuffix(head, []byte("\n\r\n")) || o.consumed > maxReplyHead {
			t.Fatalf("head %q does not end with an empty line, or is too long", head)
		}
		if !bytes.HasPrefix(head, []byte("HTTP/1.")) || head[9] != '2' {
			t.Fatalf("head %q taken without a 2xx status", head)
		}
	})
}

// TestCapturedReplies: what dante, microsocks and squid really answered
// is read as they meant it: the tunnel's first bytes are left to the
// client, the bound address is theirs, and each refusal is classified as
// the group's health rules need.
func TestCapturedReplies(t *testing.T) {
	ok := -1 // class of a handshake that worked
	for _, tc := range []struct {
		name  string
		class handshakeFailure // or ok
		bound string           // for SOCKS5 successes
		err   string
	}{
		{"socks5-dante-ipv4", handshakeFailure(ok), "127.0.0.1", ""},
		{"socks5-dante-ipv6", handshakeFailure(ok), "::1", ""},
		{"socks5-dante-name", handshakeFailure(ok), "127.0.0.1", ""},
		{"socks5-dante-ipv6-proxy", handshakeFailure(ok), "127.0.0.1", ""},
		{"socks5-dante-auth-offered", handshakeFailure(ok), "127.0.0.1", ""},
		{"socks5-dante-refused", failTarget, "", "connection refused (0x05)"},
		{"socks5-dante-denied", failRefused, "", "not allowed by ruleset (0x02)"},
		{"socks5-dante-unresolvable", failTarget, "", "host unreachable (0x04)"},
		{"socks5-microsocks-auth-ipv4", handshakeFailure(ok), "0.0.0.0", ""},
		{"socks5-microsocks-auth-ipv6", handshakeFailure(ok), "0.0.0.0", ""},
		{"socks5-microsocks-auth-name", handshakeFailure(ok), "0.0.0.0", ""},
		{"socks5-microsocks-auth-refused", failTarget, "", "connection refused (0x05)"},
		{"socks5-microsocks-auth-unresolvable", failRefused, "", "general SOCKS server failure (0x01)"},
		{"socks5-microsocks-auth-wrong", failBenches, "", "username/password rejected"},
		{"socks5-microsocks-noauth", failBenches, "", "no acceptable authentication method"},
		{"http-squid-200", handshakeFailure(ok), "", ""},
		{"http-squid-200-ipv6", handshakeFailure(ok), "", ""},
		{"http-squid-auth-200", handshakeFailure(ok), "", ""},
		{"http-squid-403", failRefused, "", `"403 Forbidden"`},
		{"http-squid-503", failTarget, "", `"503 Service Unavailable"`},
		{"http-squid-407", failBenches, "", `"407 Proxy Authentication Required"`},
		{"http-squid-auth-407", failBenches, "", `"407 Proxy Authentication Required"`},
	} {
		data := loadReplies(t, tc.name)[tc.name]
		d := socksDialer(strings.Contains(tc.name, "-auth"))
		if strings.HasPrefix(tc.name, "http-") {
			d = httpDialer(strings.Contains(tc.name, "-auth"))
		}
		o := checkConverse(t, d, data, 5)
		if tc.class == handshakeFailure(ok) {
			if !o.done || string(data[o.consumed:]) != captureBanner {
				t.Errorf("%s: done %v, %q left for the client, %s; want the banner", tc.name, o.done, data[o.consumed:], o.err)
			}
			if tc.bound != "" && o.bound.Addr().String() != tc.bound {
				t.Errorf("%s: bound %v, want %s", tc.name, o.bound, tc.bound)
			}
			continue
		}
		if o.done || !strings.Contains(o.err, tc.err) || o.class != tc.class {
			t.Errorf("%s: done %v, %s (class %d); want %q, class %d", tc.name, o.done, o.err, o.class, tc.err, tc.class)
		}
	}
}
