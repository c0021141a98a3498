package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A socket registered for handover reaches the successor through
// $DETOUR_INHERIT and serves there after the first copy is closed.
func TestHandoverInherit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	var h handover
	h.add(fdMetrics, ln.(syscall.Conn))
	names, files, err := h.dup()
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 1 || names[0] != fdMetrics {
		t.Fatalf("names %v", names)
	}
	ln.Close()
	// As the successor sees it: the name and descriptor in the environment,
	// a descriptor only takeInherited owns. (Passing files[0]'s own would
	// close it twice: once by the inherited listener, once more when GC
	// runs files[0]'s cleanup, by then maybe on another test's socket or
	// directory that got the number meanwhile.)
	fd, err := syscall.Dup(int(files[0].Fd()))
	files[0].Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(inheritEnv, fmt.Sprintf("%s=%d", fdMetrics, fd))
	inh, err := takeInherited()
	if err != nil {
		t.Fatal(err)
	}
	if _, still := os.LookupEnv(inheritEnv); still || !inh.upgrade() {
		t.Fatalf("after takeInherited: env still set %v, upgrade %v", still, inh.upgrade())
	}
	log := slog.New(slog.DiscardHandler)
	ln2, err := inh.listenTCP(fdMetrics, addr, log)
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	if ln2.Addr().String() != addr {
		t.Fatalf("inherited listener on %s, want %s", ln2.Addr(), addr)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial the inherited listener: %v", err)
	}
	c.Close()
	if ac, err := ln2.Accept(); err != nil {
		t.Fatal(err)
	} else {
		ac.Close()
	}
}

func TestTakeInheritedRefusesBadEntries(t *testing.T) {
	for _, v := range []string{"tcp", "tcp=x", "=3", "tcp=1", "tcp=999999"} {
		t.Setenv(inheritEnv, v)
		if _, err := takeInherited(); err == nil || !strings.Contains(err.Error(), inheritEnv) {
			t.Errorf("%s=%q: error %v, want one naming $%s", inheritEnv, v, err, inheritEnv)
		}
	}
}

// Of two processes sharing the rules, only the last one out gets the
// lease; the successor joins through the handed-over file.
func TestRulesLease(t *testing.T) {
	old, err := newRulesLease(nil)
	if err != nil {
		t.Fatal(err)
	}
	var h handover
	h.add(fdRulesLease, old.file())
	_, files, err := h.dup()
	if err != nil {
		t.Fatal(err)
	}
	successor, err := newRulesLease(files[0])
	if err != nil {
		t.Fatal(err)
	}
	if old.last() {
		t.Fatal("the old process got the lease while its successor holds a share")
	}
	if !successor.last() {
		t.Fatal("the successor, left alone, did not get the lease")
	}
}

// sdNotify writes one datagram to $NOTIFY_SOCKET, and nothing without it.
func TestSdNotify(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := sdNotify("READY=1"); err != nil {
		t.Fatalf("without NOTIFY_SOCKET: %v", err)
	}
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	if err := sdNotify("MAINPID=42"); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 64)
	n, err := c.Read(b)
	if err != nil || string(b[:n]) != "MAINPID=42" {
		t.Fatalf("read %q, %v; want MAINPID=42", b[:n], err)
	}
}

// A new binary that exits at once is reported with its exit status.
func TestUpgradeFailsWhenNewBinaryExits(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "detour")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	var h handover
	u := startUpgrade(bin, &h, slog.New(slog.DiscardHandler))
	select {
	case res := <-u.result():
		if res.err == nil || !strings.Contains(res.err.Error(), "exit status 3") || !strings.Contains(res.err.Error(), "before it served") {
			t.Fatalf("result %v, want an exit before serving with status 3", res.err)
		}
	case <-time.After(upgradeReadyTimeout + 5*time.Second):
		t.Fatal("no result")
	}
}
