package node

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestConsoleLog reads the rotated part first, then the current one, and
// follows the current one across a rotation (init empties it at its cap).
func TestConsoleLog(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "console.log")
	if _, err := openConsoleLog("sb-x", p); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("no log: %v, want ErrNotFound", err)
	}
	write := func(name, s string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("console.log.1", "old\n")
	write("console.log", "new\n")
	l, err := openConsoleLog("sb-x", p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	b, err := io.ReadAll(l)
	if err != nil || string(b) != "old\nnew\n" {
		t.Fatalf("read %q, %v; want the rotated part, then the current one", b, err)
	}
	// Appended: the next read returns just that.
	f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("more\n")
	f.Close()
	if b, _ = io.ReadAll(l); string(b) != "more\n" {
		t.Fatalf("after an append: %q", b)
	}
	// Rotated: emptied and rewritten shorter; reading starts over.
	write("console.log", "x\n")
	if b, _ = io.ReadAll(l); string(b) != "x\n" {
		t.Fatalf("after a rotation: %q", b)
	}
}
