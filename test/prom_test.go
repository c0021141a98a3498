package test

// Reading detour's Prometheus endpoint in the operate tests: scrape, parse
// the text format, and compare counters before and after.

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// promSample is one line of the Prometheus text format.
type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

type promMetrics []promSample

// scrape fetches and parses detour's /metrics from inside the gateway.
func scrape(t *testing.T, tp *topo) promMetrics {
	t.Helper()
	c, err := dialIn(t, tp.G, metricsAddr)
	if err != nil {
		t.Fatalf("metrics endpoint http://%s/metrics in the gateway: %v", metricsAddr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", metricsAddr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("GET http://%s/metrics: %v", metricsAddr, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET http://%s/metrics: %s, %v\n%s", metricsAddr, resp.Status, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("GET /metrics: Content-Type %q, want the Prometheus text format (text/plain)", ct)
	}
	m, err := parseProm(string(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return m
}

// parseProm parses the Prometheus text exposition format (comments skipped).
func parseProm(text string) (promMetrics, error) {
	var m promMetrics
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		bad := func(why string) error { return fmt.Errorf("line %d %q: %s", i+1, line, why) }
		s := promSample{labels: map[string]string{}}
		j := strings.IndexAny(line, "{ ")
		if j <= 0 {
			return nil, bad("no value")
		}
		s.name = line[:j]
		rest := line[j:]
		if rest[0] == '{' {
			rest = rest[1:]
		labels:
			for {
				rest = strings.TrimLeft(rest, " ,")
				if strings.HasPrefix(rest, "}") {
					rest = rest[1:]
					break
				}
				eq := strings.Index(rest, `="`)
				if eq <= 0 {
					return nil, bad("malformed labels")
				}
				k := rest[:eq]
				rest = rest[eq+2:]
				var v strings.Builder
				for {
					if rest == "" {
						return nil, bad("unterminated label value")
					}
					c := rest[0]
					rest = rest[1:]
					switch {
					case c == '\\' && rest != "":
						if rest[0] == 'n' {
							v.WriteByte('\n')
						} else {
							v.WriteByte(rest[0])
						}
						rest = rest[1:]
					case c == '"':
						s.labels[k] = v.String()
						continue labels
					default:
						v.WriteByte(c)
					}
				}
			}
		}
		fs := strings.Fields(rest)
		if len(fs) == 0 {
			return nil, bad("no value")
		}
		v, err := strconv.ParseFloat(fs[0], 64)
		if err != nil {
			return nil, bad(err.Error())
		}
		s.value = v
		m = append(m, s)
	}
	return m, nil
}

// sum adds the samples called name whose labels include the pairs in match
// (label, value, label, value…); with every label given, that is one series.
// A series never observed counts 0.
func (m promMetrics) sum(name string, match ...string) float64 {
	total := 0.0
next:
	for _, s := range m {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(match); i += 2 {
			if s.labels[match[i]] != match[i+1] {
				continue next
			}
		}
		total += s.value
	}
	return total
}

func (m promMetrics) has(name string) bool {
	for _, s := range m {
		if s.name == name {
			return true
		}
	}
	return false
}

// series lists the samples called name, for messages.
func (m promMetrics) series(name string) string {
	var out []string
	for _, s := range m {
		if s.name == name {
			var ls []string
			for k, v := range s.labels {
				ls = append(ls, fmt.Sprintf("%s=%q", k, v))
			}
			sort.Strings(ls)
			out = append(out, fmt.Sprintf("%s{%s} %g", s.name, strings.Join(ls, ","), s.value))
		}
	}
	if len(out) == 0 {
		return name + ": no samples"
	}
	return strings.Join(out, "\n")
}

// delta is how much the sum moved between two scrapes.
func delta(before, after promMetrics, name string, match ...string) float64 {
	return after.sum(name, match...) - before.sum(name, match...)
}

// wantDelta checks that a counter moved by exactly want.
func wantDelta(t *testing.T, before, after promMetrics, want float64, name string, match ...string) {
	t.Helper()
	if got := delta(before, after, name, match...); got != want {
		t.Errorf("%s%v moved by %g, want %g; now:\n%s", name, match, got, want, after.series(name))
	}
}

// ---- the process ----
