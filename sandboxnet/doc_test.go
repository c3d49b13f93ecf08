package sandboxnet

import (
	"go/parser"
	"go/token"
	"strings"
	"testing"
)

// TestPackageDoc: the package says what it is for, including the contract
// with the egress package.
func TestPackageDoc(t *testing.T) {
	pkgs, err := parser.ParseDir(token.NewFileSet(), ".", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	var doc string
	for _, p := range pkgs {
		for _, f := range p.Files {
			if f.Doc != nil {
				doc += f.Doc.Text()
			}
		}
	}
	for _, want := range []string{"Package sandboxnet", `chain "egress"`, "Lookup", "Leftovers"} {
		if !strings.Contains(doc, want) {
			t.Errorf("package doc does not mention %q", want)
		}
	}
}
