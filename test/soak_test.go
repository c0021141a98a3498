package test

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var soakFor = flag.Duration("soak", 40*time.Second, "how long TestSoak churns connections (make bench runs it longer)")

// TestSoak: continuous connection churn for -soak (40 s in make test, 10
// minutes in make bench) from 8 clients at once: echoes, 256 KiB downloads
// and 64 KiB uploads checked by SHA-256, resets from the server, a closed
// destination port and clients that connect and leave without a byte.
// Nothing fails but what must (the resets, the closed port), and afterwards
// detour's goroutines and descriptors are back to what it held before, and
// its RSS near it.
func TestSoak(t *testing.T) {
	tp := newTopo(t)
	startServers(t, tp)
	d := startOp(t, tp)
	pid := d.cmd.Process.Pid
	server := func(port int) string { return net.JoinHostPort(families[0].server, fmt.Sprint(port)) }

	const downN, upN = 256 << 10, 64 << 10
	downSum, upSum := streamSum(downN), streamSum(upN)
	// one makes connection number i, of a kind picked by i; it returns an
	// error only for an outcome that kind must not have.
	one := func(i int) error {
		kind := i % 6
		port := bulkPort
		if kind == 4 {
			port = 9999 // nothing listens there: detour resets the client
		}
		c, err := dialIn(t, tp.C, server(port))
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		switch kind {
		case 0: // echo
			c.Write([]byte("Esoak"))
			c.CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "soak" {
				return fmt.Errorf("echo: %q, %v", got, err)
			}
		case 1: // download
			var req [9]byte
			req[0] = 'D'
			binary.BigEndian.PutUint64(req[1:], downN)
			c.Write(req[:])
			h := sha256.New()
			if n, err := io.Copy(h, c); err != nil || n != downN || hex.EncodeToString(h.Sum(nil)) != downSum {
				return fmt.Errorf("download: %d bytes, %v", n, err)
			}
		case 2: // upload
			c.Write([]byte{'U'})
			io.CopyN(c, stream(upN), upN)
			c.CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || string(got) != upSum {
				return fmt.Errorf("upload: %q, %v", got, err)
			}
		case 3: // the server resets: the client must see the connection end
			c.Write([]byte("Rx"))
			if _, err := io.ReadAll(c); err == nil {
				return nil // EOF is fine too, if the reset raced the FIN
			}
		case 4: // a closed port: the connection must end, not hang
			if _, err := c.Read(make([]byte, 1)); err == nil {
				return fmt.Errorf("closed port: a byte arrived")
			}
		case 5: // connects and leaves without a byte
		}
		return nil
	}
	churn := func(within time.Duration) (made, failed int64, firstErr string) {
		var n, bad atomic.Int64
		var errOnce sync.Once
		stop := time.Now().Add(within)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; time.Now().Before(stop); i += 8 {
					n.Add(1)
					if err := one(i); err != nil {
						bad.Add(1)
						errOnce.Do(func() { firstErr = fmt.Sprintf("connection %d: %v", i, err) })
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
		}
		wg.Wait()
		return n.Load(), bad.Load(), firstErr
	}

	// Warm up (pools, buffers and the heap reach their working size), then
	// the baseline.
	if _, failed, first := churn(3 * time.Second); failed > 0 {
		t.Fatalf("warm-up: %d failed; first: %s", failed, first)
	}
	base := measureIdle(t, d, tp)
	rss0 := procKB(t, pid, "VmRSS")

	start := time.Now()
	made, failed, first := churn(*soakFor)
	took := time.Since(start)
	d.alive(t)
	if failed > 0 {
		t.Errorf("%d of %d connections failed; first: %s", failed, made, first)
	}
	now, _ := backToIdle(t, d, tp, base, 30*time.Second)
	rss := procKB(t, pid, "VmRSS")
	t.Logf("%d connections in %v (%.0f/s); after: goroutines %d (before %d), fds %d (before %d), VmRSS %d kB (before %d kB)",
		made, took.Round(time.Millisecond), float64(made)/took.Seconds(), now.goroutines, base.goroutines, now.fds, base.fds, rss, rss0)
	if made < 1000 {
		t.Errorf("only %d connections in %v", made, took)
	}
	// The heap is collected (stats runs the GC) but the runtime returns
	// freed pages to the kernel only gradually: a bound, not equality.
	if limit := rss0 + max(rss0/2, 16<<10); rss > limit {
		t.Errorf("VmRSS %d kB after the soak, more than %d kB (%d kB before)", rss, limit, rss0)
	}
}
