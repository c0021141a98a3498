package proxyport

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Limits bound what ReadRequest and ReadResponse accept. The zero value
// means the defaults. The bufio.Reader handed in must be at least MaxLine
// bytes large: a line that does not fit in it is refused as too long.
type Limits struct {
	// MaxLine caps the request or status line. Zero means 8 KiB; a
	// longer request line gets 414.
	MaxLine int
	// MaxHead caps the whole head, lines and line ends included. Zero
	// means 64 KiB; a larger head gets 431.
	MaxHead int
	// MaxFields caps the number of header fields. Zero means 128 (431).
	MaxFields int
}

func (l Limits) maxLine() int {
	if l.MaxLine > 0 {
		return l.MaxLine
	}
	return 8 << 10
}

func (l Limits) maxHead() int {
	if l.MaxHead > 0 {
		return l.MaxHead
	}
	return 64 << 10
}

func (l Limits) maxFields() int {
	if l.MaxFields > 0 {
		return l.MaxFields
	}
	return 128
}

// Error is a request the proxy refuses: Status is the HTTP status to answer
// with before closing the connection (0: close without an answer, as when
// the head was cut short).
type Error struct {
	Status int
	Msg    string
	Err    error // the read error behind it, if any
}

func (e *Error) Error() string {
	s := e.Msg
	if e.Status != 0 {
		s = fmt.Sprintf("%d %s: %s", e.Status, StatusText(e.Status), e.Msg)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

func badRequest(format string, args ...any) *Error {
	return &Error{Status: 400, Msg: fmt.Sprintf(format, args...)}
}

// StatusText is the reason phrase detour sends with status.
func StatusText(status int) string {
	switch status {
	case 200:
		return "Connection established"
	case 400:
		return "Bad Request"
	case 403:
		return "Forbidden"
	case 405:
		return "Method Not Allowed"
	case 407:
		return "Proxy Authentication Required"
	case 414:
		return "URI Too Long"
	case 431:
		return "Request Header Fields Too Large"
	case 501:
		return "Not Implemented"
	case 502:
		return "Bad Gateway"
	case 504:
		return "Gateway Timeout"
	case 505:
		return "HTTP Version Not Supported"
	}
	return "Error"
}

// Field is one header field line as received: Name keeps its case, Value
// has the surrounding whitespace removed.
type Field struct{ Name, Value string }

// Request is a forward-proxy request head.
type Request struct {
	Method string
	Target string // the request-target as sent
	Minor  int    // HTTP/1.Minor: 0 or 1
	Fields []Field

	// Host and Port are the destination: the CONNECT authority or the
	// absolute-form URI's authority (port 80 when it names none). Host is
	// lower-cased, an IPv6 literal without brackets.
	Host string
	Port uint16
	// Path is the origin-form target sent on: the absolute URI's path and
	// query ("/" when empty). Empty for CONNECT.
	Path string

	// Body framing. Chunked: the body is chunked (Transfer-Encoding's last
	// coding); else ContentLength bytes follow (0 when none is given).
	Chunked       bool
	ContentLength int64
	// Close: the client wants the connection closed after this exchange
	// (Connection: close, or HTTP/1.0 without keep-alive).
	Close bool
	// ProxyAuth is the Proxy-Authorization value, "" if none.
	ProxyAuth string
	// Expect100 is set when the client sent Expect: 100-continue.
	Expect100 bool
}

// IsConnect reports whether r asks for a tunnel.
func (r *Request) IsConnect() bool { return r.Method == "CONNECT" }

// Authority is the destination as host:port, brackets around IPv6.
func (r *Request) Authority() string {
	return net.JoinHostPort(r.Host, strconv.Itoa(int(r.Port)))
}

// ReadRequest reads one request head from br. A client that closes the
// connection between requests gets io.EOF; any other failure is an *Error
// (with Status 0 when the head was cut short or the read failed). The body,
// if any, is left in br: copy it with CopyBody.
func ReadRequest(br *bufio.Reader, lim Limits) (*Request, error) {
	line, err := readLine(br, lim.maxLine())
	if err != nil {
		if err == io.EOF {
			return nil, io.EOF
		}
		if err == errLineTooLong {
			return nil, &Error{Status: 414, Msg: fmt.Sprintf("request line longer than %d bytes", lim.maxLine())}
		}
		return nil, &Error{Msg: "reading the request line", Err: err}
	}
	// RFC 9112 §2.2: a server SHOULD ignore at least one empty line before
	// the request line.
	if len(line) == 0 {
		if line, err = readLine(br, lim.maxLine()); err != nil {
			if err == errLineTooLong {
				return nil, &Error{Status: 414, Msg: fmt.Sprintf("request line longer than %d bytes", lim.maxLine())}
			}
			return nil, &Error{Msg: "reading the request line", Err: noEOF(err)}
		}
	}
	r := &Request{}
	if err := r.parseRequestLine(line); err != nil {
		return nil, err
	}
	used := len(line) + 2
	fields, err := readFields(br, lim, used)
	if err != nil {
		return nil, err
	}
	r.Fields = fields
	if err := r.parseFields(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Request) parseRequestLine(line []byte) error {
	method, rest, ok1 := bytes.Cut(line, []byte{' '})
	target, version, ok2 := bytes.Cut(rest, []byte{' '})
	if !ok1 || !ok2 || len(method) == 0 || len(target) == 0 || !isToken(method) {
		return badRequest("malformed request line %q", clip(line))
	}
	switch string(version) {
	case "HTTP/1.1":
		r.Minor = 1
	case "HTTP/1.0":
		r.Minor = 0
	default:
		if bytes.HasPrefix(version, []byte("HTTP/")) {
			return &Error{Status: 505, Msg: fmt.Sprintf("version %q (want HTTP/1.1 or HTTP/1.0)", clip(version))}
		}
		return badRequest("malformed request line %q", clip(line))
	}
	for _, c := range target {
		if c <= ' ' || c == 0x7f {
			return badRequest("request target contains a control character or space")
		}
	}
	r.Method, r.Target = string(method), string(target)
	if r.IsConnect() {
		// RFC 9110 §9.3.6: authority-form, the port is required.
		host, port, err := parseAuthority(r.Target, 0)
		if err != nil {
			return badRequest("CONNECT target %q: %v", clip(target), err)
		}
		r.Host, r.Port = host, port
		return nil
	}
	rest2, ok := cutPrefixFold(r.Target, "http://")
	if !ok {
		if strings.HasPrefix(r.Target, "/") || r.Target == "*" {
			return badRequest("origin-form target %q sent to a proxy (want absolute-form: http://host/path)", clip(target))
		}
		if _, ok := cutPrefixFold(r.Target, "https://"); ok {
			return badRequest("absolute-form https target %q (use CONNECT for https)", clip(target))
		}
		return badRequest("request target %q is not an http:// URI", clip(target))
	}
	end := strings.IndexAny(rest2, "/?#")
	auth, path := rest2, "/"
	if end >= 0 {
		auth, path = rest2[:end], rest2[end:]
		if i := strings.IndexByte(path, '#'); i >= 0 {
			path = path[:i]
		}
		if strings.HasPrefix(path, "?") {
			path = "/" + path
		}
		if path == "" {
			path = "/"
		}
	}
	if strings.IndexByte(auth, '@') >= 0 {
		return badRequest("request target %q carries user information", clip(target))
	}
	host, port, err := parseAuthority(auth, 80)
	if err != nil {
		return badRequest("request target %q: %v", clip(target), err)
	}
	r.Host, r.Port, r.Path = host, port, path
	return nil
}

// parseFields reads what the proxy needs from the fields: framing,
// connection options, credentials.
func (r *Request) parseFields() error {
	var te []string
	var cl string
	var clSeen, keepAlive, hosts = false, false, 0
	r.Close = r.Minor == 0
	for _, f := range r.Fields {
		switch {
		case strings.EqualFold(f.Name, "Host"):
			if hosts++; hosts > 1 {
				return badRequest("more than one Host field")
			}
		case strings.EqualFold(f.Name, "Transfer-Encoding"):
			te = append(te, f.Value)
		case strings.EqualFold(f.Name, "Content-Length"):
			if v, ok := addContentLength(&cl, &clSeen, f.Value); !ok {
				return badRequest("Content-Length values differ (%q, %q)", clip([]byte(cl)), clip([]byte(v)))
			}
		case strings.EqualFold(f.Name, "Connection"), strings.EqualFold(f.Name, "Proxy-Connection"):
			for _, o := range strings.Split(f.Value, ",") {
				o = strings.TrimSpace(o)
				switch {
				case strings.EqualFold(o, "close"):
					r.Close = true
				case strings.EqualFold(o, "keep-alive"):
					keepAlive = true
				}
			}
		case strings.EqualFold(f.Name, "Proxy-Authorization"):
			r.ProxyAuth = f.Value
		case strings.EqualFold(f.Name, "Expect"):
			r.Expect100 = strings.EqualFold(f.Value, "100-continue")
		}
	}
	if r.Minor == 0 && keepAlive {
		// An HTTP/1.0 client asking for keep-alive still gets a close:
		// detour frames HTTP/1.0 responses by closing (see WriteHead).
		r.Close = true
	}
	if len(te) > 0 {
		if r.Minor == 0 {
			return badRequest("Transfer-Encoding in an HTTP/1.0 request")
		}
		if clSeen {
			// RFC 9112 §6.1: both is a smuggling attempt or a broken client.
			return badRequest("both Transfer-Encoding and Content-Length")
		}
		if !endsChunked(te) {
			return badRequest("Transfer-Encoding %q does not end in chunked", clip([]byte(strings.Join(te, ", "))))
		}
		r.Chunked = true
		return nil
	}
	if clSeen {
		n, err := parseContentLength(cl)
		if err != nil {
			return badRequest("Content-Length %q: %v", clip([]byte(cl)), err)
		}
		r.ContentLength = n
	}
	if r.IsConnect() && (r.Chunked || r.ContentLength > 0) {
		return badRequest("CONNECT with a body")
	}
	return nil
}

// addContentLength folds the value of a Content-Length field into cl, the
// value so far (seen: there was one). RFC 9110 §8.6: a list of identical
// values is one value. A value that differs from cl is returned, not ok.
func addContentLength(cl *string, seen *bool, value string) (string, bool) {
	for _, v := range strings.Split(value, ",") {
		v = strings.TrimSpace(v)
		if *seen && v != *cl {
			return v, false
		}
		*cl, *seen = v, true
	}
	return "", true
}

// endsChunked reports whether the last transfer coding of te (the values
// of every Transfer-Encoding field, in order) is chunked.
func endsChunked(te []string) bool {
	codings := strings.Split(strings.Join(te, ","), ",")
	return strings.EqualFold(strings.TrimSpace(codings[len(codings)-1]), "chunked")
}

// hopByHop are the fields a proxy never forwards (RFC 9110 §7.6.1), besides
// those Connection names. Transfer-Encoding is not here: detour forwards a
// chunked body as it came and keeps its field; Host is written from the
// request target.
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "TE", "Upgrade",
	"Proxy-Authorization", "Proxy-Authenticate", "Host"}

// framing are fields a Connection option never removes: the proxy's own
// framing and routing depend on them, and a client that names them would
// desynchronise the next hop (request smuggling).
var framing = []string{"Content-Length", "Transfer-Encoding", "Host"}

// dropped reports whether a field called name is not forwarded, given the
// options named in the Connection fields.
func dropped(name string, nominated []string) bool {
	for _, h := range hopByHop {
		if strings.EqualFold(name, h) {
			return true
		}
	}
	for _, n := range nominated {
		if strings.EqualFold(name, n) {
			for _, f := range framing {
				if strings.EqualFold(name, f) {
					return false
				}
			}
			return true
		}
	}
	return false
}

// connectionOptions lists the field names every Connection line names.
func connectionOptions(fields []Field) []string {
	var out []string
	for _, f := range fields {
		if !strings.EqualFold(f.Name, "Connection") {
			continue
		}
		for _, o := range strings.Split(f.Value, ",") {
			if o = strings.TrimSpace(o); o != "" {
				out = append(out, o)
			}
		}
	}
	return out
}

// AppendHead appends the request head detour sends to the destination:
// origin-form request line, Host from the request target first (RFC 9112
// §3.2.2), then the client's fields in their order without the hop-by-hop
// ones (RFC 9110 §7.6.1: those named by Connection, then Connection,
// Proxy-Connection, Keep-Alive, TE, Upgrade, Proxy-Authorization). An
// HTTP/1.0 request goes on as HTTP/1.0 with Connection: close, so the
// response comes without chunking. Not for CONNECT.
func (r *Request) AppendHead(b []byte) []byte {
	b = append(b, r.Method...)
	b = append(b, ' ')
	b = append(b, r.Path...)
	if r.Minor == 0 {
		b = append(b, " HTTP/1.0\r\n"...)
	} else {
		b = append(b, " HTTP/1.1\r\n"...)
	}
	b = append(b, "Host: "...)
	b = append(b, r.Host...)
	if strings.IndexByte(r.Host, ':') >= 0 {
		b = append(append(append(b[:len(b)-len(r.Host)], '['), r.Host...), ']')
	}
	if r.Port != 80 {
		b = append(b, ':')
		b = strconv.AppendUint(b, uint64(r.Port), 10)
	}
	b = append(b, "\r\n"...)
	b = appendFields(b, r.Fields)
	if r.Minor == 0 {
		b = append(b, "Connection: close\r\n"...)
	}
	return append(b, "\r\n"...)
}

func appendFields(b []byte, fields []Field) []byte {
	nominated := connectionOptions(fields)
	for _, f := range fields {
		if dropped(f.Name, nominated) {
			continue
		}
		b = append(b, f.Name...)
		b = append(b, ": "...)
		b = append(b, f.Value...)
		b = append(b, "\r\n"...)
	}
	return b
}

// Response is a response head from the destination.
type Response struct {
	Minor  int
	Status int
	Reason string
	Fields []Field

	// Body framing: NoBody (HEAD, 1xx, 204, 304), else Chunked, else
	// ContentLength >= 0 bytes, else (ContentLength -1) until the server
	// closes.
	NoBody        bool
	Chunked       bool
	ContentLength int64
	// Close: the server closes after this response.
	Close bool
}

// ReadResponse reads one response head from br, for a request whose method
// was method (a response to HEAD has no body).
func ReadResponse(br *bufio.Reader, lim Limits, method string) (*Response, error) {
	line, err := readLine(br, lim.maxLine())
	if err != nil {
		if err == errLineTooLong {
			return nil, fmt.Errorf("status line longer than %d bytes", lim.maxLine())
		}
		return nil, fmt.Errorf("reading the status line: %w", noEOF(err))
	}
	resp := &Response{ContentLength: -1}
	version, rest, ok := bytes.Cut(line, []byte{' '})
	code, reason, _ := bytes.Cut(rest, []byte{' '})
	switch {
	case !ok:
		return nil, fmt.Errorf("malformed status line %q", clip(line))
	case string(version) == "HTTP/1.1":
		resp.Minor = 1
	case string(version) == "HTTP/1.0":
		resp.Close = true
	default:
		return nil, fmt.Errorf("status line %q: not HTTP/1.x", clip(line))
	}
	if len(code) != 3 || code[0] < '1' || code[0] > '5' || code[1] < '0' || code[1] > '9' || code[2] < '0' || code[2] > '9' {
		return nil, fmt.Errorf("status line %q: bad status code", clip(line))
	}
	resp.Status = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	resp.Reason = string(reason)
	if resp.Fields, err = readFields(br, lim, len(line)+2); err != nil {
		var pe *Error
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("response head: %s", pe.Msg)
		}
		return nil, err
	}
	var te []string
	cl, clSeen := "", false
	for _, f := range resp.Fields {
		switch {
		case strings.EqualFold(f.Name, "Transfer-Encoding"):
			te = append(te, f.Value)
		case strings.EqualFold(f.Name, "Content-Length"):
			if _, ok := addContentLength(&cl, &clSeen, f.Value); !ok {
				return nil, fmt.Errorf("response Content-Length values differ")
			}
		case strings.EqualFold(f.Name, "Connection"):
			for _, o := range strings.Split(f.Value, ",") {
				o = strings.TrimSpace(o)
				if strings.EqualFold(o, "close") {
					resp.Close = true
				} else if strings.EqualFold(o, "keep-alive") && resp.Minor == 0 {
					resp.Close = false
				}
			}
		}
	}
	switch {
	case method == "HEAD" || resp.Status < 200 || resp.Status == 204 || resp.Status == 304:
		resp.NoBody = true
	case len(te) > 0:
		if endsChunked(te) {
			resp.Chunked = true
		} else {
			resp.Close = true // RFC 9112 §6.3: read until close
		}
	case clSeen:
		n, err := parseContentLength(cl)
		if err != nil {
			return nil, fmt.Errorf("response Content-Length %q: %v", clip([]byte(cl)), err)
		}
		resp.ContentLength = n
	default:
		resp.Close = true
	}
	if resp.Minor == 0 && resp.Chunked {
		return nil, errors.New("chunked HTTP/1.0 response")
	}
	return resp, nil
}

// AppendHead appends the response head detour sends to the client: the
// server's status and fields without the hop-by-hop ones, and Connection:
// close when the client connection ends after it (close is true, or the
// body ends with the server's close).
func (resp *Response) AppendHead(b []byte, minor int, close bool) []byte {
	b = append(b, "HTTP/1."...)
	b = strconv.AppendInt(b, int64(minor), 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, int64(resp.Status), 10)
	b = append(b, ' ')
	b = append(b, resp.Reason...)
	b = append(b, "\r\n"...)
	b = appendFields(b, resp.Fields)
	if close {
		b = append(b, "Connection: close\r\n"...)
	} else if minor == 0 {
		b = append(b, "Connection: keep-alive\r\n"...)
	}
	return append(b, "\r\n"...)
}

// AppendError appends a complete response with status and a one-line
// text body, which closes the connection. extra are more fields (such as
// Proxy-Authenticate), each "Name: value".
func AppendError(b []byte, status int, msg string, extra ...string) []byte {
	body := fmt.Sprintf("detour: %d %s: %s\n", status, StatusText(status), msg)
	b = fmt.Appendf(b, "HTTP/1.1 %d %s\r\n", status, StatusText(status))
	for _, e := range extra {
		b = append(append(b, e...), "\r\n"...)
	}
	b = fmt.Appendf(b, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
	return b
}

var errLineTooLong = errors.New("line too long")

// readLine reads one line ending in LF (a CR before it is dropped) of at
// most max bytes without its end. A line that does not fit is
// errLineTooLong and is never buffered beyond br's size. EOF before any byte
// is io.EOF; within a line, io.ErrUnexpectedEOF.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull {
			return nil, errLineTooLong
		}
		if err == io.EOF && len(line) > 0 {
			if len(line) > max {
				return nil, errLineTooLong
			}
			return nil, io.ErrUnexpectedEOF
		}
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	if len(line) > max {
		return nil, errLineTooLong
	}
	if bytes.IndexByte(line, '\r') >= 0 {
		return nil, errBareCR
	}
	return line, nil
}

var errBareCR = errors.New("bare CR in a line")

// readFields reads header field lines up to the empty line. used is what the
// head used so far, for MaxHead.
func readFields(br *bufio.Reader, lim Limits, used int) ([]Field, error) {
	var fields []Field
	for {
		line, err := readLine(br, lim.maxHead())
		switch {
		case err == errLineTooLong:
			return nil, &Error{Status: 431, Msg: fmt.Sprintf("header field line longer than %d bytes", br.Size())}
		case err == errBareCR:
			return nil, badRequest("bare CR in a header field line")
		case err != nil:
			return nil, &Error{Msg: "reading the header fields", Err: noEOF(err)}
		}
		if used += len(line) + 2; used > lim.maxHead() {
			return nil, &Error{Status: 431, Msg: fmt.Sprintf("head larger than %d bytes", lim.maxHead())}
		}
		if len(line) == 0 {
			return fields, nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			// RFC 9112 §5.2: obsolete line folding may be rejected.
			return nil, badRequest("obsolete line folding in the header fields")
		}
		name, value, ok := bytes.Cut(line, []byte{':'})
		if !ok || len(name) == 0 || !isToken(name) {
			return nil, badRequest("malformed header field line %q", clip(line))
		}
		for _, c := range value {
			if (c < ' ' && c != '\t') || c == 0x7f {
				return nil, badRequest("header field %q: control character in the value", clip(name))
			}
		}
		if len(fields) >= lim.maxFields() {
			return nil, &Error{Status: 431, Msg: fmt.Sprintf("more than %d header fields", lim.maxFields())}
		}
		fields = append(fields, Field{Name: string(name), Value: string(bytes.Trim(value, " \t"))})
	}
}

// parseAuthority parses host:port (the port may be left out when def is not
// 0). The host is a DNS name, an IPv4 literal or a bracketed IPv6 literal.
func parseAuthority(a string, def uint16) (string, uint16, error) {
	host, portStr := a, ""
	if strings.HasPrefix(a, "[") {
		end := strings.IndexByte(a, ']')
		if end < 0 {
			return "", 0, errors.New("unclosed '['")
		}
		host = a[1:end]
		rest := a[end+1:]
		if rest != "" {
			p, ok := strings.CutPrefix(rest, ":")
			if !ok {
				return "", 0, errors.New("junk after ']'")
			}
			portStr = p
		}
		ip, err := netip.ParseAddr(host)
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return "", 0, fmt.Errorf("%q is not an IPv6 address", host)
		}
		host = ip.String()
	} else {
		if i := strings.LastIndexByte(a, ':'); i >= 0 {
			host, portStr = a[:i], a[i+1:]
		}
		if !validHost(host) {
			return "", 0, fmt.Errorf("invalid host %q", host)
		}
		host = strings.ToLower(strings.TrimSuffix(host, "."))
	}
	if portStr == "" {
		if def == 0 {
			return "", 0, errors.New("missing port")
		}
		return host, def, nil
	}
	if len(portStr) > 5 {
		return "", 0, fmt.Errorf("invalid port %q", portStr)
	}
	p, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || p == 0 {
		return "", 0, fmt.Errorf("invalid port %q", portStr)
	}
	return host, uint16(p), nil
}

// validHost accepts DNS names (letters, digits, '-', '_', dots; labels of
// 1..63, 253 in all) and IPv4 literals.
func validHost(h string) bool {
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
			if label++; label > 63 {
				return false
			}
		default:
			return false
		}
	}
	return label > 0
}

func parseContentLength(s string) (int64, error) {
	if s == "" || len(s) > 18 {
		return 0, errors.New("not a length")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("not a length")
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, errors.New("not a length")
	}
	return n, nil
}

func isToken(b []byte) bool {
	for _, c := range b {
		if !tchar(c) {
			return false
		}
	}
	return len(b) > 0
}

// tchar: RFC 9110 §5.6.2.
func tchar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// clip shortens b for an error message: input is untrusted and may be long.
func clip(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "…"
	}
	return string(b)
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
