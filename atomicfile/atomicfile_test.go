package atomicfile

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestWriteFile(t *testing.T) {
	for name, write := range map[string]func(string, []byte, os.FileMode) error{"WriteFile": WriteFile, "WriteFileNoSync": WriteFileNoSync} {
		t.Run(name, func(t *testing.T) { testWriteFile(t, write) })
	}
}

func testWriteFile(t *testing.T, WriteFile func(string, []byte, os.FileMode) error) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f.json")
	for _, tc := range []struct {
		data string
		perm os.FileMode
	}{{"one", 0o600}, {"two, replaced", 0o644}} {
		if err := WriteFile(p, []byte(tc.data), tc.perm); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		st, _ := os.Stat(p)
		if err != nil || string(b) != tc.data || st.Mode().Perm() != tc.perm {
			t.Fatalf("%q %v %v, want %q %v", b, st.Mode().Perm(), err, tc.data, tc.perm)
		}
	}
	// Concurrent writers: one wins whole, no temporary file is left.
	var wg sync.WaitGroup
	for _, s := range []string{"aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := WriteFile(p, []byte(s), 0o600); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if b, _ := os.ReadFile(p); len(b) != 8 || b[0] != b[7] {
		t.Fatalf("torn write: %q", b)
	}
	// A failed write leaves the old content and nothing else.
	if err := WriteFile(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}
}
