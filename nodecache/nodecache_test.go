package nodecache

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/testca"
	"github.com/chalkcompute/chalkcompute/registry"
)

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: extracting whiteouts creates 0/0 device nodes and trusted.* xattrs")
	}
}

func newRegistry(t testing.TB) *registry.Registry {
	t.Helper()
	r, err := registry.New(context.Background(), registry.Config{RootDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// newCache opens a cache at root (a temp dir if "") that pulls from reg with
// its read-only credential, as chalkd's does.
func newCache(t testing.TB, reg *registry.Registry, root string, max int64) *Cache {
	t.Helper()
	if root == "" {
		root = t.TempDir()
	}
	c, err := New(Config{Root: root, MaxBytes: max, Remote: reg.PullOptions()})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

// file is a tar entry; a name ending in "/" is a directory.
type file struct {
	name, body string
}

func tarBytes(t testing.TB, files ...file) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: 0o644, Typeflag: tar.TypeReg, Size: int64(len(f.body))}
		if strings.HasSuffix(f.name, "/") {
			h = &tar.Header{Name: f.name, Mode: 0o755, Typeflag: tar.TypeDir}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, f.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type layerKind int

const (
	gzipLayer layerKind = iota
	zstdLayer
	plainTarLayer
)

func (k layerKind) String() string { return [...]string{"gzip", "zstd", "uncompressed"}[k] }

func makeLayer(t testing.TB, kind layerKind, files ...file) v1.Layer {
	t.Helper()
	b := tarBytes(t, files...)
	if kind == plainTarLayer {
		return static.NewLayer(b, types.OCIUncompressedLayer)
	}
	opts := []tarball.LayerOption{tarball.WithMediaType(types.OCILayer)}
	if kind == zstdLayer {
		opts = []tarball.LayerOption{tarball.WithMediaType(types.OCILayerZStd), tarball.WithCompression(compression.ZStd)}
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// pushImage pushes an image of layers (base first) as ref and returns a
// tag reference and a digest reference to it.
func pushImage(t testing.TB, r *registry.Registry, ref string, layers ...v1.Layer) (name.Reference, name.Digest) {
	t.Helper()
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layers...)
	if err != nil {
		t.Fatal(err)
	}
	return pushV1(t, r, ref, img)
}

func pushV1(t testing.TB, r *registry.Registry, ref string, img v1.Image) (name.Reference, name.Digest) {
	t.Helper()
	local, err := r.LocalRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(local, img, r.RemoteOptions(context.Background())...); err != nil {
		t.Fatalf("push %s: %v", local, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return local, local.Context().Digest(d.String())
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestEnsureCompressions(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	for _, kind := range []layerKind{gzipLayer, zstdLayer, plainTarLayer} {
		t.Run(kind.String(), func(t *testing.T) {
			c := newCache(t, reg, "", 0)
			content := "hello " + kind.String()
			tag, dig := pushImage(t, reg, "test/"+kind.String()+":v1", makeLayer(t, kind, file{"etc/", ""}, file{"etc/greeting", content}))
			img, err := c.Ensure(t.Context(), tag, nil)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if img.Digest != dig.DigestStr() || img.Warm || len(img.Layers) != 1 {
				t.Fatalf("image = %+v, want digest %s, cold, 1 layer", img, dig.DigestStr())
			}
			if img.BytesPulled != img.Layers[0].Size || img.BytesPulled == 0 {
				t.Errorf("BytesPulled = %d, want the layer size %d", img.BytesPulled, img.Layers[0].Size)
			}
			if got := readFile(t, filepath.Join(img.Layers[0].Dir, "etc/greeting")); got != content {
				t.Errorf("extracted content = %q, want %q", got, content)
			}
			if _, err := os.Stat(c.blobPath(img.Layers[0].Digest)); err != nil {
				t.Errorf("blob not kept: %v", err)
			}
		})
	}
}

// TestEnsureFromRemoteRegistryOverTLS: a node's cache pulls from a registry
// it reaches by address over HTTPS (as fleet nodes pull from the control
// plane's), with the pull credential and the CA it was given; a cache that
// trusts another CA pulls nothing.
func TestEnsureFromRemoteRegistryOverTLS(t *testing.T) {
	requireRoot(t)
	ca := testca.New(t)
	certFile, keyFile := ca.ServerFiles(t, net.ParseIP("127.0.0.1"))
	reg, err := registry.New(t.Context(), registry.Config{RootDir: t.TempDir(), TLSCertFile: certFile, TLSKeyFile: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	_, dig := pushImage(t, reg, "test/remote:v1", makeLayer(t, gzipLayer, file{"etc/", ""}, file{"etc/greeting", "over tls"}))
	ref, err := name.ParseReference(reg.Addr() + "/docker.io/test/remote:v1")
	if err != nil {
		t.Fatal(err)
	}

	opts, err := registry.RemotePullOptions(reg.Credentials().Pull, ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(Config{Root: t.TempDir(), Remote: opts})
	if err != nil {
		t.Fatal(err)
	}
	img, err := c.Ensure(t.Context(), ref, nil)
	if err != nil {
		t.Fatalf("Ensure over TLS: %v", err)
	}
	if img.Digest != dig.DigestStr() || len(img.Layers) != 1 {
		t.Fatalf("image = %+v, want %s with 1 layer", img, dig.DigestStr())
	}
	if got := readFile(t, filepath.Join(img.Layers[0].Dir, "etc/greeting")); got != "over tls" {
		t.Errorf("extracted content = %q", got)
	}

	other, err := registry.RemotePullOptions(reg.Credentials().Pull, testca.New(t).PEM)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := New(Config{Root: t.TempDir(), Remote: other})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Ensure(t.Context(), ref, nil); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Ensure trusting another CA: %v, want a certificate error", err)
	}
}

// mountOverlay mounts lowerdirs read-only with a fresh upper dir and returns
// the merged directory; the mount is removed in Cleanup.
func mountOverlay(t *testing.T, lowerdirs []string) string {
	t.Helper()
	base := t.TempDir()
	upper, work, merged := filepath.Join(base, "upper"), filepath.Join(base, "work"), filepath.Join(base, "merged")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", strings.Join(lowerdirs, ":"), upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", merged, err)
		}
	})
	return merged
}

func TestWhiteoutsInOverlay(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	base := makeLayer(t, gzipLayer,
		file{"a/", ""}, file{"a/keep", "keep"}, file{"a/gone", "gone"},
		file{"opq/", ""}, file{"opq/old", "old"}, file{"opq/sub/", ""}, file{"opq/sub/deep", "deep"},
		file{"top.txt", "v1"})
	upper := makeLayer(t, gzipLayer,
		file{"a/", ""}, file{"a/.wh.gone", ""},
		file{"opq/", ""}, file{"opq/.wh..wh..opq", ""}, file{"opq/new", "new"},
		file{"top.txt", "v2"})
	tag, _ := pushImage(t, reg, "test/whiteouts:v1", base, upper)
	img, err := c.Ensure(t.Context(), tag, nil)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	lower := img.LowerDirs()
	if len(lower) != 2 || lower[0] != img.Layers[1].Dir || lower[1] != img.Layers[0].Dir {
		t.Fatalf("LowerDirs = %v, want top-most first of %+v", lower, img.Layers)
	}
	// In the upper layer's own dir the whiteouts are in overlay form.
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(img.Layers[1].Dir, "a/gone"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("a/gone in the upper layer is not a 0/0 char device: %+v %v", st, err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(img.Layers[1].Dir, "opq"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("opq in the upper layer lacks trusted.overlay.opaque=y: %q %v", buf[:n], err)
	}

	merged := mountOverlay(t, lower)
	for _, tc := range []struct {
		path string
		want string // "" = must not exist
	}{
		{"a/keep", "keep"},
		{"a/gone", ""},
		{"opq/old", ""},
		{"opq/sub/deep", ""},
		{"opq/new", "new"},
		{"top.txt", "v2"},
	} {
		b, err := os.ReadFile(filepath.Join(merged, tc.path))
		switch {
		case tc.want == "" && !errors.Is(err, os.ErrNotExist):
			t.Errorf("%s: want absent in the merged view, got %q, %v", tc.path, b, err)
		case tc.want != "" && string(b) != tc.want:
			t.Errorf("%s = %q, %v; want %q", tc.path, b, err, tc.want)
		}
	}
	ents, err := os.ReadDir(filepath.Join(merged, "opq"))
	if err != nil || len(ents) != 1 || ents[0].Name() != "new" {
		t.Errorf("merged opq/ = %v, %v; want only new", ents, err)
	}
}

func TestEnsureWarmAndShared(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	ctx := t.Context()
	base := makeLayer(t, gzipLayer, file{"base", "b"})
	tagA, digA := pushImage(t, reg, "test/a:v1", base, makeLayer(t, gzipLayer, file{"a", "a"}))
	tagB, _ := pushImage(t, reg, "test/b:v1", base, makeLayer(t, gzipLayer, file{"b", "b"}))

	var phases []string
	a1, err := c.Ensure(ctx, tagA, func(p Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if phases[0] != "resolve" || phases[len(phases)-1] != "done" || !slices.Contains(phases, "pull") || !slices.Contains(phases, "extract") {
		t.Errorf("progress phases = %v", phases)
	}
	if c.extract.Load() != 2 {
		t.Errorf("extractions = %d, want 2", c.extract.Load())
	}
	for _, ref := range []name.Reference{tagA, digA} {
		again, err := c.Ensure(ctx, ref, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !again.Warm || again.BytesPulled != 0 {
			t.Errorf("second Ensure(%s): Warm=%v BytesPulled=%d, want warm and 0", ref, again.Warm, again.BytesPulled)
		}
		if !slices.Equal(again.LowerDirs(), a1.LowerDirs()) {
			t.Errorf("second Ensure dirs %v != %v", again.LowerDirs(), a1.LowerDirs())
		}
	}
	if got, ok := c.Lookup(digA.DigestStr()); !ok || got.Digest != a1.Digest {
		t.Errorf("Lookup(%s) = %v, %v", digA.DigestStr(), got, ok)
	}
	if _, ok := c.Lookup("sha256:" + strings.Repeat("0", 64)); ok {
		t.Error("Lookup of an unknown digest succeeded")
	}

	b, err := c.Ensure(ctx, tagB, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.Layers[0].Dir != a1.Layers[0].Dir {
		t.Errorf("shared base extracted twice: %s vs %s", b.Layers[0].Dir, a1.Layers[0].Dir)
	}
	if b.Warm || b.BytesPulled != b.Layers[1].Size {
		t.Errorf("B: Warm=%v BytesPulled=%d, want cold with only its own layer (%d)", b.Warm, b.BytesPulled, b.Layers[1].Size)
	}
	if c.extract.Load() != 3 {
		t.Errorf("extractions = %d, want 3", c.extract.Load())
	}
}

func TestEnsureConcurrent(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	var layers []v1.Layer
	for i := range 4 {
		layers = append(layers, makeLayer(t, gzipLayer, file{fmt.Sprintf("f%d", i), strings.Repeat("x", 100_000*(i+1))}))
	}
	tag, dig := pushImage(t, reg, "test/concurrent:v1", layers...)
	const n = 10
	imgs := make([]*Image, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var err error
			ref := name.Reference(tag)
			if i%2 == 1 {
				ref = dig
			}
			if imgs[i], err = c.Ensure(t.Context(), ref, nil); err != nil {
				t.Errorf("Ensure #%d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if got := c.extract.Load(); got != int64(len(layers)) {
		t.Errorf("extractions = %d, want %d (once per layer)", got, len(layers))
	}
	var pulled int64
	for _, img := range imgs {
		pulled += img.BytesPulled
		if !slices.Equal(img.LowerDirs(), imgs[0].LowerDirs()) {
			t.Errorf("different dirs: %v vs %v", img.LowerDirs(), imgs[0].LowerDirs())
		}
	}
	var total int64
	for _, l := range imgs[0].Layers {
		total += l.Size
	}
	if pulled != total {
		t.Errorf("sum of BytesPulled = %d, want the image's bytes %d counted once", pulled, total)
	}
}

// wrongDiffID reports a diffID that does not match its content.
type wrongDiffID struct{ v1.Layer }

func (wrongDiffID) DiffID() (v1.Hash, error) {
	return v1.NewHash("sha256:" + strings.Repeat("ab", 32))
}

func TestCorruptLayerRejected(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	good := makeLayer(t, gzipLayer, file{"ok", "ok"})
	bad := wrongDiffID{makeLayer(t, gzipLayer, file{"evil", "evil"})}
	tag, dig := pushImage(t, reg, "test/corrupt:v1", good, bad)
	_, err := c.Ensure(t.Context(), tag, nil)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "diffID mismatch") {
		t.Fatalf("Ensure = %v, want ErrInvalidArgument diffID mismatch", err)
	}
	if _, ok := c.Lookup(dig.DigestStr()); ok {
		t.Error("corrupt image is in the cache")
	}
	if _, err := os.Stat(c.layerDir("sha256:" + strings.Repeat("ab", 32))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("corrupt layer dir exists: %v", err)
	}
	if ents, _ := os.ReadDir(c.tmpDir()); len(ents) != 0 {
		t.Errorf("tmp not cleaned: %v", ents)
	}
}

func TestEnsureErrors(t *testing.T) {
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	missing, _ := reg.LocalRef("test/missing:v1")
	if _, err := c.Ensure(t.Context(), missing, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing image: err = %v, want ErrNotFound", err)
	}
	if _, err := New(Config{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("New without Root: %v", err)
	}
	if _, err := New(Config{Root: t.TempDir(), MaxBytes: -1}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("New with negative MaxBytes: %v", err)
	}
}

// TestForeignLayerFromRegistryOnly: a foreign (non-distributable) layer
// is read from the registry like any other; when the registry lacks its
// blob, the pull fails rather than fetching the URL the layer names (which
// go-containerregistry would do).
func TestForeignLayerFromRegistryOnly(t *testing.T) {
	requireRoot(t)
	var conns atomic.Int64
	foreign := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	foreign.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	foreign.StartTLS()
	t.Cleanup(foreign.Close)
	// A host name, not an IP literal: go-containerregistry refuses
	// loopback and private IP literals itself, but not names.
	u := "https://localhost:" + strings.TrimPrefix(foreign.Listener.Addr().String(), "127.0.0.1:") + "/layer"

	reg := newRegistry(t)
	push := func(tag, content string) (name.Digest, v1.Hash) {
		layer := makeLayer(t, gzipLayer, file{"f", content})
		img, err := mutate.Append(mutate.MediaType(empty.Image, types.OCIManifestSchema1), mutate.Addendum{
			Layer: layer, MediaType: types.OCIRestrictedLayer, URLs: []string{u},
		})
		if err != nil {
			t.Fatal(err)
		}
		_, d := pushV1(t, reg, "test/foreign:"+tag, img)
		ld, _ := layer.Digest()
		return d, ld
	}
	c := newCache(t, reg, "", 0)

	present, _ := push("present", "in the registry")
	img, err := c.Ensure(t.Context(), present, nil)
	if err != nil {
		t.Fatalf("Ensure of an image whose foreign layer is in the registry: %v", err)
	}
	if got := readFile(t, filepath.Join(img.LowerDirs()[0], "f")); got != "in the registry" {
		t.Errorf("foreign layer content %q", got)
	}

	absent, blob := push("absent", "not in the registry")
	local, _ := reg.LocalRef("test/foreign:absent")
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodDelete, "http://"+reg.Addr()+"/v2/"+local.Context().RepositoryStr()+"/blobs/"+blob.String(), nil)
	req.SetBasicAuth(reg.Credentials().Push.Username, reg.Credentials().Push.Password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("deleting the layer blob: %s", resp.Status)
	}
	if _, err := c.Ensure(t.Context(), absent, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Ensure of an image whose foreign layer is not in the registry: %v, want not found", err)
	}
	if n := conns.Load(); n != 0 {
		t.Errorf("the foreign layer's URL was fetched (%d connections)", n)
	}
}

func TestGC(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	ctx := t.Context()
	c := newCache(t, reg, "", 0)
	big := func(s string) v1.Layer { return makeLayer(t, plainTarLayer, file{s, strings.Repeat(s, 200_000)}) }
	ensure := func(ref name.Reference) *Image {
		t.Helper()
		img, err := c.Ensure(ctx, ref, nil)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	tagA, _ := pushImage(t, reg, "test/gc-a:v1", big("a"))
	tagB, _ := pushImage(t, reg, "test/gc-b:v1", big("b"))
	tagC, _ := pushImage(t, reg, "test/gc-c:v1", big("c"))
	a, b, cc := ensure(tagA), ensure(tagB), ensure(tagC)
	perImage := c.Usage() / 3

	// Under the limit: nothing to do.
	if freed, err := c.GC(ctx); err != nil || freed != 0 {
		t.Fatalf("GC under limit = %d, %v", freed, err)
	}
	// Room for one image, and A is in use: B and C go, although B was
	// used more recently than A.
	release := c.Acquire(a)
	ensure(tagB) // B is now the most recently used
	c.maxBytes = perImage
	freed, err := c.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if freed != 2*perImage {
		t.Errorf("freed %d, want %d", freed, 2*perImage)
	}
	for _, tc := range []struct {
		img  *Image
		warm bool
	}{{a, true}, {b, false}, {cc, false}} {
		if _, ok := c.Lookup(tc.img.Digest); ok != tc.warm {
			t.Errorf("after GC, %s warm = %v, want %v", tc.img.Ref, ok, tc.warm)
		}
		if _, err := os.Stat(tc.img.Layers[0].Dir); (err == nil) != tc.warm {
			t.Errorf("after GC, %s layer dir exists = %v", tc.img.Ref, err == nil)
		}
	}
	if c.Usage() != perImage {
		t.Errorf("usage = %d, want %d", c.Usage(), perImage)
	}

	// LRU among unused: B then C are used after A is released; a limit of
	// two images drops A (least recently used).
	release()
	release() // idempotent
	ensure(tagB)
	ensure(tagC)
	c.maxBytes = 2 * perImage
	if _, err := c.GC(ctx); err != nil {
		t.Fatal(err)
	}
	for img, warm := range map[string]bool{a.Digest: false, b.Digest: true, cc.Digest: true} {
		if _, ok := c.Lookup(img); ok != warm {
			t.Errorf("LRU GC: %s warm = %v, want %v", img, ok, warm)
		}
	}
	// A comes back by pulling again.
	again := ensure(tagA)
	if again.Warm || again.BytesPulled == 0 {
		t.Errorf("re-Ensure after GC: Warm=%v BytesPulled=%d, want a pull", again.Warm, again.BytesPulled)
	}
}

func TestRestartKeepsWarm(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	root := t.TempDir()
	c1 := newCache(t, reg, root, 0)
	tag, dig := pushImage(t, reg, "test/restart:v1", makeLayer(t, gzipLayer, file{"x", "x"}), makeLayer(t, gzipLayer, file{"y", "y"}))
	first, err := c1.Ensure(t.Context(), tag, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c1.Flush(); err != nil {
		t.Fatal(err)
	}
	// Simulate a crash mid-extraction and an unindexed layer.
	if err := os.MkdirAll(filepath.Join(root, "tmp", "layer-123", "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(root, "layers", "sha256", strings.Repeat("cd", 32))
	if err := os.MkdirAll(orphan, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := reg.Close(); err != nil { // the restarted cache must not need it
		t.Fatal(err)
	}

	c2 := newCache(t, reg, root, 0)
	img, ok := c2.Lookup(dig.DigestStr())
	if !ok || !slices.Equal(img.LowerDirs(), first.LowerDirs()) {
		t.Fatalf("after restart Lookup = %+v, %v", img, ok)
	}
	warm, err := c2.Ensure(t.Context(), dig, nil)
	if err != nil || !warm.Warm || warm.BytesPulled != 0 {
		t.Fatalf("after restart Ensure(digest) = %+v, %v; want warm without the registry", warm, err)
	}
	if warm.Config.RootFS.DiffIDs[1].String() != first.Layers[1].DiffID {
		t.Errorf("config not restored: %+v", warm.Config.RootFS)
	}
	if c2.Usage() != c1.Usage() {
		t.Errorf("usage after restart = %d, want %d", c2.Usage(), c1.Usage())
	}
	for _, p := range []string{orphan, filepath.Join(root, "tmp", "layer-123")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived the restart: %v", p, err)
		}
	}
	// A layer dir lost while down makes the image cold, not broken.
	if err := os.RemoveAll(first.Layers[1].Dir); err != nil {
		t.Fatal(err)
	}
	c3 := newCache(t, reg, root, 0)
	if _, ok := c3.Lookup(dig.DigestStr()); ok {
		t.Error("image with a missing layer dir is warm after restart")
	}
}

func TestEnsureIndexPicksPlatform(t *testing.T) {
	requireRoot(t)
	reg := newRegistry(t)
	c := newCache(t, reg, "", 0)
	mk := func(s string) v1.Image {
		img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), makeLayer(t, gzipLayer, file{"which", s}))
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	mine, other := mk("mine"), mk("other")
	p := registry.Platform()
	op := v1.Platform{OS: "linux", Architecture: "s390x"}
	if p.Architecture == op.Architecture {
		op.Architecture = "riscv64"
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &op}},
		mutate.IndexAddendum{Add: mine, Descriptor: v1.Descriptor{Platform: &p}})
	local, err := reg.LocalRef("test/multi:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(local, idx, reg.RemoteOptions(t.Context())...); err != nil {
		t.Fatal(err)
	}
	idxDigest, _ := idx.Digest()
	mineDigest, _ := mine.Digest()

	img, err := c.Ensure(t.Context(), local, nil)
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != mineDigest.String() {
		t.Errorf("digest = %s, want the %s image %s", img.Digest, p, mineDigest)
	}
	if got := readFile(t, filepath.Join(img.Layers[0].Dir, "which")); got != "mine" {
		t.Errorf("extracted the %q image", got)
	}
	// The index digest maps to the platform image without I/O afterwards.
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	byIndex, err := c.Ensure(t.Context(), local.Context().Digest(idxDigest.String()), nil)
	if err != nil || !byIndex.Warm || byIndex.Digest != mineDigest.String() {
		t.Errorf("Ensure(index digest) = %+v, %v; want warm %s", byIndex, err, mineDigest)
	}
}
