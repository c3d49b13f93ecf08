package registry

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func newTestRegistry(t *testing.T, cfg Config) *Registry {
	t.Helper()
	if cfg.RootDir == "" {
		cfg.RootDir = t.TempDir()
	}
	r, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

func randomImage(t *testing.T) v1.Image {
	t.Helper()
	img, err := random.Image(1024, 2)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func push(t *testing.T, r *Registry, ref string, img v1.Image) v1.Hash {
	t.Helper()
	local, err := r.LocalRef(ref)
	if err != nil {
		t.Fatalf("LocalRef(%q): %v", ref, err)
	}
	if err := remote.Write(local, img, r.RemoteOptions(t.Context())...); err != nil {
		t.Fatalf("push %s: %v", local, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestLocalRef(t *testing.T) {
	r := newTestRegistry(t, Config{})
	a := r.Addr()
	dg := "sha256:" + strings.Repeat("ab", 32)
	for _, tc := range []struct{ in, want string }{
		{"busybox", a + "/docker.io/library/busybox:latest"},
		{"busybox:1.36", a + "/docker.io/library/busybox:1.36"},
		{"docker.io/library/busybox:latest", a + "/docker.io/library/busybox:latest"},
		{"index.docker.io/library/busybox", a + "/docker.io/library/busybox:latest"},
		{"python:3.11-slim-bookworm", a + "/docker.io/library/python:3.11-slim-bookworm"},
		{"ghcr.io/org/x:tag", a + "/ghcr.io/org/x:tag"},
		{"nvcr.io/nvidia/pytorch:24.01-py3", a + "/nvcr.io/nvidia/pytorch:24.01-py3"},
		{"localhost:5000/team/app:v2", a + "/localhost_5000/team/app:v2"},
		{"x@" + dg, a + "/docker.io/library/x@" + dg},
		{a + "/docker.io/library/busybox:latest", a + "/docker.io/library/busybox:latest"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := r.LocalRef(tc.in)
			if err != nil {
				t.Fatalf("LocalRef: %v", err)
			}
			if got.String() != tc.want {
				t.Errorf("LocalRef(%q) = %q, want %q", tc.in, got, tc.want)
			}
			if got.Context().Registry.Scheme() != "http" {
				t.Errorf("scheme = %q, want http for the loopback registry", got.Context().Registry.Scheme())
			}
		})
	}
}

func TestResolveRoundTrip(t *testing.T) {
	r := newTestRegistry(t, Config{})
	ctx := t.Context()
	for _, ref := range []string{"busybox", "python:3.11-slim-bookworm", "ghcr.io/org/x:tag", "nvcr.io/nvidia/pytorch:24.01-py3"} {
		t.Run(ref, func(t *testing.T) {
			img := randomImage(t)
			want := push(t, r, ref, img)
			got, h, err := r.Resolve(ctx, ref)
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			if h != want {
				t.Errorf("digest = %s, want %s", h, want)
			}
			if !strings.HasPrefix(got.String(), r.Addr()+"/") {
				t.Errorf("resolved %q is not in the embedded registry", got)
			}
			pulled, err := remote.Image(got, r.RemoteOptions(ctx)...)
			if err != nil {
				t.Fatalf("pull: %v", err)
			}
			if err := validate.Image(pulled); err != nil {
				t.Fatalf("pulled image invalid: %v", err)
			}
			if d, _ := pulled.Digest(); d != want {
				t.Errorf("pulled digest %s, want %s", d, want)
			}
			// By digest, the same image.
			byDigest := strings.SplitN(ref, ":", 2)[0] + "@" + want.String()
			if strings.Count(ref, ":") == 0 {
				byDigest = ref + "@" + want.String()
			}
			if _, h2, err := r.Resolve(ctx, byDigest); err != nil || h2 != want {
				t.Errorf("Resolve(%q) = %s, %v; want %s", byDigest, h2, err, want)
			}
		})
	}
}

func TestResolveErrors(t *testing.T) {
	r := newTestRegistry(t, Config{})
	for _, tc := range []struct {
		ref  string
		want error
	}{
		{"", errdefs.ErrInvalidArgument},
		{" busybox", errdefs.ErrInvalidArgument},
		{"Busybox", errdefs.ErrInvalidArgument},
		{"busybox:", errdefs.ErrInvalidArgument},
		{"busybox@sha256:notahex", errdefs.ErrInvalidArgument},
		{"a/b/c:tag with space", errdefs.ErrInvalidArgument},
		{"ghcr.io/org/x:" + strings.Repeat("t", 200), errdefs.ErrInvalidArgument},
		{"nosuchimage", errdefs.ErrNotFound},
		{"nvcr.io/nvidia/pytorch:24.01-py3", errdefs.ErrNotFound},
		{"busybox@sha256:" + strings.Repeat("0", 64), errdefs.ErrNotFound},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			_, _, err := r.Resolve(t.Context(), tc.ref)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Resolve(%q) error = %v, want %v", tc.ref, err, tc.want)
			}
			if tc.ref != "" && !strings.Contains(err.Error(), tc.ref) {
				t.Errorf("error %q does not name the reference %q", err, tc.ref)
			}
		})
	}
}

func TestListAndDelete(t *testing.T) {
	r := newTestRegistry(t, Config{})
	ctx := t.Context()
	a, b := randomImage(t), randomImage(t)
	da := push(t, r, "busybox:latest", a)
	push(t, r, "busybox:alias", a)
	db := push(t, r, "ghcr.io/org/x:v1", b)

	want := map[string]string{
		"docker.io/library/busybox:latest": da.String(),
		"docker.io/library/busybox:alias":  da.String(),
		"ghcr.io/org/x:v1":                 db.String(),
	}
	list := func() map[string]ImageInfo {
		t.Helper()
		infos, err := r.List(ctx)
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		m := map[string]ImageInfo{}
		for _, i := range infos {
			m[i.Ref] = i
		}
		return m
	}
	got := list()
	if len(got) != len(want) {
		t.Fatalf("List = %v, want refs %v", got, want)
	}
	for ref, d := range want {
		info, ok := got[ref]
		if !ok || info.Digest != d {
			t.Errorf("List[%s] = %+v, want digest %s", ref, info, d)
		}
		img := map[string]v1.Image{da.String(): a, db.String(): b}[d]
		if size := imageSize(t, img); info.Size != size {
			t.Errorf("List[%s].Size = %d, want %d", ref, info.Size, size)
		}
	}

	// Deleting a tag leaves the other tag of the same manifest.
	if err := r.Delete(ctx, "busybox:alias"); err != nil {
		t.Fatalf("Delete tag: %v", err)
	}
	if _, _, err := r.Resolve(ctx, "busybox:alias"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Resolve deleted tag: err = %v, want ErrNotFound", err)
	}
	if _, h, err := r.Resolve(ctx, "busybox:latest"); err != nil || h != da {
		t.Errorf("Resolve remaining tag = %s, %v", h, err)
	}
	// Deleting by digest removes the manifest and its tags.
	if err := r.Delete(ctx, "ghcr.io/org/x@"+db.String()); err != nil {
		t.Fatalf("Delete digest: %v", err)
	}
	if _, _, err := r.Resolve(ctx, "ghcr.io/org/x:v1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Resolve tag of deleted manifest: err = %v, want ErrNotFound", err)
	}
	got = list()
	if _, ok := got["docker.io/library/busybox:latest"]; !ok || len(got) != 1 {
		t.Errorf("List after deletes = %v, want only busybox:latest", got)
	}
	for _, ref := range []string{"busybox:alias", "nothere:v1", "ghcr.io/org/x@" + db.String()} {
		if err := r.Delete(ctx, ref); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("Delete(%q) = %v, want ErrNotFound", ref, err)
		}
	}
	if err := r.Delete(ctx, "Bad Ref"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Delete(bad) = %v, want ErrInvalidArgument", err)
	}
}

func imageSize(t *testing.T, img v1.Image) int64 {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	n := int64(len(raw)) + m.Config.Size
	for _, l := range m.Layers {
		n += l.Size
	}
	return n
}

func TestPullThrough(t *testing.T) {
	// The upstream is an anonymous registry (go-containerregistry's in-memory one).
	up := httptest.NewServer(ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(up.Close)
	upAddr := strings.TrimPrefix(up.URL, "http://")
	ctx := t.Context()

	// Upstream: a two-platform index at org/app:v1 and a plain image under a
	// path prefix at mirror/team/tool:v2.
	mine, other := randomImage(t), randomImage(t)
	otherPlatform := v1.Platform{OS: "linux", Architecture: "s390x"}
	if Platform().Architecture == "s390x" {
		otherPlatform.Architecture = "riscv64"
	}
	p := Platform()
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &otherPlatform}},
		mutate.IndexAddendum{Add: mine, Descriptor: v1.Descriptor{Platform: &p}},
	)
	upIdx, _ := name.ParseReference(upAddr+"/org/app:v1", name.Insecure)
	if err := remote.WriteIndex(upIdx, idx, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	tool := randomImage(t)
	upTool, _ := name.ParseReference(upAddr+"/mirror/team/tool:v2", name.Insecure)
	if err := remote.Write(upTool, tool, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}

	r := newTestRegistry(t, Config{Upstreams: map[string]string{
		"example.com":      "http://" + upAddr,
		"tools.test":       "http://" + upAddr + "/mirror",
		"unreachable.test": "http://127.0.0.1:1",
	}})
	mineDigest, _ := mine.Digest()
	otherDigest, _ := other.Digest()
	toolDigest, _ := tool.Digest()

	// Concurrent resolves of the same ref pull once and agree.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			ref, h, err := r.Resolve(ctx, "example.com/org/app:v1")
			if err != nil {
				t.Errorf("Resolve: %v", err)
				return
			}
			if h != mineDigest {
				t.Errorf("digest = %s, want the %s child %s", h, Platform(), mineDigest)
			}
			if want := r.Addr() + "/example.com/org/app:v1"; ref.String() != want {
				t.Errorf("ref = %s, want %s", ref, want)
			}
		})
	}
	wg.Wait()
	local, _ := r.LocalRef("example.com/org/app")
	if _, err := remote.Image(local.Context().Digest(mineDigest.String()), r.RemoteOptions(ctx)...); err != nil {
		t.Errorf("node platform image not cached: %v", err)
	}
	if _, err := remote.Get(local.Context().Digest(otherDigest.String()), r.RemoteOptions(ctx)...); !errors.Is(WrapRemoteError("x", err), errdefs.ErrNotFound) {
		t.Errorf("other platform image should not be cached, got err = %v", err)
	}

	if _, h, err := r.Resolve(ctx, "tools.test/team/tool:v2"); err != nil || h != toolDigest {
		t.Errorf("Resolve with prefix = %s, %v; want %s", h, err, toolDigest)
	}
	if _, _, err := r.Resolve(ctx, "example.com/org/missing:v1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing upstream image: err = %v, want ErrNotFound", err)
	}
	if _, _, err := r.Resolve(ctx, "unreachable.test/x:v1"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("unreachable upstream: err = %v, want ErrUnavailable", err)
	}

	// Cached: works with the upstream gone.
	up.Close()
	if _, h, err := r.Resolve(ctx, "example.com/org/app:v1"); err != nil || h != mineDigest {
		t.Errorf("Resolve after upstream closed = %s, %v", h, err)
	}
}

func TestBadUpstream(t *testing.T) {
	for _, u := range []string{"ftp://x", "not a url", "https://"} {
		_, err := New(t.Context(), Config{RootDir: t.TempDir(), Upstreams: map[string]string{"docker.io": u}})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("upstream %q: err = %v, want ErrInvalidArgument", u, err)
		}
	}
	if _, err := New(t.Context(), Config{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("no RootDir: err = %v, want ErrInvalidArgument", err)
	}
}

func TestRestartKeepsImages(t *testing.T) {
	root := t.TempDir()
	r1, err := New(t.Context(), Config{RootDir: root})
	if err != nil {
		t.Fatal(err)
	}
	want := push(t, r1, "busybox", randomImage(t))
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}
	r2 := newTestRegistry(t, Config{RootDir: root})
	if _, h, err := r2.Resolve(t.Context(), "busybox"); err != nil || h != want {
		t.Errorf("after restart Resolve = %s, %v; want %s", h, err, want)
	}
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestLogsGoToInjectedLogger(t *testing.T) {
	var a, b syncBuffer
	ra := newTestRegistry(t, Config{Logger: slog.New(slog.NewTextHandler(&a, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	newTestRegistry(t, Config{Logger: slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	_, _, _ = ra.Resolve(context.Background(), "nothere")
	if !strings.Contains(a.String(), "http.request.uri=/v2/docker.io/library/nothere/manifests/latest") {
		t.Errorf("registry A's request log missing from its logger:\n%s", a.String())
	}
	if strings.Contains(b.String(), "nothere") {
		t.Errorf("registry A's request logged to registry B's logger:\n%s", b.String())
	}
}
