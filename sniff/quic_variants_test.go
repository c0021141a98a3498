package sniff

import (
	"bufio"
	"flag"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var updateVariants = flag.Bool("update-variants", false, "rewrite testdata/datagrams/variants from the captures")

// quicVariants derives the variant flows of testdata/quic-variants.txt
// from the captures: what a network or a client may make of a real flight
// (reordering, coalescing, other framing, v2), and what a sniffer must
// survive (cuts, noise). Each comes with the answer it must give.
func quicVariants(t *testing.T) map[string]struct {
	ds   [][]byte
	want string // a QUICStatus's name; "done" flows must give the capture's answer
	from string
} {
	capture := func(name string) [][]byte { return readDatagrams(t, name) }
	chromium, quicgoV2 := capture("chromium-quic.bin"), capture("quic-go-v2.bin")
	rng := rand.New(rand.NewPCG(14, 2026))
	rev := func(ds [][]byte) [][]byte { ds = slices.Clone(ds); slices.Reverse(ds); return ds }
	flipped := slices.Clone(chromium)
	flipped[0] = slices.Clone(flipped[0])
	flipped[0][600] ^= 0x01
	random := make([]byte, 1200)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	longJunk := slices.Concat([]byte{0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0xb0}, random[:1182])
	type v = struct {
		ds   [][]byte
		want string
		from string
	}
	return map[string]v{
		"chromium-quic-reversed.bin":    {rev(chromium), "done", "chromium-quic.bin"},
		"chromium-quic-coalesced.bin":   {coalesce(t, chromium), "done", "chromium-quic.bin"},
		"chromium-quic-shuffled.bin":    {reseal(t, chromium, 0, 60, 6, rng), "done", "chromium-quic.bin"},
		"chromium-quic-v2.bin":          {reseal(t, chromium, quicV2, 400, 3, rng), "done", "chromium-quic.bin"},
		"chromium-quic-truncated.bin":   {[][]byte{chromium[0][:600], chromium[1]}, "invalid", ""},
		"chromium-quic-second-only.bin": {chromium[1:], "need-more", ""},
		"quic-go-v2-reversed.bin":       {rev(quicgoV2), "done", "quic-go-v2.bin"},
		"garbage-flipped-bit.bin":       {flipped, "invalid", ""},
		"garbage-random.bin":            {[][]byte{random}, "not-quic", ""},
		"garbage-long-header.bin":       {[][]byte{longJunk}, "invalid", ""},
	}
}

// TestQUICVariants checks the variant files against their manifest, and
// (with -update-variants) writes them anew from the captures.
func TestQUICVariants(t *testing.T) {
	dir := filepath.Join("testdata", "datagrams", "variants")
	manifest := filepath.Join("testdata", "quic-variants.txt")
	if *updateVariants {
		vs := quicVariants(t)
		names := make([]string, 0, len(vs))
		for n := range vs {
			names = append(names, n)
		}
		slices.Sort(names)
		var b strings.Builder
		b.WriteString("# Variants of the captured QUIC flows, in datagrams/variants/, written by\n")
		b.WriteString("# go test ./sniff -run TestQUICVariants -update-variants\n")
		b.WriteString("# file answer same-answer-as\n")
		os.MkdirAll(dir, 0o755)
		for _, n := range names {
			if err := os.WriteFile(filepath.Join(dir, n), joinDatagrams(vs[n].ds), 0o644); err != nil {
				t.Fatal(err)
			}
			b.WriteString(n + " " + vs[n].want + " " + dashIfEmpty(vs[n].from) + "\n")
		}
		if err := os.WriteFile(manifest, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	flows := map[string]flow{}
	for _, fl := range loadFlows(t, QUIC) {
		flows[fl.file] = fl
	}
	f, err := os.Open(manifest)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0][0] == '#' {
			continue
		}
		n++
		ds := readDatagrams(t, filepath.Join("variants", fields[0]))
		r, st, a := feed(ds)
		checkQUICResult(t, r, st, a)
		if st.String() != fields[1] {
			t.Errorf("%s: %v (%s), want %s", fields[0], st, a.Reason(), fields[1])
			continue
		}
		if fields[2] != "-" {
			flows[fields[2]].checkQUIC(t, fields[0], r, st, a)
		}
	}
	if n < 10 {
		t.Errorf("quic-variants.txt lists %d variants", n)
	}
}

func dashIfEmpty(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
