package tunnel

import (
	"os/exec"
	"strings"
	"testing"
)

// The layout the package docs promise: tunnel and its packages never import
// redirect (the kernel side is handed in), relay and upstream know nothing
// of tunnel, and sniff and ports are leaves.
func TestLayering(t *testing.T) {
	const mod = "github.com/detour-proxy/detour/"
	for pkg, banned := range map[string][]string{
		"tunnel/...":      {"redirect"},
		"tunnel/relay":    {"tunnel", "tunnel/upstream", "sniff", "redirect"},
		"tunnel/upstream": {"tunnel", "tunnel/relay", "sniff", "redirect"},
		"sniff":           {"*"},
		"ports":           {"*"},
	} {
		out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", mod+pkg).Output()
		if err != nil {
			t.Skipf("go list: %v", err)
		}
		self := strings.TrimSuffix(mod+pkg, "/...")
		for dep := range strings.FieldsSeq(string(out)) {
			if !strings.HasPrefix(dep, mod) || strings.HasPrefix(dep, self) {
				continue
			}
			for _, b := range banned {
				if b == "*" || dep == mod+b {
					t.Errorf("%s imports %s", pkg, dep)
				}
			}
		}
	}
}
