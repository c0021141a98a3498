package tunnel

import (
	"io"

	"github.com/detour-proxy/detour/internal/testkit"
	"github.com/detour-proxy/detour/tunnel/upstream"

	"crypto/ecdh"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// echConfigList builds an ECHConfigList (draft-ietf-tls-esni-22 §4) with one
// config for publicName: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
// AES-128-GCM, with a fresh key.
func echConfigList(t *testing.T, publicName string) []byte {
	t.Helper()
	key, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u16 := func(b []byte, v int) []byte { return append(b, byte(v>>8), byte(v)) }
	pub := key.PublicKey().Bytes()
	var c []byte
	c = append(c, 7)                                            // config_id
	c = u16(c, 0x0020)                                          // kem_id: DHKEM(X25519, HKDF-SHA256)
	c = append(u16(c, len(pub)), pub...)                        // public_key
	c = u16(u16(u16(c, 4), 0x0001), 0x0001)                     // cipher_suites: HKDF-SHA256, AES-128-GCM
	c = append(c, 0)                                            // maximum_name_length
	c = append(append(c, byte(len(publicName))), publicName...) // public_name
	c = u16(c, 0)                                               // extensions
	config := u16(u16(nil, 0xfe0d), len(c))
	config = append(config, c...)
	return append(u16(nil, len(config)), config...)
}

// recordingConn is the client side of a TLS handshake that goes nowhere:
// it keeps what the client writes and ends the handshake at its first read.
type recordingConn struct {
	net.Conn // nil: only the methods below are called
	written  []byte
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.written = append(c.written, b...)
	return len(b), nil
}
func (c *recordingConn) Read([]byte) (int, error)         { return 0, errors.New("recording only") }
func (c *recordingConn) Close() error                     { return nil }
func (c *recordingConn) SetDeadline(time.Time) error      { return nil }
func (c *recordingConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordingConn) SetWriteDeadline(time.Time) error { return nil }

// goECHHello is the ClientHello Go's crypto/tls sends with real ECH: the
// inner hello (to secret.test) encrypted, the outer one naming public.test.
func goECHHello(t *testing.T) []byte {
	t.Helper()
	conn := &recordingConn{}
	tls.Client(conn, &tls.Config{
		ServerName:                     "secret.test",
		MinVersion:                     tls.VersionTLS13,
		EncryptedClientHelloConfigList: echConfigList(t, "public.test"),
		NextProtos:                     []string{"h2", "http/1.1"},
	}).Handshake()
	if len(conn.written) == 0 {
		t.Fatal("crypto/tls wrote no ClientHello")
	}
	return conn.written
}

// Every ECH case the sniff package knows, through the whole data path: a
// client's hello with encrypted_client_hello routes on its outer name, the
// upstream is asked for that name under override (and for the IP under
// route-only), and the access line says ech=true.
func TestECHOuterNameSentUpstream(t *testing.T) {
	chromium, err := os.ReadFile(filepath.Join("..", "sniff", "testdata", "flights", "chromium-https.bin"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		hello []byte
		outer string
	}{
		{"chromium GREASE ECH", chromium, "www.example.test"},
		{"crypto/tls real ECH", goECHHello(t), "public.test"},
	} {
		// That sniffing finds the outer name with ECH is checked below,
		// in the access line.
		if strings.Contains(string(tc.hello), "secret.test") {
			t.Fatalf("%s: the inner name is in the clear", tc.name)
		}
		for _, mode := range []NameMode{Override, RouteOnly} {
			t.Run(tc.name+"/"+mode.String(), func(t *testing.T) {
				testkit.CheckGoroutines(t)
				dst := netip.MustParseAddrPort("198.18.2.2:443")
				proxy, seen := socksRecorder(t)
				group := &upstream.Group{Name: "proxies", Upstreams: []*upstream.Upstream{{Name: "socks", Dialer: &upstream.SOCKS5{Proxy: proxy}}}}
				ln := newFakeListener(t, dst, nil)
				tun := &Tunnel{Sniff: SniffOptions{Timeout: 5 * time.Second}}
				tun.SetRouter(&Router{Default: Action{Kind: ActionProxy, Group: group, Name: mode}})
				logs := startTunnel(t, ln, tun)

				c := dialTunnel(t, ln)
				if _, err := c.Write(tc.hello); err != nil {
					t.Fatal(err)
				}
				c.Close() // the fake upstream reports once its tunnel ends
				want := dst.String()
				if mode == Override {
					want = tc.outer + ":443"
				}
				select {
				case target := <-seen:
					if target != want {
						t.Fatalf("upstream asked for %s, want %s", target, want)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("the upstream was never asked")
				}
				logs.WaitFor(t, "msg=conn")
				for _, w := range []string{"host=" + tc.outer, "proto=tls", "sniff=found", "ech=true", "target=" + want} {
					if !strings.Contains(logs.String(), w) {
						t.Errorf("access line lacks %q: %s", w, logs.String())
					}
				}
			})
		}
	}
}

// socksRecorder is a SOCKS5 server (no authentication) that reports the
// target of each CONNECT it is asked for, answers success and reads until
// the client goes.
func socksRecorder(t *testing.T) (addr string, targets <-chan string) {
	ln := testkit.Listen(t)
	ch := make(chan string, 4)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if target, err := socksConnect(c); err == nil {
					ch <- target
					io.Copy(io.Discard, c)
				}
			}()
		}
	}()
	return ln.Addr().String(), ch
}

// socksConnect reads a SOCKS5 greeting and CONNECT request from c, accepts
// both, and returns the request's target as host:port.
func socksConnect(c *net.TCPConn) (string, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	read := func(n int) ([]byte, error) {
		b := make([]byte, n)
		_, err := io.ReadFull(c, b)
		return b, err
	}
	h, err := read(2)
	if err == nil {
		_, err = read(int(h[1]))
	}
	if err != nil {
		return "", err
	}
	c.Write([]byte{5, 0})
	req, err := read(4)
	if err != nil {
		return "", err
	}
	target, err := testkit.ReadSOCKSAddr(c, req[3])
	if err != nil {
		return "", err
	}
	c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	return target, nil
}
