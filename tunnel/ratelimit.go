package tunnel

import (
	"net/netip"
	"sync"
	"time"
)

// warnLimiter lets through at most burst warnings of one kind per second,
// so that a flood of bad connections cannot flood the log; the metrics count
// every one. The first warning let through after some were held back says
// how many. Warnings about a client's connection (allowFrom) are also
// limited per source, to a quarter of the burst, so that one client's flood
// cannot use up the lines that would tell of the others. The zero value is
// ready to use.
type warnLimiter struct {
	mu         sync.Mutex
	second     int64 // the Unix second being counted
	n          int   // warnings let through in it
	bySource   map[netip.Prefix]int
	suppressed int // warnings held back since the last one let through
}

const (
	warnBurst          = 20
	warnBurstPerSource = warnBurst / 4
)

// allow reports whether to log this warning, and how many were held back
// before it (to be logged with it).
func (l *warnLimiter) allow(now time.Time) (ok bool, suppressed int) {
	return l.allowFrom(now, netip.Prefix{}, false)
}

// allowFrom is allow for a warning about a connection from src (a
// sniff.SourceKey); perSource false counts it only in the total.
func (l *warnLimiter) allowFrom(now time.Time, src netip.Prefix, perSource bool) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := now.Unix(); s != l.second {
		l.second, l.n = s, 0
		clear(l.bySource)
	}
	if l.n >= warnBurst || (perSource && l.bySource[src] >= warnBurstPerSource) {
		l.suppressed++
		return false, 0
	}
	l.n++
	if perSource {
		if l.bySource == nil {
			l.bySource = make(map[netip.Prefix]int) // at most warnBurst sources a second
		}
		l.bySource[src]++
	}
	suppressed, l.suppressed = l.suppressed, 0
	return true, suppressed
}
