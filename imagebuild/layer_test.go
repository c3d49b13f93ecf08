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
