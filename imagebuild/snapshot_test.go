package imagebuild

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestSnapshotLayer: a sandbox's upper dir becomes a reproducible layer:
// the same tree gives the same bytes; chalkd's mount points (and whiteouts
// of them) and the extra excluded paths are left out; files named like
// whiteouts, fifos and sockets are not carried; setuid/setgid bits are
// dropped; a symlink to a host file stays a link; an overlay whiteout
// (0/0 char device) becomes .wh.<name>.
func TestSnapshotLayer(t *testing.T) {
	upper := t.TempDir()
	secret := filepath.Join(t.TempDir(), "secret")
	write := func(name, content string, mode os.FileMode) {
		p := filepath.Join(upper, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(secret, []byte("host secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	write("data/a.txt", "A", 0o644)
	write("usr/bin/suid", "x", 0o4755|os.ModeSetuid)
	write(".chalk/run/init.sock.txt", "no", 0o644)
	write("run/chalk/identity/token", "no", 0o644)
	write("app/mounted.py", "upload", 0o644)
	write("data/.wh.trick", "no", 0o644)
	if err := os.Symlink(secret, filepath.Join(upper, "data/link")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(upper, "data/fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	canMknod := true
	for _, wh := range []string{"bin/gone", "etc/hosts"} {
		p := filepath.Join(upper, wh)
		_ = os.MkdirAll(filepath.Dir(p), 0o755)
		if err := unix.Mknod(p, unix.S_IFCHR|0o000, 0); err != nil {
			canMknod = false
		}
	}
	layer := func() []byte {
		p, err := SnapshotLayer(upper, nil, []string{"/app/mounted.py"}, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := layer()
	if !bytes.Equal(b, layer()) {
		t.Error("the same upper gave two different layers")
	}
	got := map[string]*tar.Header{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = h
	}
	want := []string{"data/a.txt", "data/link", "usr/bin/suid"}
	if canMknod {
		want = append(want, "bin/.wh.gone")
	}
	for _, w := range want {
		if got[w] == nil {
			t.Errorf("layer lacks %s", w)
		}
	}
	for name := range got {
		for _, bad := range []string{".chalk", "run/chalk", "app/mounted.py", "data/.wh.trick", "data/fifo", "etc/hosts", "etc/.wh.hosts"} {
			if name == bad || strings.HasPrefix(name, bad+"/") {
				t.Errorf("layer carries %s", name)
			}
		}
	}
	if h := got["usr/bin/suid"]; h != nil && h.Mode&0o6000 != 0 {
		t.Errorf("setuid kept: mode %o", h.Mode)
	}
	if h := got["data/link"]; h != nil && (h.Typeflag != tar.TypeSymlink || h.Linkname != secret) {
		t.Errorf("link entry %+v", h)
	}
	if bytes.Contains(b, []byte("host secret")) {
		t.Error("the layer holds a host file's content")
	}
}

// TestSnapshotLayerSparse: a layer's file contents are bounded by the size
// of the disk the upper is on (the sandbox's tmpfs): a sparse file (1 GiB
// on a 1 MiB disk) or hard links to one file (taking one copy there, each
// carried whole) are refused with resource_exhausted naming the file, and
// nothing is left in the snapshot dir; a tree that fits is carried; no
// extended attribute (a file capability) is carried (round 8: holds). Before,
// `truncate -s 1T` in a sandbox wrote a terabyte of zeros to the node's
// disk at its snapshot (and into chalkd's memory at a build step).
func TestSnapshotLayerSparse(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts a tmpfs: needs root")
	}
	disk := func(t *testing.T) string {
		dir := t.TempDir()
		if err := unix.Mount("chalktest-disk", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
		return dir
	}
	t.Run("sparse", func(t *testing.T) {
		upper, out := disk(t), t.TempDir()
		if err := os.WriteFile(filepath.Join(upper, "small"), bytes.Repeat([]byte("s"), 100<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(filepath.Join(upper, "zeros"))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(1 << 30); err != nil {
			t.Fatal(err)
		}
		f.Close()
		_, err = SnapshotLayer(upper, nil, nil, out)
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "/zeros: 1073741824 bytes") {
			t.Fatalf("a sparse 1 GiB file on a 1 MiB disk: %v, want resource exhausted naming /zeros", err)
		}
		if ents, _ := os.ReadDir(out); len(ents) != 0 {
			t.Fatalf("left in the snapshot dir: %v", ents)
		}
	})
	t.Run("hard links", func(t *testing.T) {
		upper := disk(t)
		if err := os.WriteFile(filepath.Join(upper, "a"), bytes.Repeat([]byte("a"), 400<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, l := range []string{"b", "c", "d"} {
			if err := os.Link(filepath.Join(upper, "a"), filepath.Join(upper, l)); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := SnapshotLayer(upper, nil, nil, t.TempDir()); !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "/c: 409600 bytes") {
			t.Fatalf("four links to 400 KiB on a 1 MiB disk: %v, want resource exhausted at /c", err)
		}
	})
	t.Run("xattrs", func(t *testing.T) {
		// File capabilities and other extended attributes are not carried
		// (the layer is extracted as root on the node).
		upper := disk(t)
		f := filepath.Join(upper, "capped")
		if err := os.WriteFile(f, []byte("x"), 0o755); err != nil {
			t.Fatal(err)
		}
		// A v2 file capability blob: CAP_SYS_ADMIN permitted and effective.
		capBlob := []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x00, 0x20, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		if err := unix.Setxattr(f, "security.capability", capBlob, 0); err != nil {
			t.Fatal(err)
		}
		if err := unix.Setxattr(f, "trusted.chalk", []byte("y"), 0); err != nil {
			t.Fatal(err)
		}
		p, err := SnapshotLayer(upper, nil, nil, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		lf, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer lf.Close()
		tr := tar.NewReader(lf)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(h.PAXRecords) != 0 || len(h.Xattrs) != 0 {
				t.Fatalf("%s carries %v %v", h.Name, h.PAXRecords, h.Xattrs)
			}
		}
	})
	t.Run("fits", func(t *testing.T) {
		upper := disk(t)
		if err := os.WriteFile(filepath.Join(upper, "a"), bytes.Repeat([]byte("a"), 400<<10), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(upper, "a"), filepath.Join(upper, "b")); err != nil {
			t.Fatal(err)
		}
		p, err := SnapshotLayer(upper, nil, nil, t.TempDir())
		if err != nil {
			t.Fatalf("two links to 400 KiB on a 1 MiB disk: %v", err)
		}
		if st, err := os.Stat(p); err != nil || st.Size() < 800<<10 {
			t.Fatalf("layer: %v %v", st, err)
		}
	})
}
