package nettest

import (
	"go/parser"
	"go/token"
	"strings"
	"testing"
)

func TestPackageDoc(t *testing.T) {
	pkgs, err := parser.ParseDir(token.NewFileSet(), ".", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pkgs {
		var doc string
		for _, f := range p.Files {
			if f.Doc != nil {
				doc += f.Doc.Text()
			}
		}
		if !strings.HasPrefix(doc, "Package "+p.Name) {
			t.Errorf("package %s has no doc comment", p.Name)
		}
	}
}
