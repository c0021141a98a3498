package main

import (
	"github.com/detour-proxy/detour/internal/testkit"

	"fmt"
	"strings"
	"testing"
	"time"
)

func TestLogWriterBatchesInOrder(t *testing.T) {
	var out testkit.LogBuffer
	l := newLogWriter(&out, logFlushEvery)
	var want strings.Builder
	for i := range 1000 {
		line := fmt.Sprintf("line %d\n", i)
		want.WriteString(line)
		if n, err := l.Write([]byte(line)); n != len(line) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	// The lines arrive without Close, in a few writes.
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, writes := out.Snapshot()
		if got == want.String() {
			if writes > 10 {
				t.Errorf("1000 lines took %d writes, want a few batches", writes)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5s got %d of %d bytes", len(got), want.Len())
		}
		time.Sleep(10 * time.Millisecond)
	}
	l.Write([]byte("before close\n"))
	l.Close()
	l.Write([]byte("after close\n"))
	got, _ := out.Snapshot()
	if want := want.String() + "before close\nafter close\n"; got != want {
		t.Fatalf("after Close the output ends %q, want it to end %q", got[max(0, len(got)-40):], want[len(want)-40:])
	}
}

func TestLogWriterFlushesWhenFull(t *testing.T) {
	var out testkit.LogBuffer
	l := newLogWriter(&out, time.Hour) // no tick during the test
	defer l.Close()
	line := []byte(strings.Repeat("x", 1023) + "\n")
	for range logFlushAt / len(line) {
		l.Write(line)
	}
	// The write that filled the buffer wrote it, without waiting for the tick.
	if got, _ := out.Snapshot(); len(got) < logFlushAt {
		t.Fatalf("%d bytes written after filling the buffer, want %d", len(got), logFlushAt)
	}
}

func TestLogWriterAppendLine(t *testing.T) {
	var out testkit.LogBuffer
	l := newLogWriter(&out, time.Hour)
	add := func(s string, keep bool) {
		t.Helper()
		if got := l.appendLine(func(b []byte) ([]byte, bool) { return append(b, s...), keep }); got != keep {
			t.Fatalf("appendLine(%q) = %v, want %v", s, got, keep)
		}
	}
	add("one\n", true)
	add("dropped\n", false) // what fill appended before it gave up is gone
	l.Write([]byte("two\n"))
	add("three\n", true)
	l.Close()
	add("after close\n", true)
	add("dropped after close\n", false)
	if got, _ := out.Snapshot(); got != "one\ntwo\nthree\nafter close\n" {
		t.Fatalf("wrote %q", got)
	}
}

// The flusher, which waits for a line to come into the empty buffer, is
// told again after each flush: each of a few lines written apart reaches
// the output by itself, without Close and without a full buffer. (That it
// sleeps in between is seen with strace, not here.)
func TestLogWriterWakesForEachLine(t *testing.T) {
	var out testkit.LogBuffer
	l := newLogWriter(&out, 5*time.Millisecond)
	defer l.Close()
	want := ""
	for i := range 3 {
		line := fmt.Sprintf("line %d\n", i)
		want += line
		l.Write([]byte(line))
		deadline := time.Now().Add(5 * time.Second)
		for {
			if got, _ := out.Snapshot(); got == want {
				break
			}
			if time.Now().After(deadline) {
				got, _ := out.Snapshot()
				t.Fatalf("line %d: after 5s the output is %q, want %q", i, got, want)
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond) // the flusher goes back to sleep
	}
}
