package main

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// rulesLease lets the last of the detour processes that share one set of
// kernel rules (an old process draining after an upgrade, and its
// successor) know that it is the last, so that it alone removes them. Each
// holds a read lock on one memfd, handed over on upgrade, through its own
// open file description (OFD locks belong to that, not to the process); on
// its way out a process drops its lock and tries for a write lock, which
// only one with no other holder left gets. Of two leaving at once, the
// later one gets it, or the earlier holds it and removes the rules.
type rulesLease struct{ f *os.File }

// newRulesLease makes a lease, or joins the one handed over (inherited is
// then closed).
func newRulesLease(inherited *os.File) (*rulesLease, error) {
	var f *os.File
	if inherited == nil {
		fd, err := unix.MemfdCreate("detour-rules-lease", unix.MFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("rules lease: memfd_create: %w", err)
		}
		f = os.NewFile(uintptr(fd), "detour-rules-lease")
	} else {
		// The same file through an open file description of our own.
		var err error
		f, err = os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", inherited.Fd()), os.O_RDWR|unix.O_CLOEXEC, 0)
		inherited.Close()
		if err != nil {
			return nil, fmt.Errorf("rules lease: reopening the inherited lease: %w", err)
		}
	}
	if err := lockOFD(f, unix.F_RDLCK, unix.F_OFD_SETLKW); err != nil {
		f.Close()
		return nil, fmt.Errorf("rules lease: %w", err)
	}
	return &rulesLease{f: f}, nil
}

// last drops this process's share and reports whether no other process
// holds one; if so, it keeps the lease (as a write lock) until exit.
func (l *rulesLease) last() bool {
	if l == nil {
		return true
	}
	lockOFD(l.f, unix.F_UNLCK, unix.F_OFD_SETLK)
	return lockOFD(l.f, unix.F_WRLCK, unix.F_OFD_SETLK) == nil
}

// file is the lease to hand over, nil if there is none.
func (l *rulesLease) file() *os.File {
	if l == nil {
		return nil
	}
	return l.f
}

func lockOFD(f *os.File, typ int16, cmd int) error {
	lk := unix.Flock_t{Type: typ, Whence: io.SeekStart}
	return unix.FcntlFlock(f.Fd(), cmd, &lk)
}
