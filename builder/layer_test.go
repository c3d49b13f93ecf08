package builder

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

type entry struct {
	name     string
	typ      byte
	mode     int64
	uid      int
	link     string
	body     string
	mtime    time.Time
	xattrCap string
}

func readTar(t *testing.T, b []byte) []entry {
	t.Helper()
	var out []entry
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		if h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: owner names %q/%q", h.Name, h.Uname, h.Gname)
		}
		if !h.AccessTime.IsZero() || !h.ChangeTime.IsZero() {
			t.Errorf("%s: access/change times recorded", h.Name)
		}
		out = append(out, entry{name: h.Name, typ: h.Typeflag, mode: h.Mode & 0o7777, uid: h.Uid, link: h.Linkname,
			body: string(body), mtime: h.ModTime, xattrCap: h.PAXRecords["SCHILY.xattr.security.capability"]})
	}
}

// TestWriteUpperTar builds an overlay-style upper dir by hand (whiteout
// devices and opaque xattrs need root) and checks the layer.
func TestWriteUpperTar(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: whiteouts are 0/0 character devices and opaque dirs carry trusted.* xattrs")
	}
	up := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(up, "usr/lib"), 0o755))
	must(os.WriteFile(filepath.Join(up, "usr/lib/b.so"), []byte("b"), 0o755))
	must(os.WriteFile(filepath.Join(up, "usr/lib/a.so"), []byte("a"), 0o644))
	must(os.Link(filepath.Join(up, "usr/lib/a.so"), filepath.Join(up, "usr/lib/z.so")))
	must(os.Symlink("a.so", filepath.Join(up, "usr/lib/link.so")))
	must(unix.Mknod(filepath.Join(up, "usr/gone"), unix.S_IFCHR, 0))
	must(os.MkdirAll(filepath.Join(up, "var/cache"), 0o700))
	must(os.Chown(filepath.Join(up, "var/cache"), 1000, 1000))
	must(unix.Setxattr(filepath.Join(up, "var/cache"), "trusted.overlay.opaque", []byte("y"), 0))
	must(os.WriteFile(filepath.Join(up, "ping"), []byte("elf"), 0o755))
	must(unix.Setxattr(filepath.Join(up, "ping"), "security.capability", []byte{1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 0))
	// Mount points of the build container are not part of the layer.
	must(os.MkdirAll(filepath.Join(up, "proc"), 0o755))
	must(os.MkdirAll(filepath.Join(up, "etc"), 0o755))
	must(os.WriteFile(filepath.Join(up, "etc/resolv.conf"), nil, 0o644))
	must(os.WriteFile(filepath.Join(up, "etc/motd"), []byte("hi"), 0o644))
	must(unix.Mkfifo(filepath.Join(up, "fifo"), 0o644))
	old := time.Unix(100, 0)
	must(os.Chtimes(filepath.Join(up, "etc/motd"), old, old))

	epoch := time.Unix(1000, 0).UTC()
	var buf bytes.Buffer
	must(writeUpperTar(up, &buf, epoch))
	got := readTar(t, buf.Bytes())
	var names []string
	for _, e := range got {
		names = append(names, e.name)
		want := epoch
		if e.name == "etc/motd" {
			want = old.UTC() // older than the epoch: kept
		}
		if !e.mtime.Equal(want) {
			t.Errorf("%s: mtime %v, want %v", e.name, e.mtime, want)
		}
	}
	wantNames := []string{"etc/", "etc/motd", "fifo", "ping", "usr/", "usr/.wh.gone", "usr/lib/", "usr/lib/a.so", "usr/lib/b.so",
		"usr/lib/link.so", "usr/lib/z.so", "var/", "var/cache/", "var/cache/.wh..wh..opq"}
	if !slices.Equal(names, wantNames) {
		t.Fatalf("entries\n got %q\nwant %q", names, wantNames)
	}
	byName := map[string]entry{}
	for _, e := range got {
		byName[e.name] = e
	}
	if e := byName["usr/lib/z.so"]; e.typ != tar.TypeLink || e.link != "usr/lib/a.so" {
		t.Errorf("hard link: %+v", e)
	}
	if e := byName["usr/lib/link.so"]; e.typ != tar.TypeSymlink || e.link != "a.so" {
		t.Errorf("symlink: %+v", e)
	}
	if e := byName["usr/lib/b.so"]; e.mode != 0o755 || e.body != "b" {
		t.Errorf("file: %+v", e)
	}
	if e := byName["var/cache/"]; e.uid != 1000 || e.mode != 0o700 {
		t.Errorf("owner and mode kept as they are: %+v", e)
	}
	if e := byName["ping"]; e.xattrCap == "" {
		t.Error("security.capability xattr dropped")
	}
	if e := byName["fifo"]; e.typ != tar.TypeFifo {
		t.Errorf("fifo: %+v", e)
	}
	// Same input, same bytes.
	var again bytes.Buffer
	must(writeUpperTar(up, &again, epoch))
	if !bytes.Equal(buf.Bytes(), again.Bytes()) {
		t.Error("two diffs of the same upper dir differ")
	}
}

func tarOf(t *testing.T, hs ...*tar.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range hs {
		body := h.Linkname
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
			h.Linkname = ""
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

func TestWriteCopyLayer(t *testing.T) {
	epoch := time.Unix(0, 0).UTC()
	cases := []struct {
		name    string
		content []byte
		dst     string
		isDir   bool
		mode    uint32
		want    []entry // name, typ, mode, body, link
		wantErr string
	}{
		{name: "file", content: []byte("x"), dst: "/app/a.py", mode: 0o600,
			want: []entry{{name: "app/a.py", typ: tar.TypeReg, mode: 0o644, body: "x"}}},
		{name: "executable file", content: []byte("#!"), dst: "/usr/local/bin/tool", mode: 0o700,
			want: []entry{{name: "usr/local/bin/tool", typ: tar.TypeReg, mode: 0o755, body: "#!"}}},
		{name: "directory", dst: "/srv/tree", isDir: true, content: tarOf(t,
			&tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o700},
			&tar.Header{Name: "a.txt", Typeflag: tar.TypeReg, Mode: 0o600, Uid: 1000, Linkname: "A", ModTime: time.Now()},
			&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o700},
			&tar.Header{Name: "bin/run", Typeflag: tar.TypeReg, Mode: 0o744, Linkname: "R"},
			&tar.Header{Name: "bin/l", Typeflag: tar.TypeSymlink, Linkname: "run"}),
			want: []entry{
				{name: "srv/tree/a.txt", typ: tar.TypeReg, mode: 0o644, body: "A"},
				{name: "srv/tree/bin/", typ: tar.TypeDir, mode: 0o755},
				{name: "srv/tree/bin/run", typ: tar.TypeReg, mode: 0o755, body: "R"},
				{name: "srv/tree/bin/l", typ: tar.TypeSymlink, mode: 0o777, link: "run"},
			}},
		{name: "empty directory", dst: "/data", isDir: true, content: tarOf(t),
			want: []entry{{name: "data/", typ: tar.TypeDir, mode: 0o755}}},
		{name: "escape", dst: "/x", isDir: true, content: tarOf(t, &tar.Header{Name: "../etc/passwd", Typeflag: tar.TypeReg}), wantErr: "escapes"},
		{name: "absolute", dst: "/x", isDir: true, content: tarOf(t, &tar.Header{Name: "/etc/passwd", Typeflag: tar.TypeReg}), wantErr: "escapes"},
		{name: "whiteout name", dst: "/x", isDir: true, content: tarOf(t, &tar.Header{Name: ".wh.secret", Typeflag: tar.TypeReg}), wantErr: "whiteout"},
		{name: "device", dst: "/x", isDir: true, content: tarOf(t, &tar.Header{Name: "null", Typeflag: tar.TypeChar}), wantErr: "not a file"},
		{name: "file onto /", content: []byte("x"), dst: "/", wantErr: "cannot replace /"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := writeCopyLayer(&buf, bytes.NewReader(c.content), c.dst, c.isDir, c.mode, epoch, t.TempDir())
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) || !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("err %v, want ErrInvalidArgument with %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := readTar(t, buf.Bytes())
			if len(got) != len(c.want) {
				t.Fatalf("entries %+v, want %+v", got, c.want)
			}
			for i, g := range got {
				w := c.want[i]
				if g.name != w.name || g.typ != w.typ || g.mode != w.mode || g.body != w.body || g.link != w.link || g.uid != 0 || !g.mtime.Equal(epoch) {
					t.Errorf("entry %d: %+v, want %+v (uid 0, mtime epoch)", i, g, w)
				}
			}
		})
	}
}

// FuzzWriteCopyLayer: arbitrary directory content never panics, never
// escapes dst, and errors are classified.
func FuzzWriteCopyLayer(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("not a tar"))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "a/b", Typeflag: tar.TypeReg, Size: 1})
	tw.Write([]byte("x"))
	tw.WriteHeader(&tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "../../etc"})
	tw.Close()
	f.Add(buf.Bytes())
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, content []byte) {
		var out bytes.Buffer
		err := writeCopyLayer(&out, bytes.NewReader(content), "/dst", true, 0, time.Unix(0, 0), dir)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		tr := tar.NewReader(&out)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				t.Fatalf("output is not a tar: %v", err)
			}
			if h.Name != "dst/" && !strings.HasPrefix(h.Name, "dst/") {
				t.Fatalf("entry %q outside dst", h.Name)
			}
		}
	})
}
