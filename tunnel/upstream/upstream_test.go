package upstream

import (
	"net"
	"strings"
	"testing"
	"time"
)

func TestParseUpstream(t *testing.T) {
	fwd := &net.Dialer{Timeout: 3 * time.Second}
	for _, tc := range []struct {
		raw    string
		name   string
		weight int
		want   Dialer
	}{
		{"direct", "direct", 1, &Direct{Forward: fwd}},
		{"direct?weight=4", "direct", 4, &Direct{Forward: fwd}},
		{"socks5://198.18.2.2:1080", "socks5://198.18.2.2:1080", 1, &SOCKS5{Proxy: "198.18.2.2:1080", Forward: fwd}},
		{"socks5://alice:s3cret@proxy.lan:1080?weight=1000", "socks5://alice@proxy.lan:1080", 1000,
			&SOCKS5{Proxy: "proxy.lan:1080", User: "alice", Password: "s3cret", Forward: fwd}},
		{"http://[fd00::2]:3128/", "http://[fd00::2]:3128", 1, &HTTPConnect{Proxy: "[fd00::2]:3128", Forward: fwd}},
		{"http://a%20b:p%40ss%3Aw%2Fd@198.18.2.2:3128?weight=2", "http://a%20b@198.18.2.2:3128", 2,
			&HTTPConnect{Proxy: "198.18.2.2:3128", User: "a b", Password: "p@ss:w/d", Forward: fwd}},
		{"socks5://bob@198.18.2.2:1080", "socks5://bob@198.18.2.2:1080", 1, &SOCKS5{Proxy: "198.18.2.2:1080", User: "bob", Forward: fwd}},
	} {
		u, err := Parse(tc.raw, fwd)
		if err != nil {
			t.Errorf("%s: %v", tc.raw, err)
			continue
		}
		if u.Name != tc.name || u.Weight != tc.weight || !sameDialer(u.Dialer, tc.want) {
			t.Errorf("%s: got %q weight %d %#v; want %q weight %d %#v", tc.raw, u.Name, u.Weight, u.Dialer, tc.name, tc.weight, tc.want)
		}
		if !u.Up() || u.Active() != 0 {
			t.Errorf("%s: a new upstream is not up and idle", tc.raw)
		}
	}
}

func sameDialer(a, b Dialer) bool {
	switch a := a.(type) {
	case *Direct:
		b, ok := b.(*Direct)
		return ok && *a == *b
	case *SOCKS5:
		b, ok := b.(*SOCKS5)
		return ok && *a == *b
	case *HTTPConnect:
		b, ok := b.(*HTTPConnect)
		return ok && *a == *b
	}
	return false
}

func TestParseUpstreamErrors(t *testing.T) {
	for _, tc := range []struct{ raw, want string }{
		{"ftp://x", `upstream "ftp://x": unsupported scheme "ftp" (want socks5, http or direct)`},
		{"https://proxy:3128", `unsupported scheme "https"`},
		{"socks5://proxy", `upstream "socks5://proxy": missing port`},
		{"socks5://proxy:", "missing port"},
		{"socks5://:1080", "missing host"},
		{"socks5://proxy:0", `invalid port "0"`},
		{"socks5://proxy:99999", "invalid port"},
		{"socks5://proxy:1080?weight=0", `invalid weight "0" (want 1..1000)`},
		{"socks5://proxy:1080?weight=1001", `invalid weight "1001"`},
		{"socks5://proxy:1080?weight=x", `invalid weight "x"`},
		{"socks5://proxy:1080?weight=1&weight=2", "weight given more than once"},
		{"socks5://proxy:1080?wieght=2", `unknown parameter "wieght" (want weight)`},
		{"direct?foo=1", `upstream "direct?foo=1": unknown parameter "foo"`},
		{"http://proxy:3128/path", `unexpected path "/path"`},
		{"socks5://" + strings.Repeat("u", 256) + ":p@proxy:1080", "at most 255 bytes"},
		{"http://a%3Ab:pw@proxy:3128", "user name contains ':'"},
		{"socks5://:pw@proxy:1080", "empty user name"},
		{"198.18.2.2:1080", "upstream"},
		{"proxy:1080", `unsupported scheme "proxy"`},
		{"", "missing scheme"},
	} {
		_, err := Parse(tc.raw, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) error = %v; want it to say %q", tc.raw, err, tc.want)
		}
	}
}

// TestParseUpstreamHidesPassword: errors are printed on exit and logged;
// the password must not be in them.
func TestParseUpstreamHidesPassword(t *testing.T) {
	for _, raw := range []string{
		"socks5://alice:hunter2@proxy:1080?weight=0",
		"socks5://alice:hunter2@proxy:bad",
		"http://alice:hunter2@proxy:3128/x",
		"ftp://alice:hunter2@proxy",
		"socks5://alice:hunter2@proxy:1080/%zz",
	} {
		_, err := Parse(raw, nil)
		if err == nil {
			t.Fatalf("%s parsed", raw)
		}
		if strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "alice:xxxxx@") {
			t.Errorf("error for %s shows the password or no user: %v", raw, err)
		}
	}
	u, err := Parse("socks5://alice:hunter2@proxy:1080", nil)
	if err != nil || strings.Contains(u.Name, "hunter2") || u.String() != u.Name {
		t.Fatalf("name %q, %v", u.Name, err)
	}
}
