package untar

import (
	"archive/tar"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/tartest"
)

// ent is one tar entry for tests; "@OUT@" in Name or Linkname is replaced by
// the absolute path of a directory beside the root.
type ent struct {
	name, link string
	typ        byte
	mode       int64
	body       string
}

func mktar(t testing.TB, out string, ents ...ent) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{
			Name: strings.ReplaceAll(e.name, "@OUT@", out), Linkname: strings.ReplaceAll(e.link, "@OUT@", out),
			Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)),
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layout makes base/{root,outside} and returns them.
func layout(t testing.TB) (base, root, out string) {
	base = t.TempDir()
	root, out = filepath.Join(base, "root"), filepath.Join(base, "outside")
	for _, d := range []string{root, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return base, root, out
}

// checkConfined fails unless outside is empty, base holds only root and
// outside, and root holds no device, fifo or setuid/setgid file.
func checkConfined(t testing.TB, base, root, out string) {
	t.Helper()
	if ents, _ := os.ReadDir(out); len(ents) != 0 {
		t.Fatalf("written outside the root: %v", ents)
	}
	if ents, _ := os.ReadDir(base); len(ents) != 2 {
		t.Fatalf("written beside the root: %v", ents)
	}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		m := fi.Mode()
		if m&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe|fs.ModeSocket|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
			t.Errorf("%s: mode %v", p, m)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestExtract(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ents    []ent
		wantErr error // nil: success
		lim     Limits
		check   func(t *testing.T, root string)
	}{
		{name: "plain tree", ents: []ent{
			{name: "a/", typ: tar.TypeDir}, {name: "a/b.txt", typ: tar.TypeReg, body: "hi"},
			{name: "c/d/e.sh", typ: tar.TypeReg, mode: 0o4755, body: "#!"},
			{name: "a/link", typ: tar.TypeSymlink, link: "/etc/passwd"},
			{name: "a/hard", typ: tar.TypeLink, link: "a/b.txt"},
		}, check: func(t *testing.T, root string) {
			if b, _ := os.ReadFile(filepath.Join(root, "a/hard")); string(b) != "hi" {
				t.Errorf("hard link content %q", b)
			}
			if l, _ := os.Readlink(filepath.Join(root, "a/link")); l != "/etc/passwd" {
				t.Errorf("symlink target %q, want it kept verbatim", l)
			}
			if fi, _ := os.Stat(filepath.Join(root, "c/d/e.sh")); fi.Mode() != 0o755 {
				t.Errorf("setuid file mode %v, want 0755", fi.Mode())
			}
		}},
		{name: "file through absolute symlink", ents: []ent{
			{name: "x", typ: tar.TypeSymlink, link: "@OUT@"}, {name: "x/pwn", typ: tar.TypeReg, body: "pwn"},
		}, wantErr: errdefs.ErrInvalidArgument},
		{name: "file through relative symlink", ents: []ent{
			{name: "x", typ: tar.TypeSymlink, link: "../outside"}, {name: "x/pwn", typ: tar.TypeReg, body: "pwn"},
		}, wantErr: errdefs.ErrInvalidArgument},
		{name: "dir through symlink", ents: []ent{
			{name: "x", typ: tar.TypeSymlink, link: "../outside"}, {name: "x/d/", typ: tar.TypeDir},
		}, wantErr: errdefs.ErrInvalidArgument},
		{name: "file over symlink", ents: []ent{
			{name: "x", typ: tar.TypeSymlink, link: "@OUT@/pwn"}, {name: "x", typ: tar.TypeReg, body: "pwn"},
		}, check: func(t *testing.T, root string) {
			if fi, err := os.Lstat(filepath.Join(root, "x")); err != nil || !fi.Mode().IsRegular() {
				t.Errorf("x: %v %v, want the symlink replaced by a file", fi, err)
			}
		}},
		{name: "hard link out", ents: []ent{{name: "h", typ: tar.TypeLink, link: "../outside/f"}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "hard link absolute", ents: []ent{{name: "h", typ: tar.TypeLink, link: "/etc/passwd"}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "hard link through symlink", ents: []ent{
			{name: "s", typ: tar.TypeSymlink, link: "/etc"}, {name: "h", typ: tar.TypeLink, link: "s/passwd"},
		}, wantErr: errdefs.ErrInvalidArgument},
		{name: "hard link to symlink", ents: []ent{
			{name: "s", typ: tar.TypeSymlink, link: "/etc/passwd"}, {name: "h", typ: tar.TypeLink, link: "s"},
		}, wantErr: errdefs.ErrInvalidArgument},
		{name: "dotdot", ents: []ent{{name: "../outside/pwn", typ: tar.TypeReg}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "absolute", ents: []ent{{name: "@OUT@/pwn", typ: tar.TypeReg}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "char device", ents: []ent{{name: "sda", typ: tar.TypeChar}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "block device", ents: []ent{{name: "sda", typ: tar.TypeBlock}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "fifo", ents: []ent{{name: "p", typ: tar.TypeFifo}}, wantErr: errdefs.ErrInvalidArgument},
		{name: "too big", ents: []ent{{name: "a", typ: tar.TypeReg, body: "0123456789"}, {name: "b", typ: tar.TypeReg, body: "0123456789"}}, lim: Limits{MaxBytes: 15}, wantErr: errdefs.ErrResourceExhausted},
		{name: "too many", ents: []ent{{name: "a/", typ: tar.TypeDir}, {name: "b/", typ: tar.TypeDir}, {name: "c/", typ: tar.TypeDir}, {name: "d/", typ: tar.TypeDir}}, lim: Limits{MaxEntries: 3}, wantErr: errdefs.ErrResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, root, out := layout(t)
			err := Extract(bytes.NewReader(mktar(t, out, tc.ents...)), root, tc.lim)
			if tc.wantErr == nil && err != nil {
				t.Fatalf("Extract: %v", err)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("Extract: %v, want %v", err, tc.wantErr)
			}
			checkConfined(t, base, root, out)
			if tc.check != nil {
				tc.check(t, root)
			}
		})
	}
}

// FuzzExtract extracts arbitrary bytes, and the same entries with "@OUT@"
// replaced by a directory beside the root, and checks that nothing is ever
// written outside the root and no device, fifo or setuid file is made.
func FuzzExtract(f *testing.F) {
	seeds := [][]ent{
		{{name: "x", typ: tar.TypeSymlink, link: "@OUT@"}, {name: "x/pwn", typ: tar.TypeReg, body: "pwn"}},
		{{name: "x", typ: tar.TypeSymlink, link: "../outside"}, {name: "x/pwn", typ: tar.TypeReg, body: "pwn"}},
		{{name: "d/", typ: tar.TypeDir}, {name: "d/x", typ: tar.TypeSymlink, link: "../../outside"}, {name: "d/x/y/z", typ: tar.TypeReg}},
		{{name: "h", typ: tar.TypeLink, link: "../outside/f"}},
		{{name: "f", typ: tar.TypeReg, body: "a"}, {name: "h", typ: tar.TypeLink, link: "f"}, {name: "h", typ: tar.TypeReg, body: "b"}},
		{{name: "s", typ: tar.TypeSymlink, link: "@OUT@/f"}, {name: "s", typ: tar.TypeReg, body: "b"}},
		{{name: "../outside/f", typ: tar.TypeReg}},
		{{name: "dev", typ: tar.TypeChar}, {name: "suid", typ: tar.TypeReg, mode: 0o6777}},
	}
	for _, s := range seeds {
		f.Add(mktar(f, "@OUT@", s...))
	}
	// Small bounds keep each run fast (a tree of 1000 deep entries takes
	// seconds to make, check and remove) without hiding any path logic.
	fuzzLimits := Limits{MaxBytes: 64 << 10, MaxEntries: 64}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 256<<10 {
			return
		}
		base, root, out := layout(t)
		_ = Extract(bytes.NewReader(data), root, fuzzLimits)
		checkConfined(t, base, root, out)

		// The same entries with the outside directory's real path.
		base2, root2, out2 := layout(t)
		tr := tar.NewReader(bytes.NewReader(data))
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for {
			h, err := tr.Next()
			if err != nil {
				break
			}
			h.Name = strings.ReplaceAll(h.Name, "@OUT@", out2)
			h.Linkname = strings.ReplaceAll(h.Linkname, "@OUT@", out2)
			h.Size = 0
			if tw.WriteHeader(h) != nil {
				break
			}
		}
		tw.Close()
		_ = Extract(bytes.NewReader(buf.Bytes()), root2, fuzzLimits)
		checkConfined(t, base2, root2, out2)
	})
}

// TestExtractSparseBomb: a small archive whose sparse entry reads as 100
// MiB is stopped at the byte bound (the daemon sets it to the archive's size).
func TestExtractSparseBomb(t *testing.T) {
	b := tartest.SparseBomb(100 << 20)
	_, root, _ := layout(t)
	err := Extract(bytes.NewReader(b), root, Limits{MaxBytes: int64(len(b))})
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("Extract: %v, want resource exhausted", err)
	}
	if fi, err := os.Stat(filepath.Join(root, "big")); err == nil && fi.Size() > int64(len(b))+1 {
		t.Fatalf("wrote %d bytes", fi.Size())
	}
}
