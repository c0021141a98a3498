package main

import (
	"io"
	"sync"
	"time"
)

// logFlushEvery is how long a log line may wait in logWriter's buffer.
const logFlushEvery = 50 * time.Millisecond

// logFlushAt is how much logWriter buffers before it writes at once (and
// the caller waits for the write: a slow reader slows the logger, not the
// memory).
const logFlushAt = 64 << 10

// logWriter batches log lines: one write(2) per batch instead of one per
// access line, which at thousands of connections a second is a measurable
// share of detour's system time. Lines reach w within logFlushEvery, at
// once when logFlushAt bytes are waiting, and on Close. The flusher sleeps
// until a line comes into an empty buffer, so an idle detour is not woken
// every logFlushEvery for nothing.
type logWriter struct {
	w io.Writer

	out     sync.Mutex // held while writing to w, so batches stay in order
	mu      sync.Mutex // guards buf, spare and closed
	buf     []byte
	spare   []byte
	closed  bool
	kick    chan struct{} // a line came into the empty buffer
	stop    chan struct{}
	stopped chan struct{}
}

// newLogWriter batches writes to w, writing them out at least every
// flushEvery.
func newLogWriter(w io.Writer, flushEvery time.Duration) *logWriter {
	l := &logWriter{w: w, kick: make(chan struct{}, 1), stop: make(chan struct{}), stopped: make(chan struct{})}
	go l.loop(flushEvery)
	return l
}

// Write queues p, which slog hands over as one whole line.
func (l *logWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.flush() // anything still queued goes first
		l.out.Lock()
		defer l.out.Unlock()
		return l.w.Write(p)
	}
	first := len(l.buf) == 0
	l.buf = append(l.buf, p...)
	full := len(l.buf) >= logFlushAt
	l.mu.Unlock()
	l.queued(first, full)
	return len(p), nil
}

// appendLine lets fill append one whole line to the buffer, in place, under
// the lock that guards it; fill reports false to add nothing (what it
// appended is dropped), and appendLine reports what fill did.
func (l *logWriter) appendLine(fill func(b []byte) ([]byte, bool)) bool {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		b, ok := fill(nil)
		if ok {
			l.Write(b)
		}
		return ok
	}
	n := len(l.buf)
	b, ok := fill(l.buf)
	if !ok {
		l.buf = b[:n]
		l.mu.Unlock()
		return false
	}
	l.buf = b
	full := len(b) >= logFlushAt
	l.mu.Unlock()
	l.queued(n == 0, full)
	return true
}

// queued follows a line added to the buffer: first, into an empty one
// (the flusher is told); full, past logFlushAt (written now).
func (l *logWriter) queued(first, full bool) {
	switch {
	case full:
		l.flush()
	case first:
		select {
		case l.kick <- struct{}{}:
		default: // told already
		}
	}
}

// flush writes out what is buffered.
func (l *logWriter) flush() {
	l.out.Lock()
	defer l.out.Unlock()
	l.mu.Lock()
	b := l.buf
	l.buf = l.spare[:0]
	l.mu.Unlock()
	if len(b) > 0 {
		l.w.Write(b) // nowhere to report a failure to write the log
	}
	l.mu.Lock()
	l.spare = b[:0]
	l.mu.Unlock()
}

// loop writes the buffer out one period (every) after a line came into it
// empty, and sleeps while it stays empty.
func (l *logWriter) loop(every time.Duration) {
	defer close(l.stopped)
	t := time.NewTimer(every)
	t.Stop()
	for {
		select {
		case <-l.kick:
			t.Reset(every)
			select {
			case <-t.C:
				l.flush()
			case <-l.stop:
				l.flush()
				return
			}
		case <-l.stop:
			l.flush()
			return
		}
	}
}

// Close writes what is left and stops the background flushes; lines
// written after it go straight to w.
func (l *logWriter) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.stopped
	return nil
}
