package sandbox

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startIn starts a process that waits on its stdin, in the cgroup at dir
// ("" none), and returns its pid; it ends with the test.
func startIn(t *testing.T, dir string) int {
	t.Helper()
	cmd := exec.Command("cat")
	w, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close(); _ = cmd.Wait() })
	if dir != "" {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
			t.Fatal(err)
		}
	}
	return cmd.Process.Pid
}

// TestCheckPeer: under runc only the sandbox's init (the pid runc wrote, in
// the sandbox's cgroup) passes as the listener of its socket; under runsc,
// a process of the sandbox's cgroup (its gofer). Everything else is refused:
// another process of the sandbox (runc), a process outside it, a missing or
// tampered pid file.
func TestCheckPeer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes a cgroup")
	}
	parent, id := "/chalk-checkpeer-"+strconv.Itoa(os.Getpid()), "sb-peer"
	root := "/sys/fs/cgroup/pids" // cgroup v1 (or hybrid)
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		root = "/sys/fs/cgroup" // v2 only
	}
	cg := filepath.Join(root, parent, id)
	if err := os.MkdirAll(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(cg); _ = os.Remove(filepath.Dir(cg)) })
	initPID := startIn(t, cg)
	sibling := startIn(t, cg) // another process of the sandbox
	outsider := startIn(t, "")
	// sb-peer2's cgroup is not below sb-peer's though its path extends it.
	cg2 := cg + "2"
	if err := os.MkdirAll(cg2, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(cg2) })
	longer := startIn(t, cg2)

	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, id), 0o700); err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(state, id, initPidFile)
	setPid := func(s string) {
		t.Helper()
		_ = os.Remove(pidFile)
		if s != "" {
			if err := os.WriteFile(pidFile, []byte(s), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cases := []struct {
		name    string
		runtime string
		pidFile string
		peer    int
		ok      bool
	}{
		{"runc: init", RuntimeRunc, strconv.Itoa(initPID), initPID, true},
		{"runc: init, pid file with newline", RuntimeRunc, strconv.Itoa(initPID) + "\n", initPID, true},
		{"runc: another process of the sandbox", RuntimeRunc, strconv.Itoa(initPID), sibling, false},
		{"runc: a process outside the sandbox", RuntimeRunc, strconv.Itoa(initPID), outsider, false},
		{"runc: the pid file names a process outside the cgroup", RuntimeRunc, strconv.Itoa(outsider), outsider, false},
		{"runc: no pid file", RuntimeRunc, "", initPID, false},
		{"runc: garbage in the pid file", RuntimeRunc, "1x", initPID, false},
		{"runc: dead pid", RuntimeRunc, "999999999", 999999999, false},
		{"runsc: the gofer (in the cgroup)", RuntimeRunsc, "", sibling, true},
		{"runsc: a process outside the sandbox", RuntimeRunsc, "", outsider, false},
		{"runsc: chalkd itself", RuntimeRunsc, "", os.Getpid(), false},
		{"runsc: a process of a sandbox whose id extends this one's", RuntimeRunsc, "", longer, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			setPid(tc.pidFile)
			r := &Runtime{cfg: Config{StateDir: state, Runtime: tc.runtime, CgroupParent: parent}}
			err := r.checkPeer(id, &unix.Ucred{Pid: int32(tc.peer)})
			if (err == nil) != tc.ok {
				t.Fatalf("checkPeer(pid %d) = %v; want ok %v", tc.peer, err, tc.ok)
			}
		})
	}
	// A symlinked pid file is not followed.
	setPid("")
	other := filepath.Join(state, "elsewhere")
	if err := os.WriteFile(other, []byte(strconv.Itoa(sibling)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, pidFile); err != nil {
		t.Fatal(err)
	}
	r := &Runtime{cfg: Config{StateDir: state, Runtime: RuntimeRunc, CgroupParent: parent}}
	if err := r.checkPeer(id, &unix.Ucred{Pid: int32(sibling)}); err == nil {
		t.Fatal("a symlinked pid file was followed")
	}
}

// TestOwnChildren: ownChildren (helperChildren's source) lists this
// process's children, alive and zombie (a dead helper must still be
// reaped), and no other process: the same set as a scan of /proc.
func TestOwnChildren(t *testing.T) {
	alive := startIn(t, "")
	zombie := exec.Command("true")
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	defer zombie.Wait()
	// Poll until it has exited (a zombie: not yet waited for).
	deadline := time.Now().Add(10 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatal("true did not exit in 10s")
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(zombie.Process.Pid) + "/stat")
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
			break
		}
		runtime.Gosched()
	}
	got := ownChildren()
	for _, pid := range []int{alive, zombie.Process.Pid} {
		if !slices.Contains(got, pid) {
			t.Errorf("ownChildren %v: no child %d", got, pid)
		}
	}
	// Not the parent, not itself, nothing that is not a child.
	for _, pid := range got {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			continue // reaped meanwhile (another test's child)
		}
		i := bytes.LastIndexByte(b, ')')
		if f := strings.Fields(string(b[i+1:])); len(f) < 2 || f[1] != strconv.Itoa(os.Getpid()) {
			t.Errorf("ownChildren lists %d, whose parent is %v", pid, f[1:2])
		}
	}
}
