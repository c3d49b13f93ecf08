package imagebuild

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
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
