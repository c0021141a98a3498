package test

// End-to-end tests with real browsers through real upstreams: headless
// Chromium and Firefox ESR load https://site.test/ through detour, which
// sends them on through dante (SOCKS5) or squid (HTTP CONNECT). Both
// browsers send GREASE ECH on every ClientHello, so these show that an ECH
// outer name reaches the upstream.
//
// The client and the upstream disagree about site.test on purpose: the
// client's resolver says 198.18.2.2, the upstream's 198.18.2.3, and the
// server namespace serves a different page on each. The browser can only
// get the page of 198.18.2.3 if the upstream was asked for the name and
// resolved it itself.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	siteName     = "site.test"
	siteAtClient = "198.18.2.2" // what the client's resolver says
	siteAtProxy  = "198.18.2.3" // what the upstream's resolver says
)

// sitePage is what the server answers at addr.
func sitePage(addr string) string {
	return fmt.Sprintf("<html><body><p id=where>site.test as served at %s</p></body></html>", addr)
}

// siteServer serves https://site.test/ in the server namespace on both
// addresses and counts the requests each address got.
type siteServer struct {
	mu   sync.Mutex
	hits map[string]int // local address -> requests
}

func (s *siteServer) count(addr string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hits[addr]
}

func (s *siteServer) reset() {
	s.mu.Lock()
	s.hits = map[string]int{}
	s.mu.Unlock()
}

func startSiteServer(t *testing.T, tp *topo) *siteServer {
	t.Helper()
	if out, err := tp.exec(t, tp.S, "ip", "addr", "add", siteAtProxy+"/24", "dev", "s0"); err != nil {
		t.Fatalf("adding %s to the server: %v\n%s", siteAtProxy, err, out)
	}
	s := &siteServer{hits: map[string]int{}}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		ap, _ := netipAddrPort(local)
		s.mu.Lock()
		s.hits[ap]++
		s.mu.Unlock()
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, sitePage(ap))
	})
	srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}}
	ln := listenIn(t, tp.S, "0.0.0.0:443")
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return s
}

// netipAddrPort is a's IP as a string.
func netipAddrPort(a net.Addr) (string, bool) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return "", false
	}
	return ta.AddrPort().Addr().Unmap().String(), true
}

// clientResolver gives the client namespace its own resolver files
// (`ip netns exec` mounts /etc/netns/NS/* over /etc/*): site.test is
// siteAtClient, and there is no DNS server to ask (127.0.0.1 has none), so
// no lookup leaves the namespace.
func clientResolver(t *testing.T, tp *topo) {
	t.Helper()
	netnsEtc(t, tp.C, map[string]string{
		"hosts":       "127.0.0.1 localhost\n::1 localhost\n" + siteAtClient + " " + siteName + "\n",
		"resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
	})
}

// TestBrowsersThroughUpstreams: for dante and squid, Chromium and Firefox
// ESR get the page site.test has at the upstream; the upstream's own log
// shows it was asked for site.test; detour's access line has the outer
// name, ech=true and the original destination, and the metrics count the
// ECH hellos.
func TestBrowsersThroughUpstreams(t *testing.T) {
	tp := newTopo(t)
	chromium, chromiumErr := exec.LookPath("chromium")
	firefox, firefoxErr := exec.LookPath("firefox-esr")
	if chromiumErr != nil || firefoxErr != nil {
		t.Fatalf("the browser tests need chromium and firefox-esr: run scripts/install-deps.sh (%v, %v)", chromiumErr, firefoxErr)
	}
	site := startSiteServer(t, tp)
	ps := startProxies(t, tp, map[string]string{siteName: siteAtProxy})
	clientResolver(t, tp)
	f := families[0]

	browsers := []struct {
		name string
		load func(t *testing.T, url string) (string, error)
	}{
		{"chromium", func(t *testing.T, url string) (string, error) { return chromiumDOM(t, tp, chromium, url) }},
		{"firefox", func(t *testing.T, url string) (string, error) { return firefoxSource(t, tp, firefox, url) }},
	}
	for _, up := range []struct {
		name, url string
		carrier   string
	}{
		{"dante", proxyURL("socks5", "", f, dantePort), byDante},
		{"squid", proxyURL("http", "", f, squidPort), bySquid},
	} {
		t.Run(up.name, func(t *testing.T) {
			d := startDetourUp(t, tp, "--upstream", up.url, "--metrics", metricsAddr)
			for _, b := range browsers {
				t.Run(b.name, func(t *testing.T) {
					site.reset()
					before := ps.requests(siteName, httpsPort)[up.carrier]
					m0 := scrape(t, tp)
					page, err := b.load(t, "https://"+siteName+"/")
					if err != nil {
						t.Fatal(err)
					}
					if !strings.Contains(page, "site.test as served at "+siteAtProxy) {
						t.Fatalf("%s got a page not from %s (where the upstream resolves site.test):\n%s", b.name, siteAtProxy, lastLines(page, 20))
					}
					if n := site.count(siteAtClient); n != 0 {
						t.Errorf("%s reached %s, the client's address for site.test, %d times", b.name, siteAtClient, n)
					}
					rec := d.waitLog(t, 10*time.Second, "conn", map[string]string{"host": siteName, "dst": net.JoinHostPort(siteAtClient, "443")})
					if rec["ech"] != true || rec["target"] != siteName+":443" || rec["route"] == "direct" {
						t.Errorf("access line = %v; want ech=true (GREASE) and target %s:443 through the upstream", rec, siteName)
					}
					if n := delta(m0, scrape(t, tp), "detour_sniff_ech_total"); n < 1 {
						t.Errorf("detour_sniff_ech_total rose by %g, want the browser's hellos", n)
					}
					if n := waitCount(10*time.Second, before+1, func() int { return ps.requests(siteName, httpsPort)[up.carrier] }); n <= before {
						t.Errorf("%s's log shows no request for %s:%d:\n%s", up.name, siteName, httpsPort, lastLines(ps.byName(up.carrier).logText(), 20))
					}
				})
			}
		})
	}
}

// chromiumDOM loads url in headless Chromium in the client namespace and
// returns the DOM once loaded. Names resolve only to site.test's client
// address (--host-resolver-rules), so Chromium asks no resolver.
func chromiumDOM(t *testing.T, tp *topo, bin, url string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", tp.C, bin,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-default-apps", "--disable-features=MediaRouter,OptimizationHints",
		"--ignore-certificate-errors", "--user-data-dir="+t.TempDir(),
		"--host-resolver-rules=MAP "+siteName+" "+siteAtClient+", MAP * ~NOTFOUND",
		"--dump-dom", url)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("chromium %s: %v", url, err)
	}
	return string(out), nil
}

// firefoxPrefs keep a headless Firefox ESR to the page it is told to
// load: no telemetry, updates, captive-portal or connectivity checks, safe
// browsing, remote settings, DNS over HTTPS, speculative connections or
// first-run pages.
var firefoxPrefs = map[string]any{
	"app.normandy.enabled":                            false,
	"app.update.auto":                                 false,
	"app.update.enabled":                              false,
	"browser.aboutwelcome.enabled":                    false,
	"browser.newtabpage.enabled":                      false,
	"browser.ping-centre.telemetry":                   false,
	"browser.safebrowsing.blockedURIs.enabled":        false,
	"browser.safebrowsing.downloads.enabled":          false,
	"browser.safebrowsing.malware.enabled":            false,
	"browser.safebrowsing.phishing.enabled":           false,
	"browser.safebrowsing.provider.google4.updateURL": "",
	"browser.search.update":                           false,
	"browser.shell.checkDefaultBrowser":               false,
	"browser.startup.homepage":                        "about:blank",
	"browser.startup.page":                            0,
	"datareporting.healthreport.uploadEnabled":        false,
	"datareporting.policy.dataSubmissionEnabled":      false,
	"dom.push.enabled":                                false,
	"extensions.getAddons.cache.enabled":              false,
	"extensions.update.enabled":                       false,
	"marionette.port":                                 marionettePort,
	"network.captive-portal-service.enabled":          false,
	"network.connectivity-service.enabled":            false,
	"network.dns.disablePrefetch":                     true,
	"network.http.speculative-parallel-limit":         0,
	"network.prefetch-next":                           false,
	"network.trr.mode":                                5, // no DNS over HTTPS
	"services.settings.server":                        "http://127.0.0.1:1/",
	"toolkit.telemetry.enabled":                       false,
	"toolkit.telemetry.server":                        "",
	"toolkit.telemetry.unified":                       false,
}

const marionettePort = 2828

// firefoxSource loads url in headless Firefox ESR (a fresh profile, in the
// client namespace, names from the namespace's /etc/hosts) and returns the
// page source, through Marionette, Firefox's own remote protocol (the
// self-signed certificate is accepted for the session only).
func firefoxSource(t *testing.T, tp *topo, bin, url string) (string, error) {
	t.Helper()
	profile := t.TempDir()
	var prefs strings.Builder
	for k, v := range firefoxPrefs {
		b, _ := json.Marshal(v)
		fmt.Fprintf(&prefs, "user_pref(%q, %s);\n", k, b)
	}
	if err := os.WriteFile(filepath.Join(profile, "user.js"), []byte(prefs.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(profile, "firefox.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("ip", "netns", "exec", tp.C, bin, "--headless", "--marionette", "--no-remote", "--profile", profile)
	cmd.Env = append(os.Environ(), "HOME="+profile, "MOZ_CRASHREPORTER_DISABLE=1")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting firefox: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("firefox output (last lines):\n%s", lastLines(string(b), 30))
		}
	}()

	var m *marionette
	deadline := time.Now().Add(30 * time.Second)
	for m == nil {
		c, err := dialIn(t, tp.C, net.JoinHostPort("127.0.0.1", strconv.Itoa(marionettePort)))
		if err == nil {
			if m, err = newMarionette(c); err != nil {
				c.Close()
				return "", err
			}
			break
		}
		select {
		case <-done:
			return "", fmt.Errorf("firefox exited before Marionette listened: %v", cmd.ProcessState)
		default:
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("firefox's Marionette not listening within 30s: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer m.c.Close()
	m.c.SetDeadline(time.Now().Add(60 * time.Second))
	// Marionette takes the capabilities themselves as the parameters.
	sess, err := m.call("WebDriver:NewSession", map[string]any{"acceptInsecureCerts": true})
	if err != nil {
		return "", err
	}
	var caps struct {
		Capabilities struct{ AcceptInsecureCerts bool }
	}
	if json.Unmarshal(sess, &caps) != nil || !caps.Capabilities.AcceptInsecureCerts {
		return "", fmt.Errorf("marionette session %s: want acceptInsecureCerts", sess)
	}
	if _, err := m.call("WebDriver:Navigate", map[string]any{"url": url}); err != nil {
		return "", err
	}
	res, err := m.call("WebDriver:GetPageSource", map[string]any{})
	if err != nil {
		return "", err
	}
	var src struct{ Value string }
	if err := json.Unmarshal(res, &src); err != nil {
		return "", fmt.Errorf("page source %s: %v", res, err)
	}
	m.call("Marionette:Quit", map[string]any{})
	return src.Value, nil
}

// marionette is a client of Firefox's Marionette protocol (version 3):
// messages are "LENGTH:JSON"; a command is [0, id, name, params], its
// response [1, id, error, result].
type marionette struct {
	c  net.Conn
	r  *bufio.Reader
	id int
}

func newMarionette(c net.Conn) (*marionette, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	m := &marionette{c: c, r: bufio.NewReader(c)}
	hello, err := m.read()
	if err != nil {
		return nil, fmt.Errorf("marionette greeting: %v", err)
	}
	var h struct {
		MarionetteProtocol int
	}
	if json.Unmarshal(hello, &h) != nil || h.MarionetteProtocol != 3 {
		return nil, fmt.Errorf("marionette greeting %s: want protocol 3", hello)
	}
	return m, nil
}

func (m *marionette) read() ([]byte, error) {
	n, err := m.r.ReadString(':')
	if err != nil {
		return nil, err
	}
	size, err := strconv.Atoi(strings.TrimSuffix(n, ":"))
	if err != nil || size < 0 || size > 64<<20 {
		return nil, fmt.Errorf("bad message length %q", n)
	}
	b := make([]byte, size)
	_, err = io.ReadFull(m.r, b)
	return b, err
}

func (m *marionette) call(name string, params any) (json.RawMessage, error) {
	m.id++
	msg, _ := json.Marshal([]any{0, m.id, name, params})
	if _, err := fmt.Fprintf(m.c, "%d:%s", len(msg), msg); err != nil {
		return nil, fmt.Errorf("marionette %s: %v", name, err)
	}
	for {
		b, err := m.read()
		if err != nil {
			return nil, fmt.Errorf("marionette %s: %v", name, err)
		}
		var resp []json.RawMessage
		if err := json.Unmarshal(b, &resp); err != nil || len(resp) != 4 {
			return nil, fmt.Errorf("marionette %s: bad response %s", name, b)
		}
		var kind, id int
		json.Unmarshal(resp[0], &kind)
		json.Unmarshal(resp[1], &id)
		if kind != 1 || id != m.id {
			continue // not ours
		}
		if string(resp[2]) != "null" {
			return nil, fmt.Errorf("marionette %s: %w", name, errors.New(string(resp[2])))
		}
		return resp[3], nil
	}
}
