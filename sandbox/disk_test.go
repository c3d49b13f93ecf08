package sandbox

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
)

var (
	initOnce sync.Once
	initBin  string
	initErr  error
)

// testInit builds cmd/chalk-init (static) once per test binary.
func testInit(t *testing.T) string {
	t.Helper()
	initOnce.Do(func() {
		dir, err := os.MkdirTemp("", "chalk-sandbox-test-")
		if err != nil {
			initErr = err
			return
		}
		_, file, _, _ := runtime.Caller(0)
		initBin = filepath.Join(dir, "chalk-init")
		cmd := exec.Command("go", "build", "-o", initBin, "./cmd/chalk-init")
		cmd.Dir = filepath.Join(filepath.Dir(file), "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			initErr = errors.New(string(out))
		}
	})
	if initErr != nil {
		t.Fatalf("build chalk-init: %v", initErr)
	}
	return initBin
}

// testRuntime is a Runtime with its own state, runc root and cgroup parent,
// removed (with every sandbox in it) when the test ends.
func testRuntime(t *testing.T, cfg Config) *Runtime {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: starts real sandboxes with runc")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("needs runc (Debian package runc)")
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("needs /bin/busybox (Debian package busybox-static) for the test rootfs")
	}
	base := t.TempDir()
	cfg.StateDir = filepath.Join(base, "sandboxes")
	cfg.LogDir = filepath.Join(base, "logs")
	cfg.RuncRoot = filepath.Join(base, "runc")
	cfg.InitBinary = testInit(t)
	cfg.CgroupParent = "/chalk-sandbox-test-" + filepath.Base(base)
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		ids, _ := r.List(ctx)
		for _, id := range ids {
			if err := r.Destroy(ctx, id); err != nil {
				t.Errorf("destroy %s: %v", id, err)
			}
		}
		ents, _ := os.ReadDir(cfg.StateDir)
		for _, e := range ents {
			_ = r.Destroy(ctx, e.Name())
		}
		for _, ctl := range []string{"memory", "pids", "cpu", "cpuacct", "cpuset", "blkio", "devices", "freezer", "systemd"} {
			_ = os.Remove(filepath.Join("/sys/fs/cgroup", ctl, cfg.CgroupParent))
		}
	})
	return r
}

// busyboxLayer is a one-layer rootfs: Debian's static busybox and its applets.
func busyboxLayer(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{"bin", "etc", "tmp", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"sh", "dd", "rm", "df", "cat", "echo", "head", "sync", "true"} {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", app)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// run execs argv in sandbox id and returns its exit code and output.
func run(t *testing.T, r *Runtime, id string, argv ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	p, err := r.Client(id).Exec(ctx, procapi.ExecRequest{Argv: argv, Env: []string{"PATH=/bin"}}, &out, &out)
	if err != nil {
		t.Fatalf("exec %v: %v", argv, err)
	}
	st, err := p.Wait()
	if err != nil {
		t.Fatalf("wait %v: %v", argv, err)
	}
	return st.Code, out.String()
}

func startSandbox(t *testing.T, r *Runtime, sp Spec) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := r.Start(ctx, sp); err != nil {
		t.Fatalf("start %s: %v", sp.ID, err)
	}
}

// TestDiskQuota: writing past the quota fails with ENOSPC inside the sandbox;
// the sandbox keeps working, frees space by deleting, and its neighbour's
// quota is its own.
func TestDiskQuota(t *testing.T) {
	r := testRuntime(t, Config{DefaultDiskMB: 64})
	layer := busyboxLayer(t)
	startSandbox(t, r, Spec{ID: "quota-small", LowerDirs: []string{layer}, DiskMB: 16})
	startSandbox(t, r, Spec{ID: "quota-default", LowerDirs: []string{layer}})

	for _, tc := range []struct {
		id    string
		quota int64
	}{{"quota-small", 16 << 20}, {"quota-default", 64 << 20}} {
		used, quota, err := r.DiskUsage(tc.id)
		if err != nil || quota != tc.quota || used < 0 || used > 1<<20 {
			t.Errorf("%s: usage %d of %d (%v); want a quota of %d and almost nothing used", tc.id, used, quota, err, tc.quota)
		}
	}
	// Fill the small one: dd stops at the quota with ENOSPC.
	code, out := run(t, r, "quota-small", "dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=100")
	if code == 0 || !strings.Contains(out, "No space left on device") {
		t.Fatalf("fill past the quota: exit %d, %q", code, out)
	}
	used, quota, err := r.DiskUsage("quota-small")
	if err != nil || used > quota || used < quota-(1<<20) {
		t.Fatalf("after filling: %d of %d used (%v)", used, quota, err)
	}
	// Writes through the file API (init) are held by the same quota.
	err = r.Client("quota-small").WriteFile(context.Background(), "/more", 0o644, bytes.NewReader(make([]byte, 4<<20)))
	if err == nil {
		t.Fatal("file API write past the quota succeeded")
	}
	// The sandbox still runs things; deleting frees the space again.
	if code, out := run(t, r, "quota-small", "sh", "-c", "rm /fill && dd if=/dev/zero of=/again bs=1M count=8 2>&1 && echo ok"); code != 0 || !strings.HasSuffix(out, "ok\n") {
		t.Fatalf("after freeing: exit %d %q", code, out)
	}
	// The neighbour's quota is untouched and larger.
	if code, out := run(t, r, "quota-default", "dd", "if=/dev/zero", "of=/fill", "bs=1M", "count=32"); code != 0 {
		t.Fatalf("neighbour write within its own quota: exit %d %q", code, out)
	}
	// Destroy removes the quota filesystem with everything on it.
	dir := r.Dir("quota-small")
	if err := r.Destroy(context.Background(), "quota-small"); err != nil {
		t.Fatal(err)
	}
	if mounted(t, dir) {
		t.Fatalf("%s still mounted after destroy", dir)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s after destroy: %v", dir, err)
	}
}

// TestDiskQuotaInvalid: bad quotas and backends are refused before anything is made.
func TestDiskQuotaInvalid(t *testing.T) {
	r := testRuntime(t, Config{})
	for _, mb := range []int64{-1, MaxDiskMB + 1} {
		_, err := r.Start(context.Background(), Spec{ID: "bad-disk", LowerDirs: []string{busyboxLayer(t)}, DiskMB: mb})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("disk %d MiB: %v, want ErrInvalidArgument", mb, err)
		}
		if _, err := os.Stat(r.Dir("bad-disk")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("disk %d MiB: left %s behind", mb, r.Dir("bad-disk"))
		}
	}
	if _, err := New(Config{StateDir: t.TempDir(), InitBinary: testInit(t), Disk: "zfs"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("unknown disk backend: %v", err)
	}
}

// TestDiskNone: without quotas the sandbox directory is a plain directory.
func TestDiskNone(t *testing.T) {
	r := testRuntime(t, Config{Disk: DiskNone})
	startSandbox(t, r, Spec{ID: "noquota", LowerDirs: []string{busyboxLayer(t)}})
	if mounted(t, r.Dir("noquota")) {
		t.Fatal("sandbox directory is a mount point without quotas")
	}
	if used, quota, err := r.DiskUsage("noquota"); err != nil || used != 0 || quota != 0 {
		t.Fatalf("usage without quotas: %d %d %v", used, quota, err)
	}
	if code, out := run(t, r, "noquota", "sh", "-c", "echo hi > /x && cat /x"); code != 0 || out != "hi\n" {
		t.Fatalf("write: %d %q", code, out)
	}
}

// mounted reports whether dir is a mount point.
func mounted(t *testing.T, dir string) bool {
	t.Helper()
	var st, parent unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false
	}
	if err := unix.Stat(filepath.Dir(dir), &parent); err != nil {
		t.Fatal(err)
	}
	return st.Dev != parent.Dev
}
