package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRestrictDataDir: an install made with world-readable subdirectories
// (as chalkd made them before) is fixed at start; missing ones are made.
func TestRestrictDataDir(t *testing.T) {
	dir := t.TempDir()
	for _, d := range []string{"mounts", "cache", "logs", "sandboxes"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := restrictDataDir(dir, false); err != nil {
		t.Fatal(err)
	}
	for name, want := range dataDirModes {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", name, st.Mode().Perm(), want)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("data dir without user namespaces: mode %v, want 0700", st.Mode().Perm())
	}
	if dataDirModes["mounts"] != 0o700 || dataDirModes["cache"] != 0o700 || dataDirModes["logs"] != 0o700 {
		t.Errorf("uploads, layers and logs must be private: %v", dataDirModes)
	}
}

// TestIdentityFilesTmpfs: an empty identity-files dir on a disk file system
// gets a tmpfs of its own (mode kept, files written there stay off the
// disk); a second start finds it and mounts nothing more; a dir that is not
// empty (an older chalkd's sandboxes' identity dirs, bind-mounted by path)
// is left on the disk.
func TestIdentityFilesTmpfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mount)")
	}
	onTmpfs := func(dir string) bool {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		return st.Type == unix.TMPFS_MAGIC
	}
	data := t.TempDir()
	if onTmpfs(data) {
		t.Skip("the test's temporary dir is on a tmpfs already")
	}
	if err := restrictDataDir(data, false); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(data, "identity-files")
	t.Cleanup(func() {
		for unix.Unmount(dir, unix.MNT_DETACH) == nil {
		}
	})
	log := slog.New(slog.DiscardHandler)
	identityFilesTmpfs(log, data)
	if !onTmpfs(dir) {
		t.Fatal("an empty identity-files dir is not on a tmpfs")
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != dataDirModes["identity-files"] {
		t.Fatalf("identity-files: %v %v, want mode %v", st.Mode(), err, dataDirModes["identity-files"])
	}
	// It is shared by every sandbox of every org: it must hold a few pages
	// (token and federation files, a refresh's temporary file) for every
	// slot a node can have, or one org's sandboxes fill it for all (the
	// first bound, 64 MiB, held 16,384 pages).
	const slots, pagesPerSandbox = 1<<16 - 1, 8
	if size := tmpfsSize(t, dir); size < slots*pagesPerSandbox*4096 {
		t.Fatalf("identity-files tmpfs of %d MiB: under %d pages for each of %d slots", size>>20, pagesPerSandbox, slots)
	}
	if err := os.MkdirAll(filepath.Join(dir, "sb-1", "files"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A restart: restrictDataDir again, and the mount is found, not stacked.
	if err := restrictDataDir(data, false); err != nil {
		t.Fatal(err)
	}
	identityFilesTmpfs(log, data)
	if _, err := os.Stat(filepath.Join(dir, "sb-1", "files")); err != nil {
		t.Fatalf("a restart hid the sandboxes' identity dirs: %v", err)
	}
	if n := mountsAt(t, dir); n != 1 {
		t.Fatalf("%d mounts on %s, want 1", n, dir)
	}

	// An older chalkd's 64 MiB tmpfs: grown, its files kept.
	if err := unix.Mount("chalk-identity", dir, "tmpfs", unix.MS_REMOUNT|unix.MS_NOSUID|unix.MS_NODEV, "size=64m"); err != nil {
		t.Fatal(err)
	}
	identityFilesTmpfs(log, data)
	if size := tmpfsSize(t, dir); size != identityTmpfsSize {
		t.Fatalf("an older chalkd's tmpfs: %d MiB after a start, want %d", size>>20, identityTmpfsSize>>20)
	}
	if _, err := os.Stat(filepath.Join(dir, "sb-1", "files")); err != nil {
		t.Fatalf("growing the tmpfs lost the sandboxes' identity dirs: %v", err)
	}
	if n := mountsAt(t, dir); n != 1 {
		t.Fatalf("%d mounts on %s after growing it, want 1", n, dir)
	}

	// An older chalkd's identity dirs on the disk: left there.
	old := t.TempDir()
	if err := os.MkdirAll(filepath.Join(old, "identity-files", "sb-2", "files"), 0o755); err != nil {
		t.Fatal(err)
	}
	identityFilesTmpfs(log, old)
	if onTmpfs(filepath.Join(old, "identity-files")) {
		_ = unix.Unmount(filepath.Join(old, "identity-files"), unix.MNT_DETACH)
		t.Fatal("a tmpfs was mounted over identity dirs in use")
	}
}

// mountsAt counts the mounts whose mount point is dir.
func mountsAt(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			n++
		}
	}
	return n
}

// tmpfsSize is the size of the file system dir is on.
func tmpfsSize(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// TestNSFilesTmpfs: the run dir's empty netns and userns dirs on a disk
// file system get a tmpfs each, with sandboxnet's mode; a second start
// (a chalkd restart) finds them and mounts nothing more, the namespace
// files made there kept; a dir that is not empty (an older chalkd's
// sandboxes' files, each a namespace's mount point) is left on the disk;
// without user namespaces no userns dir is made.
func TestNSFilesTmpfs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mount)")
	}
	onTmpfs := func(dir string) bool {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		return st.Type == unix.TMPFS_MAGIC
	}
	run := t.TempDir()
	if onTmpfs(run) {
		t.Skip("the test's temporary dir is on a tmpfs already")
	}
	dirs := []string{filepath.Join(run, "netns"), filepath.Join(run, "userns")}
	t.Cleanup(func() {
		for _, dir := range dirs {
			for unix.Unmount(dir, unix.MNT_DETACH) == nil {
			}
		}
	})
	log := slog.New(slog.DiscardHandler)
	nsFilesTmpfs(log, run, true)
	for _, dir := range dirs {
		if !onTmpfs(dir) {
			t.Fatalf("%s: not on a tmpfs", dir)
		}
		if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != nsDirMode {
			t.Fatalf("%s: %v %v, want mode %v", dir, st.Mode(), err, os.FileMode(nsDirMode))
		}
		if err := os.WriteFile(filepath.Join(dir, "sb-1"), nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	// A restart: found, not stacked, the files kept.
	nsFilesTmpfs(log, run, true)
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, "sb-1")); err != nil {
			t.Fatalf("a restart hid the namespace files: %v", err)
		}
		if n := mountsAt(t, dir); n != 1 {
			t.Fatalf("%d mounts on %s, want 1", n, dir)
		}
	}

	// An older chalkd's files on the disk: left there.
	old := t.TempDir()
	if err := os.MkdirAll(filepath.Join(old, "netns"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(old, "netns", "sb-2"), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	dirs = append(dirs, filepath.Join(old, "netns"), filepath.Join(old, "userns"))
	nsFilesTmpfs(log, old, false)
	if onTmpfs(filepath.Join(old, "netns")) {
		t.Fatal("a tmpfs was mounted over namespace files in use")
	}
	if _, err := os.Stat(filepath.Join(old, "userns")); !os.IsNotExist(err) {
		t.Fatalf("userns dir without user namespaces: %v", err)
	}
}
