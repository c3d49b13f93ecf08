package daemon

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRestrictDataDir: an install made with world-readable subdirectories
// (as chalkd made them before) is fixed at start; missing ones are made.
func TestRestrictDataDir(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"mounts", "cache", "logs", "sandboxes"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := restrictDataDir(dir, false); err != nil {
		t.Fatal(err)
	}
	for name, want := range dataDirModes {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", name, st.Mode().Perm(), want)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("data dir without user namespaces: mode %v, want 0700", st.Mode().Perm())
	}
	if dataDirModes["mounts"] != 0o700 || dataDirModes["cache"] != 0o700 || dataDirModes["logs"] != 0o700 {
		t.Errorf("uploads, layers and logs must be private: %v", dataDirModes)
	}
}
