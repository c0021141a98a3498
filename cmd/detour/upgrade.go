package main

// Binary upgrade on SIGUSR2, as nginx does it: the running process starts
// the binary at its own path again, with the same arguments, and hands it
// its listening sockets as inherited descriptors named in $DETOUR_INHERIT
// ("tcp=3,metrics=4,ready=7"). The sockets never close, so the kernel queues
// new connections for whichever process accepts next and none is refused.
// The new process writes "ready" to the "ready" pipe once it serves; the old
// one then waits a short probation (a binary that crashes at once has
// failed too), stops accepting, drains its connections up to --grace and
// exits. A new binary that exits, crashes or stays silent leaves the old
// one serving, and the log says why.

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/detour-proxy/detour/redirect"
)

// inheritEnv names the inherited descriptors: name=fd, comma-separated.
const inheritEnv = "DETOUR_INHERIT"

// Names of the descriptors an upgrade hands over. A new listener (the
// proxy port, transparent UDP sockets) registers its socket under a name
// of its own with handover.add in the old process and takes it with
// inherited.take in the new one; a name the new binary does not know is
// closed (and logged).
const (
	fdListener   = "tcp"         // the transparent listener (--listen)
	fdMetrics    = "metrics"     // --metrics
	fdPprof      = "pprof"       // --pprof
	fdRulesLease = "rules-lease" // see rulesLease: who removes the rules
	fdReady      = "ready"       // write end of the readiness pipe
)

const (
	// upgradeReadyTimeout bounds how long a new binary may take to serve.
	upgradeReadyTimeout = 30 * time.Second
	// upgradeProbation: a new binary that exits this soon after it said
	// it serves has failed too; until then both processes accept.
	upgradeProbation = 2 * time.Second
)

// inherited holds the descriptors the previous process handed over; it is
// empty for a process started afresh.
type inherited struct {
	files map[string]*os.File
}

// takeInherited reads and clears $DETOUR_INHERIT. The descriptors are
// marked close-on-exec, so a later upgrade passes only what it means to.
func takeInherited() (*inherited, error) {
	in := &inherited{files: map[string]*os.File{}}
	v, ok := os.LookupEnv(inheritEnv)
	if !ok {
		return in, nil
	}
	os.Unsetenv(inheritEnv)
	for _, kv := range strings.Split(v, ",") {
		name, n, _ := strings.Cut(kv, "=")
		fd, err := strconv.Atoi(n)
		if name == "" || err != nil || fd < 3 {
			return nil, fmt.Errorf("$%s: bad entry %q (want name=fd, fd 3 or more)", inheritEnv, kv)
		}
		if _, err := fcntl(fd, syscall.F_GETFD, 0); err != nil {
			return nil, fmt.Errorf("$%s: descriptor %d (%s): %w", inheritEnv, fd, name, err)
		}
		syscall.CloseOnExec(fd)
		in.files[name] = os.NewFile(uintptr(fd), name)
	}
	return in, nil
}

// upgrade reports whether this process was started by an upgrade.
func (in *inherited) upgrade() bool { return len(in.files) > 0 }

// take returns the descriptor handed over as name (nil if none), which is
// the caller's from then on.
func (in *inherited) take(name string) *os.File {
	f := in.files[name]
	delete(in.files, name)
	return f
}

// closeRest closes what nobody took: a socket this binary does not serve.
func (in *inherited) closeRest(log *slog.Logger) {
	for name, f := range in.files {
		log.Warn("upgrade: closing an inherited descriptor this process does not use", "name", name)
		f.Close()
		delete(in.files, name)
	}
}

// listen opens detour's transparent listener, or adopts the one handed
// over if it is bound where --listen asks.
func (in *inherited) listen(mode redirect.Mode, addr string, log *slog.Logger, open func() (*redirect.Listener, error)) (*redirect.Listener, error) {
	if f := in.take(fdListener); f != nil {
		ln, err := redirect.ListenFile(f, mode, addr)
		if err == nil {
			return ln, nil
		}
		log.Warn("upgrade: not using the inherited listener; listening anew", "error", err.Error())
	}
	return open()
}

// listenTCP is net.Listen("tcp", addr), or the listener handed over as
// name if it is bound to addr.
func (in *inherited) listenTCP(name, addr string, log *slog.Logger) (net.Listener, error) {
	if f := in.take(name); f != nil {
		ln, err := net.FileListener(f)
		f.Close()
		if err == nil {
			if a, ok := ln.Addr().(*net.TCPAddr); ok && redirect.SameAddr(a.AddrPort(), addr) {
				return ln, nil
			}
			err = fmt.Errorf("bound to %s, not %s", ln.Addr(), addr)
			ln.Close()
		}
		log.Warn("upgrade: not using an inherited listener; listening anew", "name", name, "error", err.Error())
	}
	return net.Listen("tcp", addr)
}

// signalReady tells the old process that this one serves (nothing for a
// process started afresh).
func (in *inherited) signalReady() error {
	f := in.take(fdReady)
	if f == nil {
		return nil
	}
	defer f.Close()
	_, err := io.WriteString(f, "ready\n")
	return err
}

// handover is the set of named sockets the process hands to its successor.
type handover struct {
	mu    sync.Mutex
	names []string
	conns []syscall.Conn
}

// add registers c to be handed over as name.
func (h *handover) add(name string, c syscall.Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.names = append(h.names, name)
	h.conns = append(h.conns, c)
}

// dup returns duplicates of the registered descriptors (close-on-exec; the
// caller closes them), in the order of names.
func (h *handover) dup() (names []string, files []*os.File, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, c := range h.conns {
		rc, err := c.SyscallConn()
		if err != nil {
			closeAll(files)
			return nil, nil, fmt.Errorf("%s: %w", h.names[i], err)
		}
		var nfd int
		var derr error
		if err := rc.Control(func(fd uintptr) { nfd, derr = fcntl(int(fd), syscall.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
			closeAll(files)
			return nil, nil, fmt.Errorf("duplicating %s: %w", h.names[i], errors.Join(err, derr))
		}
		names = append(names, h.names[i])
		files = append(files, os.NewFile(uintptr(nfd), h.names[i]))
	}
	return names, files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func fcntl(fd, cmd, arg int) (int, error) {
	r, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), uintptr(cmd), uintptr(arg))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// selfPath is the path to start on an upgrade: the path detour was started
// by, made absolute at start (so a binary or symlink replaced there is
// picked up), else os.Executable at the time of the upgrade (Linux's
// /proc/self/exe, with " (deleted)" stripped once the file was replaced).
type selfPath string

func startPath() selfPath {
	if strings.Contains(os.Args[0], "/") {
		if p, err := filepath.Abs(os.Args[0]); err == nil {
			return selfPath(p)
		}
	}
	return ""
}

func (p selfPath) resolve() (string, error) {
	if p != "" {
		if _, err := os.Stat(string(p)); err == nil {
			return string(p), nil
		}
	}
	return os.Executable()
}

// upgradeResult is how an upgrade ended: the new process serves (err nil)
// or failed and is gone.
type upgradeResult struct {
	pid int
	err error
}

// upgrade is a new process being started; see startUpgrade.
type upgrade struct {
	pid  int // 0 if it could not even be started
	proc *os.Process
	res  chan upgradeResult
}

// result is where the outcome arrives; nil (never ready) for a nil upgrade.
func (u *upgrade) result() <-chan upgradeResult {
	if u == nil {
		return nil
	}
	return u.res
}

// stop asks a new process still on probation to stop (SIGTERM: it drains
// what it accepted).
func (u *upgrade) stop() {
	if u.proc != nil {
		u.proc.Signal(syscall.SIGTERM)
	}
}

// startUpgrade starts the binary at path with this process's arguments and
// the handed-over descriptors, and reports once on result(): the new
// process's PID once it serves and lived through its probation, or why it
// failed (a new process that hangs is killed).
func startUpgrade(path string, h *handover, log *slog.Logger) *upgrade {
	u := &upgrade{res: make(chan upgradeResult, 1)}
	names, files, err := h.dup()
	if err != nil {
		u.res <- upgradeResult{err: err}
		return u
	}
	r, w, err := os.Pipe()
	if err != nil {
		closeAll(files)
		u.res <- upgradeResult{err: err}
		return u
	}
	names, files = append(names, fdReady), append(files, w)
	var env []string
	for i, n := range names {
		env = append(env, fmt.Sprintf("%s=%d", n, 3+i))
	}
	cmd := exec.Command(path, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), inheritEnv+"="+strings.Join(env, ","))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.ExtraFiles = files
	err = cmd.Start()
	closeAll(files) // the child has its copies; the pipe now ends when it does
	if err != nil {
		r.Close()
		u.res <- upgradeResult{err: fmt.Errorf("starting %s: %w", path, err)}
		return u
	}
	u.proc, u.pid = cmd.Process, cmd.Process.Pid
	pid := u.pid
	log.Info("upgrade: started the new binary", "path", path, "new_pid", pid)

	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	ready := make(chan error, 1)
	go func() {
		defer r.Close()
		b := make([]byte, 16)
		n, err := io.ReadAtLeast(r, b, len("ready"))
		if err == nil && !strings.HasPrefix(string(b[:n]), "ready") {
			err = fmt.Errorf("it said %q", b[:n])
		}
		ready <- err
	}()
	go func() {
		fail := func(format string, args ...any) {
			u.res <- upgradeResult{pid: pid, err: fmt.Errorf(format, args...)}
		}
		timeout := time.NewTimer(upgradeReadyTimeout)
		defer timeout.Stop()
		select {
		case err := <-ready:
			if err != nil {
				// The pipe closed without "ready": it exited, or is about to.
				select {
				case xerr := <-exited:
					fail("the new process (pid %d) exited before it served: %s", pid, exitReason(xerr))
				case <-timeout.C:
					cmd.Process.Kill()
					<-exited
					fail("the new process (pid %d) closed its readiness pipe without serving (%v); killed it", pid, err)
				}
				return
			}
		case xerr := <-exited:
			fail("the new process (pid %d) exited before it served: %s", pid, exitReason(xerr))
			return
		case <-timeout.C:
			cmd.Process.Kill()
			<-exited
			fail("the new process (pid %d) did not serve within %v; killed it", pid, upgradeReadyTimeout)
			return
		}
		log.Info("upgrade: the new process serves", "new_pid", pid, "probation", upgradeProbation)
		select {
		case xerr := <-exited:
			fail("the new process (pid %d) exited within %v of serving: %s", pid, upgradeProbation, exitReason(xerr))
		case <-time.After(upgradeProbation):
			u.res <- upgradeResult{pid: pid}
		}
	}()
	return u
}

// exitReason says how a process ended, from exec.Cmd.Wait's error.
func exitReason(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return fmt.Sprintf("killed by signal %d (%s)", int(ws.Signal()), ws.Signal())
		}
		s := fmt.Sprintf("exit status %d", ee.ExitCode())
		if ee.ExitCode() == exitUsage {
			s += " (bad flags or configuration; its log line says which)"
		}
		return s
	}
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// sdNotify sends state to the service manager's notification socket
// ($NOTIFY_SOCKET, sd_notify(3)), if there is one.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	// Go's net package makes a name starting with '@' abstract.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", path, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", path, err)
	}
	return nil
}
