package sandbox

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// TestDeleteStopped: the runc state of a sandbox whose init has ended is
// removed without runc (its cgroups as runc recorded them, then its state
// directory); anything it is not sure of is left for `runc delete --force`
// untouched: an init that still runs (same pid and start time), a state
// with hooks, a cgroup path that is not the sandbox's, another runtime.
func TestDeleteStopped(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes a cgroup")
	}
	parent, id := "/chalk-delstopped-"+strconv.Itoa(os.Getpid()), "sb-del"
	root := "/sys/fs/cgroup/pids"
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		root = "/sys/fs/cgroup"
	}
	cg := filepath.Join(root, parent, id)
	runcRoot := t.TempDir()
	r := &Runtime{cfg: Config{Runtime: RuntimeRunc, RuncRoot: runcRoot, CgroupParent: parent}}
	t.Cleanup(func() { _ = os.Remove(cg); _ = os.Remove(filepath.Dir(cg)) })

	alive := startIn(t, "")
	aliveStart, ok := procStart(alive)
	if !ok || aliveStart == 0 {
		t.Fatalf("procStart(%d) = %d, %v", alive, aliveStart, ok)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if s, ok := procStart(dead.Process.Pid); !ok || s != 0 {
		t.Fatalf("procStart of a reaped process = %d, %v; want 0, true", s, ok)
	}

	write := func(pid int, start uint64, hooks any, paths map[string]string) {
		t.Helper()
		if err := os.MkdirAll(cg, 0o755); err != nil {
			t.Fatal(err)
		}
		st := map[string]any{
			"id": id, "init_process_pid": pid, "init_process_start": start,
			"cgroup_paths": paths, "config": map[string]any{"hooks": hooks},
		}
		b, _ := json.Marshal(st)
		if err := os.MkdirAll(filepath.Join(runcRoot, id), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(runcRoot, id, "state.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	own := map[string]string{"pids": cg}
	kept := func(name string) {
		t.Helper()
		done, err := r.deleteStopped(id)
		if done || err != nil {
			t.Errorf("%s: deleteStopped = %v, %v; want it left to runc", name, done, err)
		}
		if _, err := os.Stat(filepath.Join(runcRoot, id, "state.json")); err != nil {
			t.Errorf("%s: state removed: %v", name, err)
		}
		if _, err := os.Stat(cg); err != nil {
			t.Errorf("%s: cgroup removed: %v", name, err)
		}
	}
	write(alive, aliveStart, nil, own)
	kept("init alive")
	write(dead.Process.Pid, 12345, map[string]any{"poststop": []any{map[string]any{"path": "/bin/true"}}}, own)
	kept("hooks")
	write(dead.Process.Pid, 12345, nil, map[string]string{"pids": filepath.Join(root, parent, "sb-other")})
	kept("another sandbox's cgroup")
	write(dead.Process.Pid, 12345, nil, map[string]string{"pids": "/tmp/x" + cg})
	kept("a path outside cgroupfs")
	r.cfg.Runtime = RuntimeRunsc
	write(dead.Process.Pid, 12345, nil, own)
	kept("runsc")
	r.cfg.Runtime = RuntimeRunc

	write(dead.Process.Pid, 12345, nil, own)
	if done, err := r.deleteStopped(id); !done || err != nil {
		t.Fatalf("stopped: deleteStopped = %v, %v", done, err)
	}
	if _, err := os.Stat(filepath.Join(runcRoot, id)); !os.IsNotExist(err) {
		t.Errorf("state dir still there: %v", err)
	}
	if _, err := os.Stat(cg); !os.IsNotExist(err) {
		t.Errorf("cgroup still there: %v", err)
	}
}
