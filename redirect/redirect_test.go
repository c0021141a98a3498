package redirect

import "testing"

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"redirect": Redirect, "tproxy": TProxy, "TPROXY": TProxy} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", in, got, err, want)
		}
		if got, _ := ParseMode(in); got.String() != map[Mode]string{Redirect: "redirect", TProxy: "tproxy"}[want] {
			t.Errorf("%v.String() = %q", got, got.String())
		}
	}
	for _, bad := range []string{"", "nat", "redirect ", "tproxy2"} {
		if _, err := ParseMode(bad); err == nil {
			t.Errorf("ParseMode(%q) accepted", bad)
		}
	}
}

func TestParseMark(t *testing.T) {
	for in, want := range map[string]uint32{"0x2d": 0x2d, "45": 45, "0xffffffff": 0xffffffff, "0X10": 16} {
		if got, err := ParseMark(in); err != nil || got != want {
			t.Errorf("ParseMark(%q) = %#x, %v; want %#x", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "0x0", "-1", "0x100000000", "blue", "1.5"} {
		if _, err := ParseMark(bad); err == nil {
			t.Errorf("ParseMark(%q) accepted", bad)
		}
	}
}
