//go:build linux

package main

// The bench's namespaces (scripts/netns.sh), the processes it starts in
// them, and what it reads of those processes in /proc.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Addresses of scripts/netns.sh.
const (
	clientIP   = "198.18.1.2"
	gatewayIP  = "198.18.2.1" // the gateway's address on the server side
	serverIP   = "198.18.2.2"
	upstreamIP = "198.18.3.2"
)

// Servers in the server and upstream namespaces.
const (
	httpPort      = 80   // nginx
	iperfPort     = 5201 // iperf3 -s
	holdPort      = 9000 // holdserver
	tlsPort       = 8443 // tlsserver, sniffed
	tlsSkip       = 9443 // tlsserver, in --sniff-skip-ports
	socksPort     = 1080 // the bench's SOCKS5 upstream
	detourPort    = 7777
	redsPort      = 12345
	minPort       = 7001 // go-minimal
	haproxyPort   = 7002
	ipt2socksPort = 7003

	minMark = "0x2d" // go-minimal's socket mark, as detour's default
)

// topology is one set of namespaces ID-c, ID-g, ID-s, ID-u.
type topology struct {
	id         string
	C, G, S, U string
	script     string // scripts/netns.sh
}

// newID picks a namespace ID no one uses: "db" and 8 random hex digits.
func newID() (string, error) {
	for range 10 {
		b := make([]byte, 4)
		rand.Read(b)
		id := "db" + hex.EncodeToString(b)
		if _, err := os.Stat("/run/netns/" + id + "-g"); errors.Is(err, os.ErrNotExist) {
			return id, nil
		}
	}
	return "", errors.New("no free namespace ID")
}

func (t *topology) up(ctx context.Context) error {
	if out, err := runCmd(ctx, 60*time.Second, "bash", t.script, "up", t.id); err != nil {
		return fmt.Errorf("netns.sh up %s: %v\n%s", t.id, err, out)
	}
	// Many short connections each way: a wide port range on the dialling
	// sides, and closed connections leave the gateway's conntrack table soon.
	for _, ns := range []string{t.C, t.G, t.U} {
		if out, err := t.exec(ctx, ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"); err != nil {
			return fmt.Errorf("sysctl in %s: %v\n%s", ns, err, out)
		}
	}
	return nil
}

func (t *topology) down() error {
	// Not under the bench's context: cleanup must run after Ctrl-C too.
	if out, err := runCmd(context.Background(), 60*time.Second, "bash", t.script, "down", t.id); err != nil {
		return fmt.Errorf("netns.sh down %s: %v\n%s", t.id, err, out)
	}
	return nil
}

// exec runs a command in namespace ns and returns its combined output.
func (t *topology) exec(ctx context.Context, ns string, args ...string) (string, error) {
	return runCmd(ctx, 60*time.Second, "ip", append([]string{"netns", "exec", ns}, args...)...)
}

func runCmd(ctx context.Context, timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// proc is a long-running process the bench started in a namespace. Its PID
// is the program's own: `ip netns exec` and `prlimit` exec it.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string // stderr (and stdout unless piped)
	done chan struct{}
	err  error

	stdin io.WriteCloser // piped helpers only
	lines chan string    // their stdout, line by line; closed at EOF
}

// procs are all processes started, for the cleanup.
type procs struct {
	mu  sync.Mutex
	all []*proc
	dir string
}

// start runs argv in namespace ns. nofile > 0 sets its open-file limit
// (soft and hard) with prlimit. piped connects stdin and stdout to the bench.
func (ps *procs) start(name, ns string, nofile int, piped bool, argv ...string) (*proc, error) {
	full := []string{"ip", "netns", "exec", ns}
	if nofile > 0 {
		full = append([]string{"prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, full...)
	}
	full = append(full, argv...)
	p := &proc{name: name, cmd: exec.Command(full[0], full[1:]...), done: make(chan struct{})}
	p.log = filepath.Join(ps.dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
	f, err := os.Create(p.log)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	p.cmd.Stderr = f
	if piped {
		if p.stdin, err = p.cmd.StdinPipe(); err != nil {
			return nil, err
		}
		out, err := p.cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		p.lines = make(chan string, 16)
		go func() {
			sc := bufio.NewScanner(out)
			sc.Buffer(make([]byte, 64<<10), 4<<20)
			for sc.Scan() {
				p.lines <- sc.Text()
			}
			close(p.lines)
		}()
	} else {
		p.cmd.Stdout = f
	}
	// Its own process group, so Ctrl-C in the terminal reaches only the
	// bench, which then stops everything in order.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	ps.mu.Lock()
	ps.all = append(ps.all, p)
	ps.mu.Unlock()
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to grace, then SIGKILL.
func (p *proc) stop(grace time.Duration) {
	if p.stdin != nil {
		p.stdin.Close()
	}
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// ask sends one line to a piped helper and returns its one-line answer.
func (p *proc) ask(line string, timeout time.Duration) (string, error) {
	// A late answer to an earlier question that timed out is not this one's.
	for drained := false; !drained; {
		select {
		case _, open := <-p.lines:
			drained = !open
		default:
			drained = true
		}
	}
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		return "", fmt.Errorf("%s: %w", p.name, err)
	}
	select {
	case s, ok := <-p.lines:
		if !ok {
			return "", fmt.Errorf("%s ended: %s", p.name, p.tail())
		}
		return s, nil
	case <-time.After(timeout):
		return "", fmt.Errorf("%s did not answer %q within %v", p.name, line, timeout)
	}
}

// tail is the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

func (ps *procs) killAll() {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for _, p := range ps.all {
		if !p.exited() {
			p.cmd.Process.Kill()
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
			}
		}
	}
}

// cpuTime is the user plus system time of pid so far.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14 utime
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15 stime
	const clkTck = 100                       // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clkTck, nil
}

// cpuIdle is the share of the machine's CPU time that was idle over d: a
// busy machine (another job running) makes the numbers noisy.
func cpuIdle(d time.Duration) float64 {
	read := func() (idle, total float64) {
		b, err := os.ReadFile("/proc/stat")
		if err != nil {
			return 0, 0
		}
		line, _, _ := strings.Cut(string(b), "\n")
		for i, f := range strings.Fields(line)[1:] {
			v, _ := strconv.ParseFloat(f, 64)
			total += v
			if i == 3 || i == 4 { // idle, iowait
				idle += v
			}
		}
		return idle, total
	}
	i0, t0 := read()
	time.Sleep(d)
	i1, t1 := read()
	if t1 <= t0 {
		return 0
	}
	return (i1 - i0) / (t1 - t0)
}

// foreignCPU sums the CPU time (own and reaped children's) of every
// process that is neither in one of the bench's namespaces nor the bench
// itself: other work on the machine, which makes the numbers noisy.
// Processes that start and end between two calls are seen only through
// their parents.
type foreignCPU struct {
	ours map[string]bool // "net:[inode]" of the bench's namespaces
}

func newForeignCPU(t *topology) *foreignCPU {
	f := &foreignCPU{ours: map[string]bool{}}
	for _, ns := range []string{t.C, t.G, t.S, t.U} {
		var st syscall.Stat_t
		if err := syscall.Stat("/run/netns/"+ns, &st); err == nil {
			f.ours[fmt.Sprintf("net:[%d]", st.Ino)] = true
		}
	}
	return f
}

const pfKthread = 0x00200000 // PF_KTHREAD in /proc/PID/stat's flags

// snapshot maps pid to CPU time so far for the foreign processes.
func (f *foreignCPU) snapshot() map[int]time.Duration {
	out := map[int]time.Duration{}
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil || f.ours[ns] {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		s := string(b)
		fs := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(fs) < 15 {
			continue
		}
		// Kernel threads (ksoftirqd, kworker) are in the host's namespace
		// but mostly carry the bench's own traffic.
		if flags, _ := strconv.ParseUint(fs[6], 10, 64); flags&pfKthread != 0 {
			continue
		}
		var ticks int64
		for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
			v, _ := strconv.ParseInt(fs[i], 10, 64)
			ticks += v
		}
		out[pid] = time.Duration(ticks) * time.Second / 100
	}
	return out
}

// since is the foreign CPU time used between snapshot before and now.
func (f *foreignCPU) since(before map[int]time.Duration) time.Duration {
	var total time.Duration
	for pid, t := range f.snapshot() {
		total += t - before[pid] // a new process counts whole
	}
	return max(total, 0)
}

// rssKiB is VmRSS of pid.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}

// fdCount is the number of open descriptors of pid.
func fdCount(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}
