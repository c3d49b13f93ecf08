package builder

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/images"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
)

// requireRunc skips tests that need root, overlayfs and runc.
func requireRunc(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: build steps mount overlayfs and run runc")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("needs the runc binary")
	}
	if _, err := os.Stat(baseimage.BusyboxPath); err != nil {
		t.Skip("needs " + baseimage.BusyboxPath + " for the busybox base image")
	}
}

// memBlobs is an in-memory Blobs: uploaded content by sha256 digest.
type memBlobs struct {
	mu sync.Mutex
	m  map[string][]byte
}

var _ Blobs = (*memBlobs)(nil)

func (m *memBlobs) Put(b []byte) string {
	sum := sha256.Sum256(b)
	d := "sha256:" + hex.EncodeToString(sum[:])
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		m.m = map[string][]byte{}
	}
	m.m[d] = bytes.Clone(b)
	return d
}

func (m *memBlobs) Open(_ context.Context, d string) (io.ReadCloser, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.m[d]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// emptyNetns gives each RUN step a fresh network namespace with no uplink
// (real namespaces, never the real network) and counts attaches.
type emptyNetns struct {
	t        testing.TB
	attaches atomic.Int32
	resolv   string
	// serve, if set, is served on 127.0.0.1:indexPort inside each namespace
	// (loopback up): a package index the RUN step reaches over loopback.
	serve http.Handler
}

const indexPort = "8765"

var _ Network = (*emptyNetns)(nil)

func (n *emptyNetns) Attach(_ context.Context, id string) (string, []byte, func(), error) {
	n.attaches.Add(1)
	name := "cbt-" + id[len(idPrefix):]
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return "", nil, nil, err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	var ln net.Listener
	if err == nil {
		if n.serve != nil {
			ln, err = listenIn(h)
		}
		h.Close()
	}
	if serr := netns.Set(orig); serr != nil {
		// Leave the thread locked: it dies with this goroutine instead of
		// running others in the wrong namespace.
		return "", nil, nil, fmt.Errorf("restore network namespace: %w", serr)
	}
	runtime.UnlockOSThread()
	if err != nil {
		return "", nil, nil, err
	}
	var srv *http.Server
	if ln != nil {
		srv = &http.Server{Handler: n.serve}
		go srv.Serve(ln)
	}
	var once sync.Once
	detach := func() {
		once.Do(func() {
			if srv != nil {
				srv.Close()
			}
			_ = netns.DeleteNamed(name)
		})
	}
	n.t.Cleanup(detach)
	return "/var/run/netns/" + name, []byte(n.resolv), detach, nil
}

// env is a registry with the busybox base, a node cache and a builder.
type env struct {
	reg     *registry.Registry
	cache   *nodecache.Cache
	b       *Builder
	blobs   *memBlobs
	net     *emptyNetns
	busybox string // digest of the seeded busybox image
}

func newEnv(t testing.TB) *env {
	t.Helper()
	requireRunc(t)
	ctx := context.Background()
	reg, err := registry.New(ctx, registry.Config{RootDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := baseimage.Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d, err := baseimage.Seed(ctx, reg, "busybox", img)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := nodecache.New(nodecache.Config{Root: shortDir(t, "nc")})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{reg: reg, cache: cache, blobs: &memBlobs{}, net: &emptyNetns{t: t, resolv: "nameserver 203.0.113.53\n"}, busybox: d}
	e.b = e.newBuilder(t)
	return e
}

func (e *env) newBuilder(t testing.TB) *Builder {
	t.Helper()
	b, err := New(Config{
		Registry: e.reg, Layers: e.cache, Network: e.net, Blobs: e.blobs,
		WorkDir: shortDir(t, "wd"), RuncRoot: shortDir(t, "rr"),
		Env:      []string{"PIP_INDEX_URL=http://198.51.100.7/simple", "FROM_NODE=node"},
		Defaults: images.Defaults{PythonVersion: "3.11"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// shortDir is a fresh directory with a short path (overlay mount options
// are limited to a page), removed after the test.
func shortDir(t testing.TB, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "cb"+prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// readFile reads p from an image's layers as a container would see it.
func readFile(t testing.TB, img *nodecache.Image, p string) (string, bool) {
	t.Helper()
	for _, dir := range img.LowerDirs() { // top-most first
		full := filepath.Join(dir, p)
		fi, err := os.Lstat(full)
		if err != nil {
			continue
		}
		if fi.Mode()&os.ModeCharDevice != 0 {
			return "", false // whited out
		}
		b, err := os.ReadFile(full)
		if err != nil {
			t.Fatal(err)
		}
		return string(b), true
	}
	return "", false
}

func (e *env) ensure(t testing.TB, r *Result) *nodecache.Image {
	t.Helper()
	ref, err := name.NewDigest(r.Ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := e.cache.Ensure(context.Background(), ref, nil)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// listenIn brings loopback up in ns (the calling thread is in it) and
// listens on 127.0.0.1:indexPort there.
func listenIn(ns netns.NsHandle) (net.Listener, error) {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return nil, err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return nil, err
	}
	return net.Listen("tcp", "127.0.0.1:"+indexPort)
}
