package sniff

import (
	"errors"
	"io"
	"net"
	"os"
	"time"
)

// Defaults for Options.
const (
	DefaultTimeout  = 300 * time.Millisecond
	DefaultMaxBytes = 64 << 10

	initialBuffer = 4 << 10 // a Chromium ClientHello is ~1.8 KiB, a request head less
	maxEmptyReads = 100     // Reads returning 0, nil in a row before giving up
)

// Conn is what Peek needs of a connection. *net.TCPConn has it, and so do
// both ends of a net.Pipe.
type Conn interface {
	Read(p []byte) (int, error)
	SetReadDeadline(t time.Time) error
}

// Options tune Peek. The zero value uses the defaults.
type Options struct {
	// Timeout bounds the whole peek, from the call until the parsers answer.
	// Zero or negative means DefaultTimeout.
	Timeout time.Duration
	// MaxBytes caps how many bytes Peek reads. Zero or negative means
	// DefaultMaxBytes.
	MaxBytes int
}

// Outcome says how a Peek ended, for logs and metrics.
type Outcome uint8

// The outcomes of Peek.
const (
	// None: the parsers answered without a host name. Result.Proto says
	// which protocol was recognised, if any.
	None Outcome = iota
	// Found: Result.Host holds the host name.
	Found
	// Timeout: the deadline passed first. The client may be waiting for the
	// server to speak (no data) or have stalled mid-message.
	Timeout
	// TooLarge: the byte cap was reached, or a TLS header announced a
	// message that cannot fit under it.
	TooLarge
	// Closed: the client closed or reset the connection, or reading failed,
	// before the parsers could answer.
	Closed
)

// String returns "none", "found", "timeout", "too-large" or "closed".
func (o Outcome) String() string {
	switch o {
	case None:
		return "none"
	case Found:
		return "found"
	case Timeout:
		return "timeout"
	case TooLarge:
		return "too-large"
	case Closed:
		return "closed"
	}
	return "unknown"
}

// Peek reads the first bytes the client sends on c until parse can answer,
// the deadline passes, the byte cap is reached, or reading fails. It returns
// every byte it read, whatever the outcome (nil if none), so the caller can
// send them on before relaying the rest: Peek consumes nothing for good.
//
// Peek sets one read deadline for the whole peek and clears it (sets the zero
// time) before returning. The buffer starts at 4 KiB and grows only as far as
// a TLS record or handshake header asks, or doubles for an HTTP head, up to
// the cap. err is the read error behind a Timeout or Closed outcome and nil
// otherwise; if the deadline cannot be set or cleared the connection is
// unusable and Peek reports Closed with that error.
func Peek(c Conn, opt Options) (data []byte, r Result, o Outcome, err error) {
	timeout, limit := opt.Timeout, opt.MaxBytes
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if limit <= 0 {
		limit = DefaultMaxBytes
	}
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, Result{}, Closed, err
	}
	data, r, o, err = peek(c, limit)
	if cerr := c.SetReadDeadline(time.Time{}); cerr != nil {
		o, err = Closed, cerr
	}
	if len(data) == 0 {
		data = nil
	}
	return data, r, o, err
}

// peek is Peek's read loop, the deadline already set.
func peek(c Conn, limit int) ([]byte, Result, Outcome, error) {
	buf := make([]byte, 0, min(initialBuffer, limit))
	empty := 0
	for {
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if n > 0 {
			empty = 0
			r, o, done, need := Judge(buf, limit)
			if done {
				return buf, r, o, nil
			}
			if need > cap(buf) {
				grown := make([]byte, len(buf), need)
				copy(grown, buf)
				buf = grown
			}
		}
		switch {
		case err != nil && isTimeout(err):
			return buf, Result{}, Timeout, err
		case err != nil:
			return buf, Result{}, Closed, err
		case n == 0:
			if empty++; empty >= maxEmptyReads {
				return buf, Result{}, Closed, io.ErrNoProgress
			}
		}
	}
}

// Judge is Peek's verdict on the first bytes b read so far under the byte
// cap limit, for a caller that reads them itself (detour's event loop):
// done, with the Result and the Outcome (Found, None or TooLarge), or not
// yet, with the capacity a buffer should have before reading more (more than
// len(b), at most limit). It does not retain b.
func Judge(b []byte, limit int) (r Result, o Outcome, done bool, grow int) {
	r, st, need := parse(b)
	switch {
	case st == Match && r.Host != "":
		return r, Found, true, 0
	case st == Match:
		return r, None, true, 0
	case st == NoMatch:
		return Result{}, None, true, 0
	case need > limit || len(b) >= limit:
		return Result{}, TooLarge, true, 0
	case need > cap(b) || len(b) == cap(b):
		return Result{}, None, false, min(limit, max(need, 2*cap(b)))
	}
	return Result{}, None, false, cap(b)
}

// isTimeout reports whether err is a read deadline passing.
func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
