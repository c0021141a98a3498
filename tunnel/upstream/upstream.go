// Package upstream is every way out of detour: connecting directly, through
// a SOCKS5 proxy (RFC 1928/1929) or an HTTP CONNECT proxy (RFC 9110, Basic
// auth), all behind one Dialer signature; and groups of such upstreams
// with their pick strategies (round-robin, smooth weighted, least
// connections, consistent hashing with bounded load), failover, back-off,
// active probes, and the parsing of --upstream URLs.
//
// It is handed a target and the original destination and returns a bare,
// handshaken *net.TCPConn. It knows nothing of routing rules, sniffing,
// relaying or the kernel's redirection: which group a connection goes to,
// and what name it asks for, is package tunnel's business; the socket mark
// comes in through the Forward dialer's Control.
package upstream

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// MaxWeight is the largest weight Parse accepts.
const MaxWeight = 1000

// Upstream is one way out of a group: direct, or a proxy. Its health and
// active-connection count are kept by the Group that dials it; an Upstream
// may be shared by several groups. Use it by pointer only.
type Upstream struct {
	// Name identifies the upstream in logs and on a consistent-hash ring:
	// its URL without the password (and without the weight).
	Name string
	// Weight is its share for the weighted strategies. Zero or negative
	// means 1.
	Weight int
	// Dialer reaches destinations through this upstream.
	Dialer Dialer

	active  atomic.Int64 // leases handed out and not yet released
	benched atomic.Bool  // in back-off: strategies skip it
	down    atomic.Bool  // failed, and not yet worked again (the logged state)

	mu       sync.Mutex // guards the fields below, and changes to benched and down
	failures int        // failed retries since it went down, the first included
	since    time.Time  // when it went down
	lastFail time.Time  // when it last failed
	retryAt  time.Time  // when its back-off ends
}

// Active is the number of connections a Group dialled through u whose
// Lease is not yet released.
func (u *Upstream) Active() int64 { return u.active.Load() }

// Up reports whether strategies may pick u: it never failed, worked again
// since, or its back-off ran out (the group then tries it again). A Group
// notices the end of a back-off when it next dials or probes.
func (u *Upstream) Up() bool { return !u.benched.Load() }

func (u *Upstream) String() string { return u.Name }

func (u *Upstream) weight() int64 {
	if u.Weight < 1 {
		return 1
	}
	return int64(u.Weight)
}

// lastFailure is when u last failed; zero if never.
func (u *Upstream) lastFailure() time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.lastFail
}

// Parse parses one --upstream value:
//
//	direct
//	socks5://[user:pass@]host:port
//	http://[user:pass@]host:port
//
// each with an optional ?weight=N (1..1000, default 1). User and password
// are percent-decoded. forward is the template for every socket the
// upstream opens (timeout, socket mark); nil means a zero net.Dialer. Errors
// quote the value with its password masked.
func Parse(raw string, forward *net.Dialer) (*Upstream, error) {
	up, err := parse(raw, forward)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %w", redactURL(raw), err)
	}
	return up, nil
}

// parse is Parse without the value in its errors.
func parse(raw string, forward *net.Dialer) (*Upstream, error) {
	if raw == "direct" || strings.HasPrefix(raw, "direct?") {
		_, query, _ := strings.Cut(raw, "?")
		w, err := parseQueryWeight(query)
		if err != nil {
			return nil, err
		}
		return &Upstream{Name: "direct", Weight: w, Dialer: &Direct{Forward: forward}}, nil
	}
	u, err := parseProxyURL(raw)
	if err != nil {
		return nil, err
	}
	w, err := parseQueryWeight(u.RawQuery)
	if err != nil {
		return nil, err
	}
	return proxyUpstream(u, w, forward)
}

// parseProxyURL parses and checks a proxy's URL: a scheme detour speaks,
// host:port, nothing after but a query.
func parseProxyURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // its message quotes the whole URL, password included
		}
		return nil, err
	}
	switch u.Scheme {
	case "socks5", "http":
	case "":
		return nil, errors.New("missing scheme (want socks5://, http:// or direct)")
	default:
		return nil, fmt.Errorf("unsupported scheme %q (want socks5, http or direct)", u.Scheme)
	}
	host, port := u.Hostname(), u.Port()
	switch {
	case u.Opaque != "" || u.Host == "":
		return nil, errors.New("missing host:port")
	case host == "":
		return nil, errors.New("missing host")
	case port == "":
		return nil, errors.New("missing port")
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return nil, fmt.Errorf("invalid port %q", port)
	}
	if u.Path != "" && u.Path != "/" {
		return nil, fmt.Errorf("unexpected path %q", u.Path)
	}
	if u.Fragment != "" {
		return nil, fmt.Errorf("unexpected fragment %q", u.Fragment)
	}
	return u, nil
}

// proxyUpstream makes the upstream for a checked proxy URL: its name (the
// URL without password or weight) and its dialer.
func proxyUpstream(u *url.URL, weight int, forward *net.Dialer) (*Upstream, error) {
	proxy := net.JoinHostPort(u.Hostname(), u.Port())
	var user, pass string
	name := u.Scheme + "://" + proxy
	if u.User != nil {
		user = u.User.Username()
		pass, _ = u.User.Password()
		if user == "" {
			return nil, errors.New("empty user name")
		}
		name = u.Scheme + "://" + url.User(user).String() + "@" + proxy
	}
	up := &Upstream{Name: name, Weight: weight}
	switch u.Scheme {
	case "socks5":
		if len(user) > 255 || len(pass) > 255 {
			return nil, errors.New("user name and password must be at most 255 bytes each")
		}
		up.Dialer = &SOCKS5{Proxy: proxy, User: user, Password: pass, Forward: forward}
	case "http":
		if strings.IndexByte(user, ':') >= 0 {
			return nil, errors.New("user name contains ':', which Basic credentials cannot carry")
		}
		up.Dialer = &HTTPConnect{Proxy: proxy, User: user, Password: pass, Forward: forward}
	}
	return up, nil
}

// parseQueryWeight reads the weight from a URL's query, the only parameter
// allowed.
func parseQueryWeight(query string) (int, error) {
	q, err := url.ParseQuery(query)
	if err != nil {
		return 0, err
	}
	return parseWeight(q)
}

// parseWeight reads the weight from q, the only parameter allowed.
func parseWeight(q url.Values) (int, error) {
	for k := range q {
		if k != "weight" {
			return 0, fmt.Errorf("unknown parameter %q (want weight)", k)
		}
	}
	vs, ok := q["weight"]
	if !ok {
		return 1, nil
	}
	if len(vs) != 1 {
		return 0, errors.New("weight given more than once")
	}
	w, err := strconv.Atoi(vs[0])
	if err != nil || w < 1 || w > MaxWeight {
		return 0, fmt.Errorf("invalid weight %q (want 1..%d)", vs[0], MaxWeight)
	}
	return w, nil
}

// redactURL masks the password in raw, which may not parse as a URL.
func redactURL(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return raw
	}
	authEnd := strings.IndexAny(rest, "/?#")
	if authEnd < 0 {
		authEnd = len(rest)
	}
	at := strings.LastIndexByte(rest[:authEnd], '@')
	if at < 0 {
		return raw
	}
	user, _, hasPass := strings.Cut(rest[:at], ":")
	if !hasPass {
		return raw
	}
	return scheme + "://" + user + ":xxxxx" + rest[at:]
}
