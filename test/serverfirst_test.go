package test

// End-to-end tests of what detour learns from silent clients: only a
// server seen speaking first makes it skip sniffing for a destination, and
// that ends as soon as a client of the destination speaks first. A client
// that only keeps quiet (a browser's preconnect) changes nothing for the
// clients after it.

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// One silent connection (open, send nothing, wait past the sniff timeout,
// close), then 20 named ones to the same destination: all 20 are sniffed
// and the upstream is asked for each by name.
func TestSilentConnectionKeepsNamesUpstream(t *testing.T) {
	const sniffTimeout, named = 300 * time.Millisecond, 20
	tp := newTopo(t)
	startServers(t, tp)
	f := families[0]
	hosts := map[string]string{}
	for i := range named {
		hosts[fmt.Sprintf("n%d.test", i)] = f.server
	}
	ps := startProxies(t, tp, hosts)
	d := startDetourUp(t, tp, "--upstream", proxyURL("socks5", "", f, dantePort), "--sniff-timeout", sniffTimeout.String())
	dst := net.JoinHostPort(f.server, strconv.Itoa(httpsPort))

	quiet := dial(t, tp, dst)
	time.Sleep(sniffTimeout + 500*time.Millisecond)
	quiet.Close()
	d.waitLog(t, 5*time.Second, "conn", map[string]string{"client": quiet.LocalAddr().String(), "sniff": "timeout"})

	for i := range named {
		host := fmt.Sprintf("n%d.test", i)
		who, err := curlVia(t, tp, f, "https", host)
		if err != nil || who != byDante {
			t.Fatalf("%s: carried by %q, %v; want dante", host, who, err)
		}
		rec := d.waitLog(t, 5*time.Second, "conn", map[string]string{"host": host})
		if rec["sniff"] != "found" || rec["target"] != host+":443" || rec["dst"] != dst {
			t.Errorf("%s: access line %v; want sniff found, target %s:443, dst %s", host, rec, host, dst)
		}
		if n := waitCount(5*time.Second, 1, func() int { return ps.requests(host, httpsPort)[byDante] }); n != 1 {
			t.Errorf("%s: dante's log has %d requests for it by name, want 1", host, n)
		}
	}
}

// A server-first service on a port detour does not know (the skip list has
// 22, 25, … but not this one) is learned from its first connection: the
// next one is not sniffed (sniff=skipped, no sniff time). The first client
// seen speaking first ends that: the one after it is sniffed again.
func TestServerFirstLearnedAndForgotten(t *testing.T) {
	const sniffTimeout = 500 * time.Millisecond
	// The banner comes a little after accept, so a client that writes at
	// once is first on the wire, whatever the scheduling.
	const bannerDelay = 200 * time.Millisecond
	const port = 2525
	const greeting = "220 banner.test ESMTP\r\n"
	tp := newTopo(t)
	bannerAfter(listenIn(t, tp.S, fmt.Sprintf("[::]:%d", port)), bannerDelay, greeting)
	d := startDetour(t, tp, append([]string{"--listen", fmt.Sprintf(":%d", listenPort),
		"--sniff-timeout", sniffTimeout.String()}, capture...)...)
	dst := net.JoinHostPort(families[0].server, strconv.Itoa(port))

	// waitsForBanner is an SMTP client: it reads the greeting, then talks.
	waitsForBanner := func() map[string]any {
		c := dial(t, tp, dst)
		buf := make([]byte, len(greeting))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != greeting {
			t.Fatalf("greeting %q, %v", buf, err)
		}
		echo(t, c, "EHLO client.test\r\n")
		c.Close()
		return d.waitLog(t, 5*time.Second, "conn", map[string]string{"client": c.LocalAddr().String()})
	}
	// speaksFirst writes before the greeting comes.
	speaksFirst := func() map[string]any {
		c := dial(t, tp, dst)
		if _, err := io.WriteString(c, "EHLO early.test\r\n"); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, len(greeting))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != greeting {
			t.Fatalf("greeting %q, %v", buf, err)
		}
		buf = make([]byte, len("EHLO early.test\r\n"))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("echo: %v", err)
		}
		c.Close()
		return d.waitLog(t, 5*time.Second, "conn", map[string]string{"client": c.LocalAddr().String()})
	}
	sniffed := func(step string, rec map[string]any, outcome string) {
		t.Helper()
		took, _ := rec["sniff_time"].(float64) // nanoseconds in the JSON log
		switch {
		case rec["sniff"] != outcome:
			t.Fatalf("%s: access line %v; want sniff=%s", step, rec, outcome)
		case outcome == "timeout" && time.Duration(took) < sniffTimeout:
			t.Fatalf("%s: sniff_time %v, want the sniff timeout %v", step, time.Duration(took), sniffTimeout)
		case outcome == "skipped" && took != 0:
			t.Fatalf("%s: sniff_time %v, want none", step, time.Duration(took))
		}
	}

	sniffed("first connection", waitsForBanner(), "timeout")
	sniffed("after the greeting was seen", waitsForBanner(), "skipped")
	sniffed("a client speaking first", speaksFirst(), "skipped")
	sniffed("after a client spoke first", waitsForBanner(), "timeout")
	sniffed("learned again", waitsForBanner(), "skipped")
}

// echo writes msg on c and reads it back.
func echo(t *testing.T, c *net.TCPConn, msg string) {
	t.Helper()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v", buf, err)
	}
}
