package proxyport

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// addFlights seeds f with the first flights real clients sent to a proxy
// port (testdata/flights, made by scripts/capture-proxy-flights.sh) whose
// name starts with prefix.
func addFlights(f *testing.F, prefix string) {
	files, _ := filepath.Glob(filepath.Join("testdata", "flights", prefix+"*"))
	if len(files) == 0 {
		f.Fatalf("no testdata/flights/%s* seeds; run scripts/capture-proxy-flights.sh", prefix)
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzRequest: ReadRequest never panics or reads past its limits; a head it
// accepts is rewritten into one it accepts again, for the same destination,
// with no hop-by-hop field left; bodies copy without panicking.
func FuzzRequest(f *testing.F) {
	addFlights(f, "http-")
	f.Add([]byte("POST http://a.test/ HTTP/1.1\r\nConnection: x\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(data), 16<<10)
		for range 4 { // pipelined requests
			r, err := ReadRequest(br, Limits{MaxLine: 8 << 10, MaxHead: 32 << 10})
			if err != nil {
				var pe *Error
				if err != io.EOF && !errors.As(err, &pe) {
					t.Fatalf("error of type %T: %v", err, err)
				}
				return
			}
			if r.IsConnect() {
				return
			}
			head := r.AppendHead(nil)
			// The head sent on, turned back into absolute-form, must parse
			// to the same destination and framing.
			line, rest, _ := bytes.Cut(head, []byte("\r\n"))
			method, target, _ := bytes.Cut(line, []byte(" "))
			target, version, _ := bytes.Cut(target, []byte(" "))
			again := string(method) + " http://" + r.Authority() + string(target) + " " + string(version) + "\r\n" + string(rest)
			r2, err := ReadRequest(bufio.NewReaderSize(strings.NewReader(again), 16<<10), Limits{MaxHead: 1 << 20, MaxLine: 16 << 10})
			if err != nil {
				t.Fatalf("rewritten head %q: %v", again, err)
			}
			if r2.Host != r.Host || r2.Port != r.Port || r2.Path != r.Path || r2.Chunked != r.Chunked || r2.ContentLength != r.ContentLength {
				t.Fatalf("rewritten head %q parses as %+v, first as %+v", again, r2, r)
			}
			for _, f := range bytes.Split(head, []byte("\r\n"))[1:] {
				name, _, _ := bytes.Cut(f, []byte(":"))
				for _, h := range []string{"Connection", "Proxy-Connection", "Keep-Alive", "TE", "Upgrade", "Proxy-Authorization"} {
					if strings.EqualFold(string(name), h) && !(r.Minor == 0 && string(f) == "Connection: close") {
						t.Fatalf("hop-by-hop field %q sent on in %q", f, head)
					}
				}
			}
			if _, err := CopyBody(io.Discard, br, r.Chunked, r.ContentLength); err != nil {
				return
			}
		}
	})
}

// FuzzSOCKS: the server side of the SOCKS handshake, with and without
// credentials and UDP ASSOCIATE, never panics, accepts only CONNECT with a
// destination (or UDP ASSOCIATE when asked to), and writes at most the
// replies the protocol has.
func FuzzSOCKS(f *testing.F) {
	addFlights(f, "socks")
	f.Add([]byte("\x05\x01\x02\x01\x05alice\x06secret\x05\x01\x00\x03\x01a\x00\x50"))
	f.Add([]byte("\x04\x01\x00\x50\x00\x00\x00\x01\x00a.test\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for i, users := range []Users{nil, {"alice": "secret"}, nil} {
			udp := i == 2
			var out bytes.Buffer
			req, err := ReadSOCKS(bufio.NewReaderSize(bytes.NewReader(data), 4096), &out, users, udp)
			if out.Len() > 2+2+22 {
				t.Fatalf("wrote %d bytes", out.Len())
			}
			if err != nil {
				continue
			}
			if req.Cmd == CmdUDPAssociate && udp && req.Version == 5 {
				continue
			}
			if req.Cmd != CmdConnect || req.Port == 0 || (req.Host == "") == !req.Addr.IsValid() {
				t.Fatalf("accepted %+v", req)
			}
			if len(users) > 0 && (req.Version != 5 || !users.Check(req.User, "secret")) {
				t.Fatalf("accepted without credentials: %+v", req)
			}
		}
	})
}
