package pgtest

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// TestMissingPackage: without the server binaries Start fails with
// ErrMissing naming the Debian package, and Main's callers skip (or, under
// CHALK_TEST_POSTGRES=1, fail).
func TestMissingPackage(t *testing.T) {
	old := installRoot
	installRoot = t.TempDir()
	defer func() { installRoot = old }()
	t.Setenv("PATH", t.TempDir())
	c, err := Start()
	if c != nil || !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), "apt-get install postgresql") {
		t.Fatalf("Start without postgresql: %v %v", c, err)
	}
}

// TestCluster: a started cluster serves fresh databases on its unix socket
// and is gone after Stop.
func TestCluster(t *testing.T) {
	c, err := Start()
	if errors.Is(err, ErrMissing) && !Required() {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	// Registered first: runs after the databases' drops.
	t.Cleanup(func() {
		c.Stop()
		select {
		case <-c.exited:
		default:
			t.Error("the server still runs after Stop")
		}
		if _, err := os.Stat(c.Dir()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the cluster's dir after Stop: %v", err)
		}
	})
	a, b := c.NewDatabase(t), c.NewDatabase(t)
	if a == b || !strings.Contains(a, "host="+c.Dir()) {
		t.Fatalf("databases %q and %q", a, b)
	}
}
