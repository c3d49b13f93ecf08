package sandbox

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestWatchCreate: the watch fires for the name renamed into the directory
// (how init publishes its socket), not for other entries.
func TestWatchCreate(t *testing.T) {
	dir := t.TempDir()
	appeared, stop, err := watchCreate(dir, "init.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { <-stop() }()
	for _, name := range []string{".init.sock.tmp", "init.sock.other", "init"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sub", "init.sock"), nil, 0o600); err != nil {
		t.Fatal(err) // in a subdirectory: not watched
	}
	select {
	case <-appeared:
		t.Fatal("fired before init.sock was there")
	default:
	}
	if err := os.Rename(filepath.Join(dir, ".init.sock.tmp"), filepath.Join(dir, "init.sock")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-appeared:
	case <-time.After(10 * time.Second):
		t.Fatal("no event for init.sock renamed into place")
	}
	// Stopping a watch that never fired ends it too.
	_, stop2, err := watchCreate(dir, "never")
	if err != nil {
		t.Fatal(err)
	}
	<-stop2()
}

// TestWatchStopReleases: stop returns before the (slow) close of the
// inotify descriptor, which then happens in the background: once the
// channel stop returns is closed, the watch's descriptor is closed,
// whether the watch fired or not, and stopping twice is harmless.
func TestWatchStopReleases(t *testing.T) {
	before := inotifyFDs(t) // (an earlier test's watch may still be closing)
	dir := t.TempDir()
	appeared, stop, err := watchCreate(dir, "init.sock")
	if err != nil {
		t.Fatal(err)
	}
	_, stopNever, err := watchCreate(dir, "never")
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for fd := range inotifyFDs(t) {
		if !before[fd] {
			ours = append(ours, fd)
		}
	}
	if len(ours) != 2 {
		t.Fatalf("inotify descriptors %v opened by two watches, want 2", ours)
	}
	if err := os.WriteFile(filepath.Join(dir, "init.sock"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	<-appeared
	done := stop()
	doneNever := stopNever()
	<-done
	<-doneNever
	<-stop() // a second stop: the same channel, closed already
	now := inotifyFDs(t)
	for _, fd := range ours {
		if now[fd] {
			t.Errorf("inotify descriptor %s still open after its watch stopped", fd)
		}
	}
}

// inotifyFDs lists this process's open inotify descriptors.
func inotifyFDs(t *testing.T) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	fds := map[string]bool{}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && l == "anon_inode:inotify" {
			fds[e.Name()] = true
		}
	}
	return fds
}
