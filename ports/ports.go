// Package ports parses and holds lists of TCP port ranges ("80,443,8000-9000"),
// the one syntax detour's flags and configuration use for ports: the ports
// the kernel rules capture (package redirect), the routing rules' port
// conditions and the ports never sniffed (package tunnel).
//
// It is a leaf: it knows nothing of rules, routes or sockets.
package ports

import (
	"fmt"
	"strconv"
	"strings"
)

// Range is a port or an inclusive range of them.
type Range struct{ Lo, Hi uint16 }

// String is "443" or "8000-9000".
func (r Range) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// Contains reports whether port is in r.
func (r Range) Contains(port uint16) bool { return r.Lo <= port && port <= r.Hi }

// Parse parses a list like "80,443,8000-9000"; spaces around the entries
// are allowed. An error quotes the bad entry and says what is wrong.
func Parse(s string) ([]Range, error) {
	var out []Range
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := parsePort(lo)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", part, err)
		}
		b := a
		if isRange {
			if b, err = parsePort(hi); err != nil {
				return nil, fmt.Errorf("%q: %w", part, err)
			}
			if b < a {
				return nil, fmt.Errorf("%q: range ends before it starts", part)
			}
		}
		out = append(out, Range{a, b})
	}
	return out, nil
}

// AnyContains reports whether one of rs contains port.
func AnyContains(rs []Range, port uint16) bool {
	for _, r := range rs {
		if r.Contains(port) {
			return true
		}
	}
	return false
}

func parsePort(s string) (uint16, error) {
	v, err := strconv.ParseUint(s, 10, 16)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("port %q is not a number from 1 to 65535", s)
	}
	return uint16(v), nil
}
