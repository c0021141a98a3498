package sniff

import (
	"encoding/binary"
	"slices"
	"strings"
	"testing"
)

// dnsName encodes a dotted name as labels ("" and "." are the root).
func dnsName(name string) []byte {
	var b []byte
	for _, l := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		if l != "" {
			b = append(append(b, byte(len(l))), l...)
		}
	}
	return append(b, 0)
}

// dnsQuery builds a standard query for name and qtype, with the
// additional records in extra (each a whole record; nil for none).
func dnsQuery(name string, qtype uint16, extra [][]byte) []byte {
	b := []byte{0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, byte(len(extra))}
	b = append(b, dnsName(name)...)
	b = binary.BigEndian.AppendUint16(b, qtype)
	b = binary.BigEndian.AppendUint16(b, 1)
	for _, r := range extra {
		b = append(b, r...)
	}
	return b
}

// optRR is an EDNS(0) OPT record with a cookie option.
var optRR = []byte{0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8}

func TestDNSQuery(t *testing.T) {
	q := dnsQuery("Www.Example.COM", 28, nil)
	set := func(b []byte, i int, v byte) []byte { b = slices.Clone(b); b[i] = v; return b }
	long63 := strings.Repeat("a", 63)
	name253 := strings.Join([]string{long63, long63, long63, strings.Repeat("b", 61)}, ".")
	tests := []struct {
		name  string
		in    []byte
		host  string
		qtype uint16
		ok    bool
	}{
		{"AAAA", q, "www.example.com", 28, true},
		{"A with EDNS", dnsQuery("example.com", 1, [][]byte{optRR}), "example.com", 1, true},
		{"OPT and a TSIG with a pointer", dnsQuery("example.com", 1, [][]byte{optRR, cat([]byte{0xc0, 12, 0, 250, 0, 255, 0, 0, 0, 0, 0, 2, 1, 2})}), "example.com", 1, true},
		{"HTTPS", dnsQuery("_dmarc.example.org.", 65, nil), "_dmarc.example.org", 65, true},
		{"root NS", dnsQuery(".", 2, nil), "", 2, true},
		{"PTR", dnsQuery("1.2.0.192.in-addr.arpa", 12, nil), "1.2.0.192.in-addr.arpa", 12, true},
		{"IP-like name", dnsQuery("192.0.2.1", 1, nil), "", 1, true},
		{"name with a space", dnsQuery("a b.example", 1, nil), "", 1, true},
		{"dot inside a label", cat(q[:12], []byte{3, 'a', '.', 'b', 7}, []byte("example"), []byte{0, 0, 1, 0, 1}), "", 1, true},
		{"253-byte name", dnsQuery(name253, 1, nil), name253, 1, true},
		{"AD and CD set", set(q, 3, 0x30), "www.example.com", 28, true},

		{"empty", nil, "", 0, false},
		{"header only", q[:12], "", 0, false},
		{"response", set(q, 2, 0x81), "", 0, false},
		{"NOTIFY", set(q, 2, 0x20), "", 0, false},
		{"two questions", set(q, 5, 2), "", 0, false},
		{"no question", set(q, 5, 0), "", 0, false},
		{"an answer", set(q, 7, 1), "", 0, false},
		{"an authority record", set(q, 9, 1), "", 0, false},
		{"missing additional record", set(q, 11, 1), "", 0, false},
		{"trailing byte", cat(q, []byte{0}), "", 0, false},
		{"cut in QTYPE", q[:len(q)-3], "", 0, false},
		{"cut in the name", q[:16], "", 0, false},
		{"compression pointer in QNAME", cat(q[:12], []byte{0xc0, 12, 0, 1, 0, 1}), "", 0, false},
		{"pointer after a label", cat(q[:12], []byte{1, 'a', 0xc0, 12, 0, 1, 0, 1}), "", 0, false},
		{"extended label type", cat(q[:12], []byte{0x41, 0, 0, 1, 0, 1}), "", 0, false},
		{"label past the end", cat(q[:12], []byte{9, 'a'}), "", 0, false},
		{"256-byte name", dnsQuery(name253+".cc", 1, nil), "", 0, false},
		{"OPT cut", dnsQuery("example.com", 1, [][]byte{optRR[:len(optRR)-1]}), "", 0, false},
		{"forward pointer in an additional record", dnsQuery("example.com", 1, [][]byte{cat([]byte{0xc0, 200}, optRR[1:])}), "", 0, false},
		{"self pointer in an additional record", selfPointer(), "", 0, false},
	}
	for _, tt := range tests {
		host, qtype, ok := DNSQuery(tt.in)
		if host != tt.host || qtype != tt.qtype || ok != tt.ok {
			t.Errorf("%s: %q %d %v, want %q %d %v", tt.name, host, qtype, ok, tt.host, tt.qtype, tt.ok)
		}
		if host != "" && wantHost(host) != host {
			t.Errorf("%s: %q is not a normalised host name", tt.name, host)
		}
	}
}

// selfPointer is a query whose OPT record's name points at itself.
func selfPointer() []byte {
	q := dnsQuery("example.com", 1, nil)
	q[11] = 1
	at := len(q)
	return cat(q, []byte{0xc0 | byte(at>>8), byte(at)}, optRR[1:])
}

// TestDNSCorpus reads the queries dig sent.
func TestDNSCorpus(t *testing.T) {
	for _, fl := range loadFlows(t, DNS) {
		host, qtype, ok := DNSQuery(fl.datagrams[0])
		if !ok || host != fl.want.Host || qtype != fl.qtype {
			t.Errorf("%s: %q %d %v, want %q %d", fl.file, host, qtype, ok, fl.want.Host, fl.qtype)
		}
		// Every strict prefix is malformed.
		d := fl.datagrams[0]
		for n := range len(d) {
			if _, _, ok := DNSQuery(d[:n]); ok {
				t.Errorf("%s: prefix of %d bytes accepted", fl.file, n)
			}
		}
		// A QUIC assembler says it is not QUIC.
		if _, st, _ := feed(fl.datagrams); st != NotQUIC {
			t.Errorf("%s: the QUIC assembler says %v", fl.file, st)
		}
	}
}

func TestProtoOutOfRange(t *testing.T) {
	if Proto(200).String() != "unknown" {
		t.Error("out-of-range Proto")
	}
}
