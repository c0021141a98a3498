package tunnel

import (
	"sync"
	"time"
)

// workerIdle is how long a goroutine that set up one connection waits for
// the next before it ends.
const workerIdle = time.Second

// workers run the connections' setup (serveConn: original destination,
// sniff, route, connect, up to the relay's start) on goroutines that are
// reused: one that has set up a connection takes the next one that comes
// within workerIdle. A busy gateway then neither starts a goroutine per
// connection nor grows a fresh one's stack through the dial and the access
// line again. The zero value is ready to use.
type workers struct {
	jobs     chan func() // unbuffered: a send succeeds only if a worker waits
	stopping chan struct{}
	once     sync.Once
}

func (w *workers) init() {
	w.once.Do(func() {
		w.jobs = make(chan func())
		w.stopping = make(chan struct{})
	})
}

// run runs f on a waiting worker, or on a new one.
func (w *workers) run(f func()) {
	w.init()
	select {
	case w.jobs <- f:
	default:
		go w.loop(f)
	}
}

func (w *workers) loop(f func()) {
	idle := time.NewTimer(workerIdle)
	defer idle.Stop()
	for {
		f()
		idle.Reset(workerIdle)
		select {
		case f = <-w.jobs:
		case <-idle.C:
			return
		case <-w.stopping:
			return
		}
	}
}

// stop ends the waiting workers at once; run still works afterwards (a new
// worker ends when its job does).
func (w *workers) stop() {
	w.init()
	select {
	case <-w.stopping:
	default:
		close(w.stopping)
	}
}
