//go:build !linux

package relay

import (
	"io"
	"time"
)

// sys is an Engine's part elsewhere than on Linux: nothing.
type sys struct{}

// dirSys is what a direction keeps elsewhere than on Linux: nothing.
type dirSys struct{}

// New returns an Engine.
func New() *Engine { return &Engine{} }

func (e *Engine) startPoller() {}

// Close does nothing: there is no poller.
func (e *Engine) Close() error { return nil }

// chunk bounds one io.Copy call, so progress is recorded between calls.
const chunk = 256 << 10

// pump copies d.src to d.dst until EOF or an error, holding its goroutine
// throughout; the relay's idle timer ends it when nothing moves. It does not
// report first bytes (relay.onFirst): a copy here returns after its bytes
// were written on, too late to tell who spoke first, so nothing is learned.
func (d *direction) pump() {
	lr := io.LimitedReader{R: d.src}
	for {
		lr.N = chunk
		n, err := d.dst.ReadFrom(&lr)
		d.n += n
		if n > 0 {
			d.r.last.Store(time.Now().UnixNano())
		}
		switch {
		case err != nil:
			d.end(err)
			return
		case lr.N > 0:
			d.end(nil) // EOF
			return
		}
	}
}

func (d *direction) release() {}
