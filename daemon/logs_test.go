package daemon

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestPruneLogs: logs (and their previous parts) of sandboxes that ended
// before the retention period go; recent ones, and those of sandboxes
// still on the node however old, stay.
func TestPruneLogs(t *testing.T) {
	dir := t.TempDir()
	logs, state := filepath.Join(dir, "logs"), filepath.Join(dir, "sandboxes")
	for _, d := range []string{logs, state, filepath.Join(state, "sb-live")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	old := now.Add(-8 * 24 * time.Hour)
	files := map[string]time.Time{
		"sb-old.log": old, "sb-old.log.1": old,
		"sb-recent.log": now.Add(-time.Hour),
		"sb-live.log":   old, "sb-live.log.1": old,
		"unrelated.txt": old,
	}
	for name, mt := range files {
		p := filepath.Join(logs, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mt, mt); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := pruneLogs(logs, state, 7*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(removed)
	if !slices.Equal(removed, []string{"sb-old.log", "sb-old.log.1"}) {
		t.Fatalf("removed %v", removed)
	}
	for name := range files {
		_, err := os.Stat(filepath.Join(logs, name))
		if gone := err != nil; gone != slices.Contains(removed, name) {
			t.Errorf("%s: gone = %v", name, gone)
		}
	}
}
