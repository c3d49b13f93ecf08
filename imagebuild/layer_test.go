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

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/tartest"
)

// TestContextLayerRefusesDevices: a build context (an API user's upload)
// with a device node or fifo makes no layer: layers are extracted on the host.
func TestContextLayerRefusesDevices(t *testing.T) {
	for _, typ := range []byte{tar.TypeChar, tar.TypeBlock, tar.TypeFifo} {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		if err := tw.WriteHeader(&tar.Header{Name: "dir/sda", Typeflag: typ, Mode: 0o666, Devmajor: 8}); err != nil {
			t.Fatal(err)
		}
		tw.Close()
		if _, err := contextLayer(&buf, []string{"dir"}, "/x/"); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("type %q: %v, want invalid argument", typ, err)
		}
	}
}

// TestDiffUpperKeepsLinks: a symlink a build left in its upper dir, even
// to a host file, becomes a symlink entry; the host file is never read.
func TestDiffUpperKeepsLinks(t *testing.T) {
	upper := t.TempDir()
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("host secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(upper, "link")); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := diffUpper(upper, idShift{}, &buf); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&buf)
	h, err := tr.Next()
	if err != nil || h.Typeflag != tar.TypeSymlink || h.Linkname != secret {
		t.Fatalf("entry %+v, %v: want the symlink", h, err)
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Fatalf("more entries: %v", err)
	}
	if strings.Contains(buf.String(), "host secret") {
		t.Fatal("the layer holds the host file's content")
	}
}

// TestCopyLayerSparseBomb: an upload copied into an image (a directory's
// tar, a Dockerfile's build context) is the API user's: a 1.5 KB tar whose
// sparse entry reads as 100 GiB is refused with resource_exhausted after
// reading no more than the archive holds (before, io.ReadAll held the
// whole expanded entry in chalkd's memory).
func TestCopyLayerSparseBomb(t *testing.T) {
	bomb := tartest.SparseBomb(100 << 30)
	if _, err := copyLayer(bytes.NewReader(bomb), "/x", true, 0); !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), `entry "big"`) {
		t.Errorf("copy of a directory: %v, want resource exhausted naming big", err)
	}
	if _, err := contextLayer(bytes.NewReader(bomb), []string{"."}, "/x/"); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("build context: %v, want resource exhausted", err)
	}
	// An ordinary archive is read whole.
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range []string{"a", "b"} {
		tw.WriteHeader(&tar.Header{Name: "d/" + n, Typeflag: tar.TypeReg, Mode: 0o644, Size: 3 << 10})
		tw.Write(bytes.Repeat([]byte(n), 3<<10))
	}
	tw.Close()
	for _, f := range []func() ([]byte, error){
		func() ([]byte, error) { return copyLayer(bytes.NewReader(buf.Bytes()), "/x", true, 0) },
		func() ([]byte, error) { return contextLayer(bytes.NewReader(buf.Bytes()), []string{"d"}, "/x/") },
	} {
		layer, err := f()
		if err != nil || !bytes.Contains(layer, bytes.Repeat([]byte("b"), 3<<10)) {
			t.Fatalf("an ordinary archive: %v", err)
		}
	}
}

// TestContextLayerEscapes: a build context's entry named outside it
// ("../x", "/x") or a COPY source outside it ("..", "../x") is refused,
// invalid argument, instead of becoming a layer entry named "../etc/x"
// (the cache's extraction confines it, but a layer is also pulled by
// other clients as it is).
func TestContextLayerEscapes(t *testing.T) {
	ctx := func(name string) *bytes.Reader {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		tw.WriteHeader(&tar.Header{Name: "ok", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1})
		tw.Write([]byte("x"))
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: 1})
		tw.Write([]byte("x"))
		tw.Close()
		return bytes.NewReader(buf.Bytes())
	}
	for _, name := range []string{"../../etc/cron.d/x", "/etc/passwd", "a/../../x"} {
		if _, err := contextLayer(ctx(name), []string{"."}, "/app/"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "escapes the context") {
			t.Errorf("entry %q: %v, want invalid argument", name, err)
		}
	}
	for _, src := range []string{"..", "../x", "x/../.."} {
		if _, err := contextLayer(ctx("x/y"), []string{src}, "/app/"); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "outside the build context") {
			t.Errorf("source %q: %v, want invalid argument", src, err)
		}
	}
	layer, err := contextLayer(ctx("x/y"), []string{"x"}, "/app/")
	if err != nil || !bytes.Contains(layer, []byte("app/y")) {
		t.Fatalf("an ordinary COPY: %v", err)
	}
}
