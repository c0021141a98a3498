package evloop

import (
	"bytes"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newLoop starts a loop closed when the test ends, after a check that the
// loop's goroutine is gone once it is closed.
func newLoop(t *testing.T) *Loop {
	t.Helper()
	before := runtime.NumGoroutine()
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.Close()
		waitGoroutines(t, before)
	})
	return l
}

// waitGoroutines waits (at most 2 s) until at most n goroutines run.
func waitGoroutines(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := runtime.NumGoroutine(); got > n {
		buf := make([]byte, 1<<16)
		t.Errorf("%d goroutines, want at most %d:\n%s", got, n, buf[:runtime.Stack(buf, true)])
	}
}

// on runs f on l's goroutine and waits for it.
func on(t *testing.T, l *Loop, f func()) {
	t.Helper()
	done := make(chan struct{})
	if err := l.Post(func() { f(); close(done) }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a posted function did not run within 5s")
	}
}

// goid is the calling goroutine's number, from its stack's first line.
func goid() uint64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	n, _ := strconv.ParseUint(string(b[:bytes.IndexByte(b, ' ')]), 10, 64)
	return n
}

// handlerFunc is a Handler.
type handlerFunc func(ev uint32)

func (f handlerFunc) Ready(ev uint32) { f(ev) }

// eventFD is a non-blocking eventfd closed when the test ends; poke makes
// it readable.
func eventFD(t *testing.T) int {
	t.Helper()
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func poke(t *testing.T, fd int) {
	t.Helper()
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	if _, err := unix.Write(fd, one); err != nil {
		t.Fatal(err)
	}
}

// Timers run once each, in the order of their times, never before their
// time, on the loop's goroutine, whether armed from a posted function or
// from a handler; Stop keeps one from running, Reset moves one (earlier or
// later), and a timer that ran can be Reset to run again.
func TestTimers(t *testing.T) {
	l := newLoop(t)
	var loopID uint64
	on(t, l, func() { loopID = goid() })

	type fired struct {
		name string
		at   time.Time
		g    uint64
	}
	ch := make(chan fired, 16)
	fire := func(name string) func() {
		return func() { ch <- fired{name, time.Now(), goid()} }
	}
	var armed time.Time
	var stopped, moved, later, again *Timer
	on(t, l, func() {
		armed = l.Now()
		l.AfterFunc(60*time.Millisecond, fire("60ms"))
		l.AfterFunc(20*time.Millisecond, fire("20ms"))
		l.AfterFunc(40*time.Millisecond, fire("40ms"))
		stopped = l.AfterFunc(30*time.Millisecond, fire("stopped"))
		l.Stop(stopped)
		moved = l.AfterFunc(10*time.Second, fire("moved"))
		l.Reset(moved, 80*time.Millisecond)
		later = l.AfterFunc(10*time.Millisecond, fire("later"))
		l.Reset(later, 100*time.Millisecond)
		again = l.AfterFunc(0, fire("again"))
	})
	want := []struct {
		name string
		d    time.Duration
	}{{"again", 0}, {"20ms", 20 * time.Millisecond}, {"40ms", 40 * time.Millisecond},
		{"60ms", 60 * time.Millisecond}, {"moved", 80 * time.Millisecond}, {"later", 100 * time.Millisecond}}
	for _, w := range want {
		select {
		case f := <-ch:
			if f.name != w.name {
				t.Fatalf("timer %q ran, want %q", f.name, w.name)
			}
			if early := f.at.Sub(armed); early < w.d {
				t.Errorf("timer %q ran %v after it was armed, before its %v", f.name, early, w.d)
			}
			if f.g != loopID {
				t.Errorf("timer %q ran on goroutine %d, not the loop's (%d)", f.name, f.g, loopID)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("timer %q did not run within 5s", w.name)
		}
	}
	// A timer that ran can be armed again; Stop on it is harmless.
	on(t, l, func() {
		l.Stop(again)
		l.Reset(again, 10*time.Millisecond)
	})
	if f := <-ch; f.name != "again" {
		t.Fatalf("timer %q ran, want the re-armed one", f.name)
	}
	// Nothing runs twice, and the stopped timer never runs.
	select {
	case f := <-ch:
		t.Fatalf("timer %q ran again", f.name)
	case <-time.After(150 * time.Millisecond):
	}

	// From a handler: an eventfd's event arms a timer.
	fd := eventFD(t)
	var handlerAt time.Time
	on(t, l, func() {
		_, err := l.Add(fd, handlerFunc(func(ev uint32) {
			if ev&unix.EPOLLIN == 0 {
				return
			}
			var b [8]byte
			unix.Read(fd, b[:])
			handlerAt = l.Now()
			l.AfterFunc(30*time.Millisecond, fire("from handler"))
		}))
		if err != nil {
			t.Error(err)
		}
	})
	poke(t, fd)
	select {
	case f := <-ch:
		var at time.Time
		on(t, l, func() { at = handlerAt })
		if f.name != "from handler" || f.at.Sub(at) < 30*time.Millisecond || f.g != loopID {
			t.Errorf("timer %q ran %v after the handler armed it, on goroutine %d (loop %d)", f.name, f.at.Sub(at), f.g, loopID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the timer armed by a handler did not run within 5s")
	}
}

// A timer that is due while events keep coming still runs: the loop's
// events do not starve its timers.
func TestTimerRunsAmidEvents(t *testing.T) {
	l := newLoop(t)
	fd := eventFD(t)
	stop := make(chan struct{})
	var events int
	on(t, l, func() {
		l.Add(fd, handlerFunc(func(uint32) {
			var b [8]byte
			unix.Read(fd, b[:])
			events++
		}))
	})
	fired := make(chan struct{})
	on(t, l, func() { l.AfterFunc(50*time.Millisecond, func() { close(fired) }) })
	var wg sync.WaitGroup
	wg.Go(func() {
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
		for {
			select {
			case <-stop:
				return
			default:
			}
			unix.Write(fd, one)
			time.Sleep(100 * time.Microsecond)
		}
	})
	defer wg.Wait()
	defer close(stop)
	select {
	case <-fired:
	case <-time.After(5 * time.Second):
		t.Fatal("the timer did not run within 5s while events came")
	}
}

// Functions posted from many goroutines at once all run, each once, in
// each poster's order, on the loop's goroutine.
func TestPostFromManyGoroutines(t *testing.T) {
	l := newLoop(t)
	var loopID uint64
	on(t, l, func() { loopID = goid() })
	const posters, each = 8, 500
	ran := make([][]int, posters) // the loop's own: no lock
	elsewhere := 0
	var wg sync.WaitGroup
	for p := range posters {
		wg.Go(func() {
			for i := range each {
				if err := l.Post(func() {
					if goid() != loopID {
						elsewhere++
					}
					ran[p] = append(ran[p], i)
				}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	on(t, l, func() {}) // after every function posted before
	on(t, l, func() {
		if elsewhere != 0 {
			t.Errorf("%d posted functions ran off the loop's goroutine", elsewhere)
		}
		for p, r := range ran {
			if len(r) != each {
				t.Errorf("poster %d: %d functions ran, want %d", p, len(r), each)
				continue
			}
			for i, v := range r {
				if v != i {
					t.Errorf("poster %d: function %d ran in place %d", p, v, i)
					break
				}
			}
		}
	})
}

// Later runs a handler with no events after every event of the round that
// asked for it.
func TestLaterRunsAfterTheRound(t *testing.T) {
	l := newLoop(t)
	a, b := eventFD(t), eventFD(t)
	var seen []string // the loop's own
	var laterEv []uint32
	later := handlerFunc(func(ev uint32) {
		seen = append(seen, "later")
		laterEv = append(laterEv, ev)
	})
	handler := func(name string, fd int) Handler {
		return handlerFunc(func(ev uint32) {
			if ev&unix.EPOLLIN == 0 {
				return
			}
			var buf [8]byte
			unix.Read(fd, buf[:])
			seen = append(seen, name)
			if len(seen) == 1 {
				l.Later(later) // the first of the round asks
			}
		})
	}
	on(t, l, func() {
		if _, err := l.Add(a, handler("a", a)); err != nil {
			t.Error(err)
		}
		if _, err := l.Add(b, handler("b", b)); err != nil {
			t.Error(err)
		}
	})
	// Both ready in one round: the loop is held in a posted function
	// while they become readable.
	hold := make(chan struct{})
	held := make(chan struct{})
	l.Post(func() { close(held); <-hold })
	<-held
	poke(t, a)
	poke(t, b)
	close(hold)
	deadline := time.Now().Add(5 * time.Second)
	for {
		var got []string
		var evs []uint32
		on(t, l, func() { got, evs = append(got, seen...), append(evs, laterEv...) })
		if len(got) == 3 {
			if got[2] != "later" || evs[0] != 0 {
				t.Fatalf("ran %v (Later's events %v); want both handlers, then Later's with no events", got, evs)
			}
			return
		}
		if len(got) > 3 || time.Now().After(deadline) {
			t.Fatalf("ran %v; want both handlers, then Later's, once", got)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Remove drops the events already taken for its token: a registration
// that reused the slot in the same round never hears the old one's event,
// and the removed handler hears nothing more.
func TestRemoveDropsQueuedEvents(t *testing.T) {
	l := newLoop(t)
	a, b := eventFD(t), eventFD(t)
	var p [2]int // the reused slot's: an empty pipe reports nothing
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	newR, newW := p[0], p[1]
	defer unix.Close(newR)
	var log []string // the loop's own
	var tokB, tokNew Token
	var reused bool
	var removed bool
	hA := handlerFunc(func(ev uint32) {
		if ev&unix.EPOLLIN == 0 {
			return // the eventfd's first event: writable
		}
		log = append(log, "a")
		if removed {
			return
		}
		removed = true
		l.Remove(tokB) // b's event is queued in this round
		var err error
		if tokNew, err = l.Add(newR, handlerFunc(func(ev uint32) {
			log = append(log, "new:"+strconv.Itoa(int(ev)))
		})); err != nil {
			t.Error(err)
		}
		reused = uint32(tokNew) == uint32(tokB) && tokNew != tokB
	})
	hB := handlerFunc(func(ev uint32) {
		if ev&unix.EPOLLIN != 0 {
			log = append(log, "b")
		}
	})
	on(t, l, func() {
		if _, err := l.Add(a, hA); err != nil {
			t.Error(err)
		}
		var err error
		if tokB, err = l.Add(b, hB); err != nil {
			t.Error(err)
		}
	})
	hold := make(chan struct{})
	held := make(chan struct{})
	l.Post(func() { close(held); <-hold })
	<-held
	poke(t, a) // a first: epoll reports in the order they became ready
	poke(t, b)
	close(hold)
	time.Sleep(50 * time.Millisecond)
	poke(t, b) // b again: its handler is gone
	time.Sleep(50 * time.Millisecond)
	on(t, l, func() {
		if !reused {
			t.Errorf("the new registration %#x did not reuse the removed %#x's slot with a new generation", tokNew, tokB)
		}
		if len(log) != 1 || log[0] != "a" {
			t.Errorf("handlers ran %v; want a alone (b removed before its queued event, the new pipe silent)", log)
		}
		// A stale token changes nothing.
		l.Remove(tokB)
		l.SetHandler(tokB, handlerFunc(func(uint32) { log = append(log, "stale") }))
	})
	unix.Write(newW, []byte("x"))
	deadline := time.Now().Add(5 * time.Second)
	for {
		var got []string
		on(t, l, func() { got = append(got, log...) })
		if len(got) >= 2 {
			if len(got) != 2 || got[1] != "new:"+strconv.Itoa(unix.EPOLLIN) {
				t.Fatalf("handlers ran %v; want the new one's EPOLLIN after a's", got)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new registration heard nothing within 5s: %v", got)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// SetHandler with the live token takes effect.
	ch := make(chan uint32, 1)
	on(t, l, func() { l.SetHandler(tokNew, handlerFunc(func(ev uint32) { ch <- ev })) })
	unix.Close(newW) // the handler hears the hang-up
	select {
	case ev := <-ch:
		if ev&(unix.EPOLLHUP|unix.EPOLLRDHUP) == 0 {
			t.Errorf("the replaced handler heard %#x, want the pipe's hang-up", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the replaced handler heard nothing within 5s")
	}
}

// A listener registered with AddListener is level-triggered: a handler that
// takes one connection per call is called again for the next. Delete takes
// it out of the set; its connections wait in the backlog.
func TestAddListenerAndDelete(t *testing.T) {
	l := newLoop(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rc, _ := ln.SyscallConn()
	lfd := -1
	rc.Control(func(fd uintptr) { lfd, err = Dup(int(fd)) })
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(lfd)
	unix.SetNonblock(lfd, true)

	type accepted struct {
		peer netip.AddrPort
		err  error
	}
	ch := make(chan accepted, 8)
	var tok Token
	calls := 0
	h := handlerFunc(func(uint32) {
		calls++
		fd, peer, err := Accept(lfd)
		if err == nil {
			unix.Close(fd)
		}
		ch <- accepted{peer, err} // one per call
	})
	on(t, l, func() { tok, err = l.AddListener(lfd, h) })
	if err != nil {
		t.Fatal(err)
	}
	hold := make(chan struct{})
	held := make(chan struct{})
	l.Post(func() { close(held); <-hold })
	<-held
	var clients []*net.TCPConn
	for range 2 {
		c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	close(hold)
	peers := map[netip.AddrPort]bool{}
	for range 2 {
		select {
		case a := <-ch:
			if a.err != nil {
				t.Fatalf("accept: %v", a.err)
			}
			peers[a.peer] = true
		case <-time.After(5 * time.Second):
			t.Fatal("both connections were not accepted within 5s")
		}
	}
	for _, c := range clients {
		if p := c.LocalAddr().(*net.TCPAddr).AddrPort(); !peers[p] {
			t.Errorf("accepted %v; client %v not among them", peers, p)
		}
	}

	on(t, l, func() {
		if err := l.Delete(tok, lfd); err != nil {
			t.Error(err)
		}
	})
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case a := <-ch:
		t.Fatalf("a deleted listener's handler ran: %+v", a)
	case <-time.After(100 * time.Millisecond):
	}
	// The connection waits for whoever accepts next.
	if fd, peer, err := acceptWithin(lfd, 5*time.Second); err != nil || peer != c.LocalAddr().(*net.TCPAddr).AddrPort() {
		t.Fatalf("accept after Delete = %v, %v; want the client %v", peer, err, c.LocalAddr())
	} else {
		unix.Close(fd)
	}
	var n int
	on(t, l, func() { n = calls })
	if n != 2 {
		t.Errorf("the handler ran %d times, want 2", n)
	}
}

// acceptWithin accepts on the non-blocking lfd, retrying for at most d.
func acceptWithin(lfd int, d time.Duration) (int, netip.AddrPort, error) {
	deadline := time.Now().Add(d)
	for {
		fd, peer, err := Accept(lfd)
		if err != unix.EAGAIN || time.Now().After(deadline) {
			return fd, peer, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Close runs what was posted before it, returns once the loop's goroutine
// is gone, and fails every Post after it; closing twice is harmless.
func TestClose(t *testing.T) {
	before := runtime.NumGoroutine()
	l, err := New()
	if err != nil {
		t.Fatal(err)
	}
	ran := 0
	for range 100 {
		if err := l.Post(func() { ran++ }); err != nil {
			t.Fatal(err)
		}
	}
	// A loop parked for a far timer closes all the same.
	l.Post(func() { l.AfterFunc(time.Hour, func() { t.Error("a timer ran after Close") }) })
	closed := make(chan error, 1)
	go func() { closed <- l.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return within 5s")
	}
	if ran != 100 { // Close waited for the loop: no race
		t.Errorf("%d of 100 functions posted before Close ran", ran)
	}
	if err := l.Post(func() { t.Error("a function posted after Close ran") }); err != ErrClosed {
		t.Errorf("Post after Close = %v, want ErrClosed", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	waitGoroutines(t, before)
}

// Posts racing Close either run or fail with ErrClosed; none writes to the
// loop's eventfd after Close closed it (a descriptor number that may
// already be someone else's): descriptors opened after Close never
// receive a stray wakeup.
func TestPostRacingClose(t *testing.T) {
	before := runtime.NumGoroutine()
	for range 200 {
		l, err := New()
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		for range 4 {
			wg.Go(func() {
				<-start
				for range 20 {
					if l.Post(func() {}) == ErrClosed {
						return
					}
					runtime.Gosched()
				}
			})
		}
		close(start)
		runtime.Gosched()
		l.Close()
		// Whatever takes the eventfd's number now must see nothing.
		fds := make([]int, 4)
		for i := range fds {
			fds[i], _ = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		}
		wg.Wait()
		for _, fd := range fds {
			var b [8]byte
			if n, _ := unix.Read(fd, b[:]); n > 0 {
				t.Fatalf("an eventfd opened after Close was written to: %v", b)
			}
			unix.Close(fd)
		}
	}
	waitGoroutines(t, before)
}

type alarmFunc func()

func (f *alarmFunc) Alarm() { (*f)() }

// Arm starts a zero Timer kept by value, runs its Alarm once, moves it
// when armed again while pending (with the new Alarm), stops it, and
// allocates nothing.
func TestArm(t *testing.T) {
	l := newLoop(t)
	ch := make(chan string, 8)
	first, second := alarmFunc(func() { ch <- "first" }), alarmFunc(func() { ch <- "second" })
	var kept struct {
		a, b, c Timer
	}
	var allocs float64
	on(t, l, func() {
		allocs = testing.AllocsPerRun(100, func() {
			l.Arm(&kept.c, time.Hour, &first)
			l.Stop(&kept.c)
		})
		l.Arm(&kept.a, time.Hour, &first)
		l.Arm(&kept.a, 20*time.Millisecond, &second) // moved, and calls second now
		l.Arm(&kept.b, 10*time.Millisecond, &first)
		l.Arm(&kept.c, 5*time.Millisecond, &first)
		l.Stop(&kept.c)
		l.Stop(&kept.c) // harmless
	})
	if allocs != 0 {
		t.Errorf("Arm and Stop allocate %v times, want 0", allocs)
	}
	for _, want := range []string{"first", "second"} {
		select {
		case got := <-ch:
			if got != want {
				t.Fatalf("alarm %q ran, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("alarm %q did not run within 5s", want)
		}
	}
	select {
	case got := <-ch:
		t.Fatalf("alarm %q ran once more (the stopped timer, or one twice)", got)
	case <-time.After(100 * time.Millisecond):
	}
	// A timer that ran can be armed again.
	on(t, l, func() { l.Arm(&kept.b, 0, &second) })
	if got := <-ch; got != "second" {
		t.Fatalf("re-armed timer ran %q", got)
	}
}
