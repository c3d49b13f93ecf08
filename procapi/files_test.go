package procapi

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func readAll(t *testing.T, c *Client, path string) []byte {
	t.Helper()
	rc, err := c.ReadFile(testCtx(t), path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return b
}

func TestWriteReadRoundTrip(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	large := make([]byte, 20<<20+17) // many frames, and a short last one
	rand.Read(large)
	cases := []struct {
		name string
		path string
		mode fs.FileMode
		data []byte
		want fs.FileMode
	}{
		{"empty", "empty", 0o644, nil, 0o644},
		{"small", "small.txt", 0o600, []byte("hello\n"), 0o600},
		{"exactly a chunk", "chunk", 0o640, bytes.Repeat([]byte{7}, MaxChunk), 0o640},
		{"large", "large.bin", 0o755, large, 0o755},
		{"parents created", "a/b/c/f", 0o644, []byte("deep"), 0o644},
		{"mode 0 means 0644", "zero-mode", 0, []byte("z"), 0o644},
		{"special bits dropped", "setuid", 0o4755, []byte("s"), 0o755},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.path)
			if err := c.WriteFile(ctx, p, tc.mode, bytes.NewReader(tc.data)); err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, c, p); !bytes.Equal(got, tc.data) {
				t.Fatalf("read back %d bytes, want %d (equal: false)", len(got), len(tc.data))
			}
			st, err := os.Stat(p)
			if err != nil || st.Mode() != tc.want {
				t.Fatalf("on disk: %v %v; want mode %v", st.Mode(), err, tc.want)
			}
			fi, err := c.Stat(ctx, p)
			if err != nil || fi.Name != filepath.Base(p) || fi.Size != int64(len(tc.data)) || fi.Mode != tc.want || fi.IsDir || !fi.ModTime.Equal(st.ModTime()) {
				t.Fatalf("Stat: %+v %v; on disk %v %v", fi, err, st.Mode(), st.ModTime())
			}
		})
	}
	// Writing the same file through one reader at a time, in odd pieces.
	p := filepath.Join(dir, "pieces")
	if err := c.WriteFile(ctx, p, 0o644, iotest.OneByteReader(bytes.NewReader([]byte("one byte at a time")))); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, c, p); string(got) != "one byte at a time" {
		t.Fatalf("read back %q", got)
	}
}

// TestWriteFileAtomic: a replaced file is swapped whole, an upload that
// fails half way leaves the old file, and no temporary file stays behind.
func TestWriteFileAtomic(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	if err := c.WriteFile(ctx, p, 0o644, strings.NewReader("old")); err != nil {
		t.Fatal(err)
	}
	// Hold the old file open: atomic replacement means a new inode.
	old, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := c.WriteFile(ctx, p, 0o600, strings.NewReader("new content")); err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(old); string(b) != "old" {
		t.Fatalf("the old inode now holds %q; the file was rewritten in place", b)
	}
	if got := readAll(t, c, p); string(got) != "new content" {
		t.Fatalf("after replace: %q", got)
	}
	boom := errors.New("source broke")
	src := io.MultiReader(bytes.NewReader(make([]byte, 3*MaxChunk)), iotest.ErrReader(boom))
	if err := c.WriteFile(ctx, p, 0o644, src); !errors.Is(err, boom) {
		t.Fatalf("failed upload: %v, want the source's error", err)
	}
	if got := readAll(t, c, p); string(got) != "new content" {
		t.Fatalf("after a failed upload: %q", got)
	}
	eventually(t, "the temporary file of the failed upload is removed", func() bool {
		ents, _ := os.ReadDir(dir)
		return len(ents) == 1
	})
}

func TestWriteFileOwnership(t *testing.T) {
	if !isRoot() {
		t.Skip("needs root to chown")
	}
	c := serve(t, ServerOptions{DefaultUser: "1234:5678"})
	ctx := testCtx(t)
	dir := t.TempDir()
	existing := filepath.Join(dir, "existing")
	if err := os.WriteFile(existing, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteFile(ctx, filepath.Join(dir, "new/sub/f"), 0o640, strings.NewReader("y")); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteFile(ctx, existing, 0o640, strings.NewReader("z")); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		path     string
		uid, gid uint32
	}{
		{dir, 0, 0},                             // existed
		{filepath.Join(dir, "new"), 1234, 5678}, // created parents belong to the default user
		{filepath.Join(dir, "new/sub"), 1234, 5678},
		{filepath.Join(dir, "new/sub/f"), 1234, 5678},
		{existing, 0, 0}, // a replaced file keeps its owner
	}
	for _, tc := range cases {
		st, err := os.Stat(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if sys.Uid != tc.uid || sys.Gid != tc.gid {
			t.Errorf("%s: owned by %d:%d, want %d:%d", tc.path, sys.Uid, sys.Gid, tc.uid, tc.gid)
		}
	}
}

func TestListDir(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("file", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	ls, err := c.ListDir(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		name  string
		size  int64
		mode  fs.FileMode
		isDir bool
	}
	var got []entry
	for _, fi := range ls {
		size := fi.Size
		if fi.IsDir {
			size = 0 // file system dependent
		}
		got = append(got, entry{fi.Name, size, fi.Mode, fi.IsDir})
		if time.Since(fi.ModTime) > time.Hour {
			t.Errorf("%s: mod time %v", fi.Name, fi.ModTime)
		}
	}
	want := []entry{
		{"file", 5, 0o600, false},
		{"link", 4, fs.ModeSymlink | 0o777, false},
		{"sub", 0, fs.ModeDir | 0o750, true},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("ListDir:\n got %v\nwant %v", got, want)
	}
	// Stat follows the symlink.
	if fi, err := c.Stat(ctx, filepath.Join(dir, "link")); err != nil || fi.Mode != 0o600 || fi.Size != 5 {
		t.Fatalf("Stat of a symlink: %+v %v", fi, err)
	}
	// Empty directories list as empty, not nil.
	if ls, err := c.ListDir(ctx, filepath.Join(dir, "sub")); err != nil || ls == nil || len(ls) != 0 {
		t.Fatalf("empty dir: %v %v", ls, err)
	}
}

// TestListDirBatches: a listing longer than a frame's batch arrives whole
// and sorted.
func TestListDirBatches(t *testing.T) {
	c := serve(t, ServerOptions{})
	dir := t.TempDir()
	const n = 3*listBatch + 5
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%04d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ls, err := c.ListDir(testCtx(t), dir)
	if err != nil || len(ls) != n {
		t.Fatalf("got %d entries, %v; want %d", len(ls), err, n)
	}
	for i, fi := range ls {
		if want := fmt.Sprintf("f%04d", i); fi.Name != want {
			t.Fatalf("entry %d is %q, want %q", i, fi.Name, want)
		}
	}
}

func TestRemove(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	mk := func(rel string) string {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		name      string
		setup     func() string
		recursive bool
		class     error // nil: removed
	}{
		{"file", func() string { return mk("f") }, false, nil},
		{"empty dir", func() string { p := filepath.Join(dir, "e"); os.Mkdir(p, 0o755); return p }, false, nil},
		{"full dir", func() string { mk("full/x"); return filepath.Join(dir, "full") }, false, errdefs.ErrFailedPrecondition},
		{"full dir recursively", func() string { mk("tree/a/b/c"); return filepath.Join(dir, "tree") }, true, nil},
		{"symlink, not its target", func() string {
			target := mk("target")
			p := filepath.Join(dir, "l")
			os.Symlink(target, p)
			return p
		}, false, nil},
		{"missing", func() string { return filepath.Join(dir, "missing") }, false, errdefs.ErrNotFound},
		{"missing recursively", func() string { return filepath.Join(dir, "missing") }, true, errdefs.ErrNotFound},
		{"root", func() string { return "/" }, true, errdefs.ErrInvalidArgument},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.setup()
			err := c.Remove(ctx, p, tc.recursive)
			if tc.class != nil {
				if !errors.Is(err, tc.class) {
					t.Fatalf("got %v, want %v", err, tc.class)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("%s still there: %v", p, err)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "target")); err != nil {
		t.Errorf("removing a symlink removed its target: %v", err)
	}
}

func TestFileErrors(t *testing.T) {
	c := serve(t, ServerOptions{})
	ctx := testCtx(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	readErr := func(p string) error {
		rc, err := c.ReadFile(ctx, p)
		if err == nil {
			rc.Close()
		}
		return err
	}
	statErr := func(p string) error { _, err := c.Stat(ctx, p); return err }
	listErr := func(p string) error { _, err := c.ListDir(ctx, p); return err }
	writeErr := func(p string) error { return c.WriteFile(ctx, p, 0o644, strings.NewReader("x")) }
	cases := []struct {
		name  string
		err   error
		class error
		msg   string
	}{
		{"read missing", readErr(filepath.Join(dir, "missing")), errdefs.ErrNotFound, "missing"},
		{"stat missing", statErr(filepath.Join(dir, "missing")), errdefs.ErrNotFound, "missing"},
		{"list missing", listErr(filepath.Join(dir, "missing")), errdefs.ErrNotFound, "missing"},
		{"read under a file", readErr(filepath.Join(file, "x")), errdefs.ErrFailedPrecondition, "not a directory"},
		{"read a directory", readErr(dir), errdefs.ErrFailedPrecondition, "is a directory"},
		{"list a file", listErr(file), errdefs.ErrFailedPrecondition, "not a directory"},
		{"write over a directory", writeErr(dir), errdefs.ErrFailedPrecondition, "is a directory"},
		{"write under a file", writeErr(filepath.Join(file, "x")), errdefs.ErrFailedPrecondition, "not a directory"},
		{"write /", writeErr("/"), errdefs.ErrInvalidArgument, "/"},
		{"relative read", readErr("rel/x"), errdefs.ErrInvalidArgument, "absolute"},
		{"relative write", writeErr("rel/x"), errdefs.ErrInvalidArgument, "absolute"},
		{"relative stat", statErr("x"), errdefs.ErrInvalidArgument, "absolute"},
		{"relative list", listErr("."), errdefs.ErrInvalidArgument, "absolute"},
		{"empty path", statErr(""), errdefs.ErrInvalidArgument, "absolute"},
		{"relative remove", c.Remove(ctx, "x", false), errdefs.ErrInvalidArgument, "absolute"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if !errors.Is(tc.err, tc.class) || !strings.Contains(fmt.Sprint(tc.err), tc.msg) {
				t.Fatalf("got %v; want %v mentioning %q", tc.err, tc.class, tc.msg)
			}
		})
	}
	// The server checks paths too, for clients that do not.
	nc := raw(t, c, frameRequest, []byte(`{"op":"stat","path":"relative"}`))
	typ, b, err := readFrame(nc, nil)
	if err != nil || typ != frameError || !errors.Is(decodeError(b), errdefs.ErrInvalidArgument) {
		t.Fatalf("raw stat of a relative path: %q %s %v", typ, b, err)
	}
}

// TestProtocolErrors: malformed openings get a classed error, not a hang.
func TestProtocolErrors(t *testing.T) {
	c := serve(t, ServerOptions{})
	cases := []struct {
		name    string
		typ     byte
		payload string
	}{
		{"not a request", frameStdin, "hello"},
		{"not JSON", frameRequest, "{"},
		{"unknown op", frameRequest, `{"op":"teleport"}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			nc := raw(t, c, tc.typ, []byte(tc.payload))
			typ, b, err := readFrame(nc, nil)
			if err != nil || typ != frameError || !errors.Is(decodeError(b), errdefs.ErrInvalidArgument) {
				t.Fatalf("got %q %s %v; want an invalid_argument error frame", typ, b, err)
			}
		})
	}
	// A frame header announcing more than MaxFrame: the server hangs up
	// without reading (or allocating) the payload.
	nc, err := net.Dial("unix", c.name)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	hdr := make([]byte, frameHeader)
	putHeader(hdr, frameRequest, MaxFrame+1)
	if _, err := nc.Write(hdr); err != nil {
		t.Fatal(err)
	}
	if typ, b, err := readFrame(nc, nil); !errors.Is(err, io.EOF) {
		t.Fatalf("after an oversized header: %q %s %v; want the connection closed", typ, b, err)
	}
	if err := c.Ping(testCtx(t)); err != nil {
		t.Fatalf("ping after a bad client: %v", err)
	}
}
