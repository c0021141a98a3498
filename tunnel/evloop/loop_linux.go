// Package evloop is detour's own event loop: one epoll set on bare
// non-blocking descriptors, served by one goroutine, with timers and a way
// for other goroutines to hand it work. A connection that lives on a loop
// costs its descriptors and a small struct: no goroutine, no entry in the
// Go runtime's poller (whose registration and removal are two epoll_ctl
// calls per socket more), no wakeup of another goroutine per event.
//
// Descriptors are registered once, edge-triggered, for reading, writing
// and the peer's shutdown; their handler keeps track of what it has
// drained. Closing a descriptor removes it from the set (it is never
// duplicated), so a connection's end costs no epoll_ctl either.
//
// It knows nothing of what the descriptors carry: sockets, listeners,
// eventfds. Everything a handler does runs on the loop's goroutine, so a
// loop's own state needs no lock; Post is the only entry from outside.
package evloop

import (
	"container/heap"
	"errors"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Handler hears the events of a descriptor registered with Add, on the
// loop's goroutine: a mask of unix.EPOLLIN, EPOLLOUT, EPOLLRDHUP,
// EPOLLERR, EPOLLHUP.
type Handler interface {
	Ready(events uint32)
}

// Token names one registration in a loop. A token outlives nothing: once
// removed, events still queued for it are dropped.
type Token uint64

// The registrations' events: edge-triggered, so each is reported once per
// change, and the handler reads or writes until EAGAIN.
const edge = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// maxEvents is how many events one epoll_wait takes.
const maxEvents = 256

// Loop is one event loop. Start it with New; handlers, timers and Later
// are the loop goroutine's own (call them from handlers, timers and posted
// functions only); Post and Close may be called from anywhere.
type Loop struct {
	epfd int
	file *os.File // epfd, as the runtime's poller waits on it
	rc   syscall.RawConn
	wake int // eventfd: Post writes it, the loop reads it

	slots  []slot
	free   []uint32
	timers timerHeap
	armed  time.Time // the deadline set on file; zero for none
	now    time.Time // read once per round
	again  []Handler // to run after this round's events

	mu     sync.Mutex
	posted []func()
	stop   bool
	done   chan struct{}
}

type slot struct {
	h   Handler
	gen uint32
}

// New starts a loop on a goroutine of its own.
func New() (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	l := &Loop{epfd: epfd, wake: -1, done: make(chan struct{})}
	if err := l.init(); err != nil {
		unix.Close(epfd)
		if l.wake >= 0 {
			unix.Close(l.wake)
		}
		return nil, err
	}
	go l.run()
	return l, nil
}

// init makes the eventfd Post wakes the loop with, and hands the epoll
// descriptor to the runtime's poller: an epoll set is readable while it
// has events, so the loop goroutine parks there when it has nothing to do,
// and its wait for timers is a read deadline.
func (l *Loop) init() error {
	var err error
	if l.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		return os.NewSyscallError("eventfd", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN} // level-triggered: read when posted
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, l.wake, &ev); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	if err := unix.SetNonblock(l.epfd, true); err != nil {
		return os.NewSyscallError("fcntl", err)
	}
	l.file = os.NewFile(uintptr(l.epfd), "detour-loop")
	if l.rc, err = l.file.SyscallConn(); err != nil {
		return err
	}
	return nil
}

// wakeToken is the eventfd's data in the epoll set: no slot has it.
const wakeToken = 0

// Add registers fd, edge-triggered, for h.
func (l *Loop) Add(fd int, h Handler) (Token, error) {
	return l.add(fd, h, edge)
}

// AddListener registers a listening socket for h, level-triggered and
// exclusive: of the loops waiting on one listener, one wakes per
// connection, and one that accepts only part of a burst hears of the rest
// in its next round. Remove it with Delete: a listener outlives the loop's
// interest in it.
func (l *Loop) AddListener(fd int, h Handler) (Token, error) {
	return l.add(fd, h, unix.EPOLLIN|unix.EPOLLEXCLUSIVE)
}

func (l *Loop) add(fd int, h Handler, events uint32) (Token, error) {
	var i uint32
	if n := len(l.free); n > 0 {
		i, l.free = l.free[n-1], l.free[:n-1]
	} else {
		l.slots = append(l.slots, slot{})
		i = uint32(len(l.slots)) // 1-based: 0 is the eventfd
	}
	s := &l.slots[i-1]
	s.h = h
	tok := Token(uint64(s.gen)<<32 | uint64(i))
	ev := unix.EpollEvent{Events: events}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = uint64(tok)
	if err := epollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		l.Remove(tok)
		return 0, err
	}
	return tok, nil
}

// SetHandler makes h the handler of tok's descriptor from now on.
func (l *Loop) SetHandler(tok Token, h Handler) {
	if s := l.slot(tok); s != nil {
		s.h = h
	}
}

// Remove forgets tok: its handler hears nothing more. The caller closes the
// descriptor (which takes it out of the epoll set), or calls Delete.
func (l *Loop) Remove(tok Token) {
	if s := l.slot(tok); s != nil {
		s.h = nil
		s.gen++
		l.free = append(l.free, uint32(tok))
	}
}

// Delete takes fd out of the epoll set and forgets tok, for a descriptor
// that stays open (a listener, or a socket handed elsewhere).
func (l *Loop) Delete(tok Token, fd int) error {
	l.Remove(tok)
	return epollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

func (l *Loop) slot(tok Token) *slot {
	i := uint32(tok)
	if i == 0 || int(i) > len(l.slots) {
		return nil
	}
	s := &l.slots[i-1]
	if s.h == nil || s.gen != uint32(tok>>32) {
		return nil
	}
	return s
}

// Later runs h.Ready(0) after this round's events: a handler that stopped
// short (its fair share of one round) goes on there, since an
// edge-triggered descriptor that still has bytes reports nothing more.
func (l *Loop) Later(h Handler) { l.again = append(l.again, h) }

// Now is the time this round started: what timers and handlers measure
// with, without a clock read each.
func (l *Loop) Now() time.Time { return l.now }

// ErrClosed is returned by Post after Close.
var ErrClosed = errors.New("evloop: loop closed")

// Post runs f on the loop's goroutine, soon. It fails after Close.
func (l *Loop) Post(f func()) error {
	l.mu.Lock()
	if l.stop {
		l.mu.Unlock()
		return ErrClosed
	}
	l.posted = append(l.posted, f)
	if len(l.posted) == 1 {
		// Under the lock: Close closes the eventfd only after taking it,
		// so a Post that got in never writes to a number reused since.
		one := uint64(1)
		unix.Write(l.wake, (*[8]byte)(unsafe.Pointer(&one))[:])
	}
	l.mu.Unlock()
	return nil
}

// Close stops the loop once the functions posted so far have run, closes
// its descriptors (not the ones registered: they are their owners') and
// waits for it to return.
func (l *Loop) Close() error {
	l.mu.Lock()
	if l.stop {
		l.mu.Unlock()
		<-l.done
		return nil
	}
	l.stop = true
	l.mu.Unlock()
	one := uint64(1)
	unix.Write(l.wake, (*[8]byte)(unsafe.Pointer(&one))[:])
	<-l.done
	l.mu.Lock()
	unix.Close(l.wake)
	l.mu.Unlock()
	return l.file.Close()
}

func (l *Loop) run() {
	defer close(l.done)
	events := make([]unix.EpollEvent, maxEvents)
	n := 0
	collect := func(fd uintptr) bool {
		n, _ = epollWait(int(fd), events)
		return n > 0
	}
	for {
		l.now = time.Now()
		if n, _ = epollWait(l.epfd, events); n == 0 && len(l.again) == 0 && !l.timerDue() {
			l.armTimer()
			if err := l.rc.Read(collect); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				return // the file is closed
			}
			l.now = time.Now()
		}
		if !l.dispatch(events[:n]) {
			return
		}
		n = 0
		l.runTimers()
		l.runAgain()
	}
}

// dispatch hands each event to its handler, and runs what was posted when
// the eventfd is among them. It reports false once the loop is stopped.
func (l *Loop) dispatch(events []unix.EpollEvent) bool {
	for i := range events {
		tok := Token(*(*uint64)(unsafe.Pointer(&events[i].Fd)))
		if tok == wakeToken {
			if !l.runPosted() {
				return false
			}
			continue
		}
		if s := l.slot(tok); s != nil {
			s.h.Ready(events[i].Events)
		}
	}
	return true
}

// runPosted runs the functions posted so far; false once Close was called.
func (l *Loop) runPosted() bool {
	var buf [8]byte
	unix.Read(l.wake, buf[:])
	l.mu.Lock()
	posted, stop := l.posted, l.stop
	l.posted = nil
	l.mu.Unlock()
	for _, f := range posted {
		f()
	}
	return !stop
}

func (l *Loop) runAgain() {
	for len(l.again) > 0 {
		again := l.again
		l.again = nil
		for _, h := range again {
			h.Ready(0)
		}
		if len(l.again) > 0 {
			return // more next round, after the others' events
		}
	}
}

// epollCtl is epoll_ctl(2), raw (see sock_linux.go).
func epollCtl(epfd, op, fd int, ev *unix.EpollEvent) error {
	_, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(epfd), uintptr(op), uintptr(fd), uintptr(unsafe.Pointer(ev)), 0, 0)
	if e != 0 {
		return os.NewSyscallError("epoll_ctl", e)
	}
	return nil
}

// epollWait takes the events ready now, without waiting.
func epollWait(epfd int, events []unix.EpollEvent) (int, error) {
	r, _, e := syscall.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// Timer is a function to run on the loop at a time, once. The zero Timer
// is stopped: a connection keeps its timers as fields and starts them with
// Arm, which allocates nothing (AfterFunc allocates the Timer).
type Timer struct {
	when time.Time
	a    Alarm
	i    int // the position in the heap plus one; 0 when not in it
}

// Alarm is what a Timer started by Arm calls: a pointer type made for the
// purpose converts to it without an allocation, where a method value
// (e.sniffTimedOut) would allocate a closure each time.
type Alarm interface {
	Alarm()
}

// funcAlarm is AfterFunc's function as an Alarm (a func value converts to
// an interface without an allocation).
type funcAlarm func()

func (f funcAlarm) Alarm() { f() }

// AfterFunc runs f on the loop's goroutine after d.
func (l *Loop) AfterFunc(d time.Duration, f func()) *Timer {
	t := &Timer{a: funcAlarm(f)}
	l.Reset(t, d)
	return t
}

// Arm makes t call a.Alarm() on the loop's goroutine after d, instead of
// what it was set to do.
func (l *Loop) Arm(t *Timer, d time.Duration, a Alarm) {
	t.a = a
	l.Reset(t, d)
}

// Reset makes t run d after this round's start instead.
func (l *Loop) Reset(t *Timer, d time.Duration) {
	t.when = l.now.Add(d)
	if t.i > 0 {
		heap.Fix(&l.timers, t.i-1)
		return
	}
	heap.Push(&l.timers, t)
}

// Stop keeps t from running; it may be Reset again.
func (l *Loop) Stop(t *Timer) {
	if t != nil && t.i > 0 {
		heap.Remove(&l.timers, t.i-1)
	}
}

func (l *Loop) timerDue() bool {
	return len(l.timers) > 0 && !l.timers[0].when.After(l.now)
}

// armTimer sets the epoll file's read deadline to the first timer, so the
// park in the runtime's poller ends for it.
func (l *Loop) armTimer() {
	var next time.Time
	if len(l.timers) > 0 {
		next = l.timers[0].when
	}
	if !next.Equal(l.armed) {
		l.armed = next
		l.file.SetReadDeadline(next)
	}
}

func (l *Loop) runTimers() {
	for l.timerDue() {
		heap.Pop(&l.timers).(*Timer).a.Alarm()
	}
}

type timerHeap []*Timer

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].when.Before(h[j].when) }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].i, h[j].i = i+1, j+1
}
func (h *timerHeap) Push(x any) {
	t := x.(*Timer)
	*h = append(*h, t)
	t.i = len(*h)
}
func (h *timerHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = nil
	t.i = 0
	*h = old[:len(old)-1]
	return t
}
