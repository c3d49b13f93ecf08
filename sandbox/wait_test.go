package sandbox

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestWatchCreate: the watch fires for the name renamed into the directory
// (how init publishes its socket), not for other entries.
func TestWatchCreate(t *testing.T) {
	dir := t.TempDir()
	appeared, stop, err := watchCreate(dir, "init.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	for _, name := range []string{".init.sock.tmp", "init.sock.other", "init"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sub", "init.sock"), nil, 0o600); err != nil {
		t.Fatal(err) // in a subdirectory: not watched
	}
	select {
	case <-appeared:
		t.Fatal("fired before init.sock was there")
	default:
	}
	if err := os.Rename(filepath.Join(dir, ".init.sock.tmp"), filepath.Join(dir, "init.sock")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-appeared:
	case <-time.After(10 * time.Second):
		t.Fatal("no event for init.sock renamed into place")
	}
	// Stopping a watch that never fired ends it too.
	_, stop2, err := watchCreate(dir, "never")
	if err != nil {
		t.Fatal(err)
	}
	stop2()
}
