//go:build !linux

package tunnel

import (
	"errors"
	"io"
	"net"
	"os"
	"time"
)

// chunk bounds one io.Copy call of a direction, so the deadlines are
// re-armed between calls.
const chunk = 256 << 10

// copy moves src to dst in chunks until EOF or an error, re-arming the
// deadlines between chunks: the read deadline is half the idle timeout (a
// read that times out has lost nothing, so the copy goes on if anything
// moved either way), the write deadline the whole of it.
func (r *relay) copy(dst, src *net.TCPConn, idle time.Duration) (int64, error) {
	var total int64
	lr := io.LimitedReader{R: src}
	for {
		start := time.Now()
		if err := src.SetReadDeadline(start.Add(idle / 2)); err != nil {
			return total, err
		}
		if err := dst.SetWriteDeadline(start.Add(idle)); err != nil {
			return total, err
		}
		lr.N = chunk
		n, err := dst.ReadFrom(&lr)
		total += n
		now := time.Now()
		if n > 0 {
			r.last.Store(now.UnixNano())
		}
		switch {
		case err == nil && lr.N > 0:
			return total, nil // EOF
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded) && n == 0 && now.Sub(start) < idle:
			if now.UnixNano()-r.last.Load() >= int64(idle) {
				return total, errIdle
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			return total, errIdle
		default:
			return total, err
		}
	}
}
