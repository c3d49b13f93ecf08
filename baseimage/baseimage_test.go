package baseimage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/registry"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (chroot, device-free extraction with ownership)")
	}
}

// extract applies img's layers to a fresh directory, as an overlay-less
// single rootfs.
func extract(t *testing.T, img v1.Image) string {
	t.Helper()
	dir := t.TempDir()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		_, err = archive.Apply(context.Background(), dir, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("apply layer: %v", err)
		}
	}
	return dir
}

// inChroot runs argv inside root with the image's environment.
func inChroot(t *testing.T, root string, env []string, argv ...string) string {
	t.Helper()
	cmd := &exec.Cmd{
		Path:        argv[0],
		Args:        argv,
		Env:         env,
		Dir:         "/",
		SysProcAttr: &syscall.SysProcAttr{Chroot: root},
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("chroot %s %v: %v\n%s", root, argv, err, out)
	}
	return string(out)
}

func TestBusyboxReproducible(t *testing.T) {
	ctx := t.Context()
	a, err := Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Fatalf("two builds differ: %s vs %s", da, db)
	}
	if err := validate.Image(a); err != nil {
		t.Fatalf("invalid image: %v", err)
	}

	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	c, err := Busybox(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if dc, _ := c.Digest(); dc == da {
		t.Errorf("SOURCE_DATE_EPOCH did not change the digest")
	}
	cf, _ := c.ConfigFile()
	if got := cf.Created.Unix(); got != 1700000000 {
		t.Errorf("created = %d, want SOURCE_DATE_EPOCH", got)
	}
	t.Setenv("SOURCE_DATE_EPOCH", "yesterday")
	if _, err := Busybox(ctx); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("bad SOURCE_DATE_EPOCH: err = %v, want ErrInvalidArgument", err)
	}
}

func TestBusyboxContents(t *testing.T) {
	requireRoot(t)
	img, err := Busybox(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cf.Config.Cmd, []string{"sh"}) || !slices.Contains(cf.Config.Env, "PATH="+DefaultPath) {
		t.Errorf("config = %+v, want Cmd [sh] and PATH", cf.Config)
	}
	if cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("platform = %s/%s", cf.OS, cf.Architecture)
	}
	root := extract(t, img)

	for _, tc := range []struct {
		path string
		mode os.FileMode
	}{
		{"tmp", os.ModeDir | os.ModeSticky | 0o777},
		{"root", os.ModeDir | 0o700},
		{"home", os.ModeDir | 0o755},
		{"proc", os.ModeDir | 0o755},
		{"bin/busybox", 0o755},
		{"etc/passwd", 0o644},
	} {
		fi, err := os.Lstat(filepath.Join(root, tc.path))
		if err != nil {
			t.Errorf("%s: %v", tc.path, err)
			continue
		}
		if fi.Mode() != tc.mode {
			t.Errorf("%s mode = %v, want %v", tc.path, fi.Mode(), tc.mode)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s owned by %d:%d, want 0:0", tc.path, st.Uid, st.Gid)
		}
	}
	if target, err := os.Readlink(filepath.Join(root, "bin/sh")); err != nil || target != "busybox" {
		t.Errorf("bin/sh -> %q, %v; want busybox", target, err)
	}
	passwd, _ := os.ReadFile(filepath.Join(root, "etc/passwd"))
	if !strings.HasPrefix(string(passwd), "root:x:0:0:") || !strings.Contains(string(passwd), "\nnobody:x:65534:") {
		t.Errorf("etc/passwd = %q", passwd)
	}

	if got := inChroot(t, root, cf.Config.Env, "/bin/sh", "-c", "echo ok"); got != "ok\n" {
		t.Errorf("sh -c 'echo ok' = %q", got)
	}
	// Applets resolve through PATH.
	if got := inChroot(t, root, cf.Config.Env, "/bin/sh", "-c", "id -u; ls / | wc -l"); !strings.HasPrefix(got, "0\n") {
		t.Errorf("id/ls = %q", got)
	}
}

func TestSeedIdempotent(t *testing.T) {
	reg, err := registry.New(t.Context(), registry.Config{RootDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := Busybox(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	for i := range 2 {
		d, err := Seed(t.Context(), reg, "docker.io/library/busybox:latest", img)
		if err != nil {
			t.Fatalf("Seed #%d: %v", i, err)
		}
		if d != want.String() {
			t.Errorf("Seed #%d = %s, want %s", i, d, want)
		}
	}
	ref, h, err := reg.Resolve(t.Context(), "busybox")
	if err != nil || h != want {
		t.Fatalf("Resolve(busybox) = %v, %s, %v", ref, h, err)
	}
	pulled, err := remote.Image(ref, reg.RemoteOptions(t.Context())...)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(pulled); err != nil {
		t.Errorf("seeded image invalid: %v", err)
	}
	// Seeding another image replaces the tag (immutable to plain pushes).
	other, err := mutate.AppendLayers(img, static.NewLayer([]byte("upgraded"), types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	otherDigest, _ := other.Digest()
	if d, err := Seed(t.Context(), reg, "docker.io/library/busybox:latest", other); err != nil || d != otherDigest.String() {
		t.Fatalf("Seed(another image) = %s, %v; want %s", d, err, otherDigest)
	}
	if _, h, err := reg.Resolve(t.Context(), "busybox"); err != nil || h != otherDigest {
		t.Errorf("after re-seeding Resolve(busybox) = %s, %v; want %s", h, err, otherDigest)
	}
	if _, err := Seed(t.Context(), reg, "Not A Ref", img); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Seed(bad ref) = %v, want ErrInvalidArgument", err)
	}
}

func TestMirrorParsing(t *testing.T) {
	for _, tc := range []struct {
		name, text, want string
		deb822           bool
	}{
		{"one-line", "deb http://deb.debian.org/debian bookworm main\n", "http://deb.debian.org/debian", false},
		{"one-line options", "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n", "http://m.example/debian", false},
		{"one-line other suite", "deb http://deb.debian.org/debian-security bookworm-security main\n", "", false},
		{"deb-src ignored", "deb-src http://x/debian bookworm main\n", "", false},
		{"deb822", "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n", "http://deb.debian.org/debian", true},
		{"deb822 disabled", "Types: deb\nURIs: http://a/debian\nSuites: bookworm\nEnabled: no\n\nTypes: deb\nURIs: http://b/debian\nSuites: bookworm\n", "http://b/debian", true},
		{"deb822 security only", "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := mirrorFromOneLine(tc.text, "bookworm")
			if tc.deb822 {
				got = mirrorFromDeb822(tc.text, "bookworm")
			}
			if got != tc.want {
				t.Errorf("mirror = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestDpkgVersion(t *testing.T) {
	p := filepath.Join(t.TempDir(), "status")
	status := "Package: libpython3.11\nVersion: 3.11.2-6+deb12u6\n\nPackage: python3\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n\nPackage: epochy\nVersion: 2:1.0.3-4\n"
	if err := os.WriteFile(p, []byte(status), 0o644); err != nil {
		t.Fatal(err)
	}
	for pkg, want := range map[string]string{"python3": "3.11.2", "epochy": "1.0.3"} {
		if got, err := dpkgVersion(p, pkg); err != nil || got != want {
			t.Errorf("dpkgVersion(%s) = %q, %v; want %q", pkg, got, err, want)
		}
	}
	if _, err := dpkgVersion(p, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing package: err = %v", err)
	}
}

// TestPythonSlim builds the Debian Python image with debootstrap. It takes
// minutes and needs the Debian mirror, so it runs only with
// CHALK_TEST_PYTHON_SLIM=1 (CHALK_TEST_PYTHON_SLIM_CACHE keeps the cache
// between runs); the setup script builds the same image.
func TestPythonSlim(t *testing.T) {
	if os.Getenv("CHALK_TEST_PYTHON_SLIM") != "1" {
		t.Skip("slow (debootstrap from the Debian mirror, minutes): set CHALK_TEST_PYTHON_SLIM=1 to run")
	}
	requireRoot(t)
	cache := os.Getenv("CHALK_TEST_PYTHON_SLIM_CACHE")
	if cache == "" {
		cache = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(t.Context(), 45*time.Minute)
	defer cancel()
	start := time.Now()
	img, err := PythonSlim(ctx, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	d1, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	size, _ := img.Layers()
	var bytes int64
	for _, l := range size {
		n, _ := l.Size()
		bytes += n
	}
	t.Logf("first PythonSlim: %s, digest %s, compressed layers %d MB", first.Round(time.Second), d1, bytes>>20)

	start = time.Now()
	again, err := PythonSlim(ctx, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	d2, _ := again.Digest()
	if d2 != d1 {
		t.Errorf("cached build digest %s != first %s", d2, d1)
	}
	t.Logf("cached PythonSlim: %s", time.Since(start).Round(time.Millisecond))

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"PIP_BREAK_SYSTEM_PACKAGES=1", "PATH=" + DefaultPath} {
		if !slices.Contains(cf.Config.Env, want) {
			t.Errorf("env %v lacks %s", cf.Config.Env, want)
		}
	}
	if !slices.ContainsFunc(cf.Config.Env, func(s string) bool { return strings.HasPrefix(s, "PYTHON_VERSION=3.") }) {
		t.Errorf("env %v lacks PYTHON_VERSION", cf.Config.Env)
	}
	if !slices.Equal(cf.Config.Cmd, []string{"python3"}) {
		t.Errorf("cmd = %v", cf.Config.Cmd)
	}
	root := extract(t, img)
	out := inChroot(t, root, cf.Config.Env, "/bin/sh", "-c", "python -c 'import ssl, venv, sys; print(sys.version_info[0])' && pip --version && python3 -m venv /tmp/v && /tmp/v/bin/python -c 'print(42)'")
	if !strings.HasPrefix(out, "3\n") || !strings.Contains(out, "pip ") || !strings.HasSuffix(out, "42\n") {
		t.Errorf("python/pip/venv check output:\n%s", out)
	}
}
