package ports

import (
	"slices"
	"testing"
)

// The cases of the two parsers this package replaced (redirect's and
// tunnel's), together.
func TestParse(t *testing.T) {
	got, err := Parse("80, 443,8000-9000")
	if err != nil || !slices.Equal(got, []Range{{80, 80}, {443, 443}, {8000, 9000}}) {
		t.Errorf("Parse = %v, %v", got, err)
	}
	for _, bad := range []string{"", "0", "65536", "70000", "80,", "90-80", "9000-8000", "a-b", "1-2-3", "http", "1-", "-5", "80,,443"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestRangeStringAndContains(t *testing.T) {
	for r, want := range map[Range]string{{443, 443}: "443", {8000, 9000}: "8000-9000"} {
		if got := r.String(); got != want {
			t.Errorf("%#v.String() = %q, want %q", r, got, want)
		}
	}
	rs := []Range{{22, 22}, {6000, 7000}}
	for port, want := range map[uint16]bool{22: true, 23: false, 5999: false, 6000: true, 7000: true, 7001: false} {
		if got := AnyContains(rs, port); got != want {
			t.Errorf("AnyContains(%v, %d) = %v, want %v", rs, port, got, want)
		}
	}
}
