package sandbox

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// parentOf returns pid's parent (0: gone).
func parentOf(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

// TestRuncNoHelpers: under runc the helper scan is skipped once init's pid
// is known, because nothing of a sandbox but its init can be this process's
// child. Checked as chalkd runs (a child subreaper): an orphan inside the
// sandbox goes to the sandbox's init, not to us; after Kill, Wait and
// Destroy no process of the sandbox is left as our child (not even a
// zombie). Without the pid file (runc died before writing it) the scan
// runs and Destroy reaps the unknown init.
func TestRuncNoHelpers(t *testing.T) {
	r := testRuntime(t, Config{})
	if err := SetSubreaper(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
	layer := busyboxLayer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	before := ownChildren()

	// A sandbox with an orphan: sh starts a sleep in the background and ends.
	startSandbox(t, r, Spec{ID: "helpers-runc", LowerDirs: []string{layer}})
	initPID, err := r.initPid("helpers-runc")
	if err != nil {
		t.Fatal(err)
	}
	if parentOf(initPID) != os.Getpid() {
		t.Fatalf("init %d's parent is %d, want this process %d (the subreaper)", initPID, parentOf(initPID), os.Getpid())
	}
	if code, out := run(t, r, "helpers-runc", "sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo started"); code != 0 || !strings.Contains(out, "started") {
		t.Fatalf("sh: %d %q", code, out)
	}
	var sleeper int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == initPID {
			continue
		}
		if in, _ := inCgroup(pid, r.cgroupPath("helpers-runc")); !in {
			continue
		}
		if b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline"); bytes.HasPrefix(b, []byte("sleep\x00")) {
			sleeper = pid
		}
	}
	if sleeper == 0 {
		t.Fatal("the sandbox's sleep not found")
	}
	if p := parentOf(sleeper); p != initPID {
		t.Errorf("the orphaned sleep's parent is %d, want the sandbox's init %d", p, initPID)
	}
	if hs := r.helperChildren("helpers-runc"); len(hs) != 0 {
		t.Errorf("helperChildren under runc = %v, want none", hs)
	}
	if err := r.Kill(ctx, "helpers-runc"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Wait(ctx, "helpers-runc", initPID); err != nil {
		t.Fatal(err)
	}
	if err := r.Destroy(ctx, "helpers-runc"); err != nil {
		t.Fatal(err)
	}
	if p := parentOf(sleeper); p == os.Getpid() {
		t.Errorf("the sandbox's sleep %d is left as our child", sleeper)
	}
	for _, pid := range ownChildren() {
		if !slices.Contains(before, pid) {
			t.Errorf("child %d left after the sandbox's end (%s)", pid, cmdline(pid))
		}
	}

	// No pid file: init is found by the scan and reaped by Destroy.
	startSandbox(t, r, Spec{ID: "helpers-nopid", LowerDirs: []string{layer}})
	lost, err := r.initPid("helpers-nopid")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(r.Dir("helpers-nopid"), initPidFile)); err != nil {
		t.Fatal(err)
	}
	if hs := r.helperChildren("helpers-nopid"); !slices.Contains(hs, lost) {
		t.Errorf("helperChildren without a pid file = %v, want init %d in it", hs, lost)
	}
	if err := r.Destroy(ctx, "helpers-nopid"); err != nil {
		t.Fatal(err)
	}
	if p := parentOf(lost); p == os.Getpid() {
		t.Errorf("init %d of a sandbox without a pid file is left as our child (%s)", lost, cmdline(lost))
	}
}

func cmdline(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return strings.ReplaceAll(string(b), "\x00", " ")
}

// TestDestroyWithoutRuncState: removing a kept writable layer (Destroy after
// DestroyKeepUpper) runs no runc process and no helper scan: the first
// teardown removed runc's state. A sandbox whose runc state directory
// exists without a state file (an aborted start) is still handed to `runc
// delete`, which removes the directory.
func TestDestroyWithoutRuncState(t *testing.T) {
	r := testRuntime(t, Config{})
	layer := busyboxLayer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// runc, through a wrapper that logs what it is asked.
	real := r.runc.Command
	calls := filepath.Join(t.TempDir(), "calls")
	wrapper := filepath.Join(t.TempDir(), "runc")
	if err := os.WriteFile(wrapper, []byte("#!/bin/sh\necho \"$*\" >> "+calls+"\nexec "+real+" \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	r.runc.Command = wrapper
	logged := func() string { b, _ := os.ReadFile(calls); return string(b) }

	startSandbox(t, r, Spec{ID: "kept-layer", LowerDirs: []string{layer}})
	if code, _ := run(t, r, "kept-layer", "sh", "-c", "echo kept > /kept"); code != 0 {
		t.Fatal("write to the writable layer failed")
	}
	pid, err := r.initPid("kept-layer")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Kill(ctx, "kept-layer"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Wait(ctx, "kept-layer", pid); err != nil {
		t.Fatal(err)
	}
	if err := r.DestroyKeepUpper(ctx, "kept-layer"); err != nil {
		t.Fatal(err)
	}
	if !r.runcStateGone("kept-layer") {
		t.Fatal("runc state left after the first teardown")
	}
	if b, err := os.ReadFile(filepath.Join(r.UpperDir("kept-layer"), "kept")); err != nil || string(b) != "kept\n" {
		t.Fatalf("kept layer: %q %v", b, err)
	}
	before := logged()
	if err := r.Destroy(ctx, "kept-layer"); err != nil {
		t.Fatal(err)
	}
	if after := logged(); after != before {
		t.Errorf("Destroy of a kept layer ran runc: %q", strings.TrimPrefix(after, before))
	}
	if _, err := os.Stat(r.Dir("kept-layer")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir after Destroy: %v", err)
	}
	if mounted(t, r.Dir("kept-layer")) {
		t.Error("the kept layer's disk is still mounted")
	}

	// An aborted start: runc's directory without state.json.
	if err := os.MkdirAll(filepath.Join(r.cfg.RuncRoot, "aborted"), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(r.Dir("aborted"), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := r.Destroy(ctx, "aborted"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logged(), "delete --force aborted") {
		t.Errorf("runc delete not run for a state directory without state: %q", logged())
	}
	if _, err := os.Stat(filepath.Join(r.cfg.RuncRoot, "aborted")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runc state directory after Destroy: %v", err)
	}
}
