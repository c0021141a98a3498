package sniff

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a fresh loopback TCP connection: the
// accepted one, which Peek reads, and the client's.
func tcpPair(t *testing.T) (server, client *net.TCPConn) {
	client, server = testkit.TCPPair(t)
	return server, client
}

// write sends b on c in chunks that chunk gives, pausing between them, in a
// goroutine the test waits for.
func write(t *testing.T, c net.Conn, b []byte, chunk func() int, pause time.Duration) {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	t.Cleanup(wg.Wait)
	go func() {
		defer wg.Done()
		for len(b) > 0 {
			n := min(max(chunk(), 1), len(b))
			if _, err := c.Write(b[:n]); err != nil {
				return
			}
			b = b[n:]
			time.Sleep(pause)
		}
	}()
}

func corpusFile(t *testing.T, name string) flight {
	t.Helper()
	for _, fl := range loadCorpus(t) {
		if fl.file == name {
			return fl
		}
	}
	t.Fatalf("no %s in corpus.txt", name)
	return flight{}
}

// TestPeekOneByteWrites sends the large Chromium ClientHello one byte per
// TCP segment.
func TestPeekOneByteWrites(t *testing.T) {
	fl := corpusFile(t, "chromium-https.bin")
	server, client := tcpPair(t)
	client.SetNoDelay(true)
	write(t, client, fl.data, func() int { return 1 }, 10*time.Microsecond)
	data, r, o, err := Peek(server, Options{Timeout: 20 * time.Second})
	if o != Found || err != nil || r.Host != fl.want.Host || !r.ECH || !bytes.Equal(data, fl.data) {
		t.Fatalf("got %v %v %+v, %d bytes", o, err, r, len(data))
	}
	checkDeadlineCleared(t, server, client)
}

// TestPeekCorpus sends every flight in random segments over real TCP.
func TestPeekCorpus(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, fl := range loadCorpus(t) {
		server, client := tcpPair(t)
		write(t, client, fl.data, func() int { return 1 + rng.IntN(300) }, time.Millisecond)
		data, r, o, err := Peek(server, Options{Timeout: 10 * time.Second})
		want := Found
		if fl.want.Host == "" {
			want = None
		}
		if o != want || err != nil || !bytes.Equal(data, fl.data) {
			t.Errorf("%s: %v %v, %d of %d bytes", fl.file, o, err, len(data), len(fl.data))
		}
		fl.check(t, "Peek", r, Match)
	}
}

// TestPeekFragmentedRecords sends 1-byte records in random segments.
func TestPeekFragmentedRecords(t *testing.T) {
	fl := corpusFile(t, "go-tls.bin")
	b := fragment(handshakeStream(t, fl.data), func() int { return 1 })
	server, client := tcpPair(t)
	rng := rand.New(rand.NewPCG(3, 4))
	write(t, client, b, func() int { return rng.IntN(2000) }, time.Millisecond)
	data, r, o, err := Peek(server, Options{Timeout: 10 * time.Second})
	if o != Found || err != nil || r.Host != fl.want.Host || !bytes.Equal(data, b) {
		t.Fatalf("got %v %v %+v, %d of %d bytes", o, err, r, len(data), len(b))
	}
}

// TestPeekSilent: a client that waits for the server gets a Timeout after
// the timeout, with nothing read.
func TestPeekSilent(t *testing.T) {
	server, client := tcpPair(t)
	start := time.Now()
	data, r, o, err := Peek(server, Options{Timeout: 100 * time.Millisecond})
	elapsed := time.Since(start)
	if o != Timeout || !errors.Is(err, os.ErrDeadlineExceeded) || data != nil || r != (Result{}) {
		t.Fatalf("got %v %v %+v %q", o, err, r, data)
	}
	if elapsed < 100*time.Millisecond || elapsed > time.Second {
		t.Errorf("timed out after %v", elapsed)
	}
	checkDeadlineCleared(t, server, client)
}

// TestPeekDefaultTimeout checks the zero Options.
func TestPeekDefaultTimeout(t *testing.T) {
	server, _ := tcpPair(t)
	start := time.Now()
	_, _, o, _ := Peek(server, Options{})
	if elapsed := time.Since(start); o != Timeout || elapsed < DefaultTimeout || elapsed > DefaultTimeout+time.Second {
		t.Fatalf("%v after %v", o, elapsed)
	}
}

// TestPeekStalled: a client that stops mid-hello times out with what it sent.
func TestPeekStalled(t *testing.T) {
	fl := corpusFile(t, "curl-https.bin")
	server, client := tcpPair(t)
	client.Write(fl.data[:100])
	data, _, o, err := Peek(server, Options{Timeout: 100 * time.Millisecond})
	if o != Timeout || err == nil || !bytes.Equal(data, fl.data[:100]) {
		t.Fatalf("got %v %v, %d bytes", o, err, len(data))
	}
}

// TestPeekClosed: a client that closes early leaves its bytes.
func TestPeekClosed(t *testing.T) {
	fl := corpusFile(t, "curl-http.bin")
	server, client := tcpPair(t)
	client.Write(fl.data[:20])
	client.CloseWrite()
	data, _, o, err := Peek(server, Options{Timeout: 5 * time.Second})
	if o != Closed || err != io.EOF || !bytes.Equal(data, fl.data[:20]) {
		t.Fatalf("got %v %v %q", o, err, data)
	}
}

// TestPeekReset: a client that resets the connection.
func TestPeekReset(t *testing.T) {
	server, client := tcpPair(t)
	client.SetLinger(0)
	client.Write([]byte("GET / HT"))
	time.Sleep(20 * time.Millisecond)
	client.Close() // RST, since linger is 0
	data, _, o, err := Peek(server, Options{Timeout: 5 * time.Second})
	if o != Closed || !errors.Is(err, syscall.ECONNRESET) && err != io.EOF || !bytes.HasPrefix([]byte("GET / HT"), data) {
		t.Fatalf("got %v %v %q", o, err, data)
	}
}

// TestPeekNoMatch: bytes of another protocol end the peek at once.
func TestPeekNoMatch(t *testing.T) {
	server, client := tcpPair(t)
	client.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
	start := time.Now()
	data, r, o, err := Peek(server, Options{Timeout: 5 * time.Second})
	if o != None || err != nil || r != (Result{}) || string(data) != "SSH-2.0-OpenSSH_9.6\r\n" || time.Since(start) > time.Second {
		t.Fatalf("got %v %v %+v %q", o, err, r, data)
	}
}

// TestPeekNoHost: a recognised protocol without a host name.
func TestPeekNoHost(t *testing.T) {
	server, client := tcpPair(t)
	client.Write(hello(alpnExt("h2")))
	data, r, o, err := Peek(server, Options{})
	if o != None || err != nil || r.Proto != TLS || r.Host != "" || !r.OffersALPN("h2") || len(data) == 0 {
		t.Fatalf("got %v %v %+v", o, err, r)
	}
}

// TestPeekTooLarge: an HTTP head that never ends stops at the cap.
func TestPeekTooLarge(t *testing.T) {
	server, client := tcpPair(t)
	head := []byte("GET / HTTP/1.1\r\n" + strings.Repeat("X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", 2000))
	write(t, client, head, func() int { return 1500 }, 0)
	data, _, o, err := Peek(server, Options{MaxBytes: 16 << 10, Timeout: 300 * time.Millisecond})
	if o != TooLarge || err != nil || len(data) != 16<<10 || !bytes.Equal(data, head[:len(data)]) {
		t.Fatalf("got %v %v, %d bytes", o, err, len(data))
	}
	// The deadline is gone: the rest can be read after it would have passed.
	time.Sleep(400 * time.Millisecond)
	rest := make([]byte, len(head)-len(data))
	if _, err := io.ReadFull(server, rest); err != nil || !bytes.Equal(rest, head[len(data):]) {
		t.Fatalf("reading the rest: %v", err)
	}
}

// TestPeekTooLargeAnnounced: a ClientHello announced larger than the cap is
// given up at once.
func TestPeekTooLargeAnnounced(t *testing.T) {
	server, client := tcpPair(t)
	client.Write([]byte{0x16, 3, 1, 0x40, 0, 1, 0, 0xf0, 0})
	start := time.Now()
	data, _, o, err := Peek(server, Options{MaxBytes: 8 << 10, Timeout: 5 * time.Second})
	if o != TooLarge || err != nil || len(data) != 9 || time.Since(start) > time.Second {
		t.Fatalf("got %v %v, %d bytes after %v", o, err, len(data), time.Since(start))
	}
}

// TestPeekGrowth: a large hello grows the buffer to what its headers ask,
// not to the cap.
func TestPeekGrowth(t *testing.T) {
	msg := handshake(helloBody(sniExt("big.example"), ext(0x15, make([]byte, 9000))))
	b := record(msg)
	server, client := tcpPair(t)
	write(t, client, b, func() int { return 1000 }, time.Millisecond)
	data, r, o, err := Peek(server, Options{Timeout: 10 * time.Second})
	if o != Found || err != nil || r.Host != "big.example" || !bytes.Equal(data, b) {
		t.Fatalf("got %v %v %+v, %d bytes", o, err, r, len(data))
	}
	if cap(data) > 2*len(b) {
		t.Errorf("buffer grew to %d bytes for a %d-byte hello", cap(data), len(b))
	}
}

// TestPeekPipe runs Peek over net.Pipe, which Conn allows.
func TestPeekPipe(t *testing.T) {
	fl := corpusFile(t, "chromium-http.bin")
	server, client := net.Pipe()
	defer server.Close()
	defer client.Close()
	write(t, client, fl.data, func() int { return 7 }, 0)
	data, r, o, err := Peek(server, Options{Timeout: 5 * time.Second})
	if o != Found || err != nil || r.Host != fl.want.Host || !bytes.Equal(data, fl.data) {
		t.Fatalf("got %v %v %+v", o, err, r)
	}
}

// checkDeadlineCleared checks that reading server after Peek blocks past
// the peek timeout: data the client sends later still arrives.
func checkDeadlineCleared(t *testing.T, server, client net.Conn) {
	t.Helper()
	go func() {
		time.Sleep(400 * time.Millisecond)
		client.Write([]byte("later"))
	}()
	buf := make([]byte, 5)
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "later" {
		t.Fatalf("read after Peek: %q %v", buf, err)
	}
}

// fakeConn scripts a Conn.
type fakeConn struct {
	read        func(p []byte) (int, error)
	deadlineErr error
	deadlines   []time.Time
}

func (c *fakeConn) Read(p []byte) (int, error) { return c.read(p) }
func (c *fakeConn) SetReadDeadline(t time.Time) error {
	c.deadlines = append(c.deadlines, t)
	return c.deadlineErr
}

func TestPeekNoProgress(t *testing.T) {
	c := &fakeConn{read: func([]byte) (int, error) { return 0, nil }}
	data, _, o, err := Peek(c, Options{})
	if o != Closed || err != io.ErrNoProgress || data != nil {
		t.Fatalf("got %v %v", o, err)
	}
	if len(c.deadlines) != 2 || c.deadlines[0].IsZero() || !c.deadlines[1].IsZero() {
		t.Errorf("deadlines %v", c.deadlines)
	}
}

func TestPeekDeadlineError(t *testing.T) {
	c := &fakeConn{read: func([]byte) (int, error) { panic("read") }, deadlineErr: net.ErrClosed}
	if _, _, o, err := Peek(c, Options{}); o != Closed || err != net.ErrClosed {
		t.Fatalf("got %v %v", o, err)
	}
}

// TestPeekDataWithError: bytes that come with an error still count.
func TestPeekDataWithError(t *testing.T) {
	fl := corpusFile(t, "curl-http.bin")
	c := &fakeConn{read: func(p []byte) (int, error) { return copy(p, fl.data), io.EOF }}
	data, r, o, err := Peek(c, Options{})
	if o != Found || err != nil || r.Host != fl.want.Host || !slices.Equal(data, fl.data) {
		t.Fatalf("got %v %v %+v", o, err, r)
	}
}
