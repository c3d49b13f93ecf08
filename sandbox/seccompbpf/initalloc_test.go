package seccompbpf

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"testing"
)

// TestNoPackageLevelTables: chalk-init links this package (Decode,
// Install), so a package-level map or slice literal here (the name table,
// ~360 entries) would be built at the start of every sandbox's init and
// held in its memory for the sandbox's life (issue #18's idle memory).
// Tables are built by the functions that use them (the compiler, in chalkd).
func TestNoPackageLevelTables(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	for _, name := range files {
		if filepath.Ext(name) != ".go" || len(name) > 8 && name[len(name)-8:] == "_test.go" {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.VAR {
				continue
			}
			for _, s := range g.Specs {
				for _, v := range s.(*ast.ValueSpec).Values {
					if cl, ok := v.(*ast.CompositeLit); ok {
						switch cl.Type.(type) {
						case *ast.MapType, *ast.ArrayType:
							t.Errorf("%s: a package-level table (%s): build it in the function that uses it", name, fset.Position(cl.Pos()))
						}
					}
				}
			}
		}
	}
}
