//go:build !linux

package tunnel

import (
	"io"
	"time"
)

// sys is what a direction keeps elsewhere than on Linux: nothing.
type sys struct{}

// chunk bounds one io.Copy call, so progress is recorded between calls.
const chunk = 256 << 10

// pump copies d.src to d.dst until EOF or an error, holding its goroutine
// throughout; the relay's idle timer ends it when nothing moves.
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

func startIdlePoller() {}
