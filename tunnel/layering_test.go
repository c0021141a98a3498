package tunnel

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
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

// The data path stays readable as short functions: none in this package's
// own files is over 60 lines (issue 13).
func TestFunctionsShort(t *testing.T) {
	const limit = 60
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok {
				if n := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1; n > limit {
					t.Errorf("%s: %s is %d lines, more than %d: split it into named steps", f, fd.Name.Name, n, limit)
				}
			}
		}
	}
}
