package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoServerDeps: the chalk binary is mounted into every sandbox; it must
// not link the server side (the identity issuer, JOSE, the metadata server,
// the store) — it needs only the SDK and a few names (package sandboxenv).
func TestNoServerDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v %s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		for _, bad := range []string{
			"github.com/go-jose/", "github.com/chalkcompute/chalkcompute/identity",
			"github.com/chalkcompute/chalkcompute/metadata", "github.com/chalkcompute/chalkcompute/store",
			"github.com/chalkcompute/chalkcompute/daemon", "modernc.org/sqlite",
		} {
			if strings.HasPrefix(pkg, bad) {
				t.Errorf("cmd/chalk links %s", pkg)
			}
		}
	}
}
