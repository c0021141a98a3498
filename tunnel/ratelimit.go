package tunnel

import (
	"sync"
	"time"
)

// warnLimiter lets through at most burst warnings of one kind per second,
// so that a flood of bad connections cannot flood the log; the metrics count
// every one. The first warning let through after some were held back says
// how many. The zero value is ready to use.
type warnLimiter struct {
	mu         sync.Mutex
	second     int64 // the Unix second being counted
	n          int   // warnings let through in it
	suppressed int   // warnings held back since the last one let through
}

const warnBurst = 20

// allow reports whether to log this warning, and how many were held back
// before it (to be logged with it).
func (l *warnLimiter) allow(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := now.Unix(); s != l.second {
		l.second, l.n = s, 0
	}
	if l.n >= warnBurst {
		l.suppressed++
		return false, 0
	}
	l.n++
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
