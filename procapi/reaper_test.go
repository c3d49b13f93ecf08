package procapi

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestReaper(t *testing.T) {
	r := StartReaper()
	if StartReaper() != r {
		t.Fatal("StartReaper returned a second reaper")
	}
	ctx := testCtx(t)
	// The reaper is process-wide: other tests' children may still run, so
	// WaitIdle returning is asserted where the process is ours alone (the
	// chalk-init tests run the binary as init); here only that it waits.
	// Statuses reach the right waiters, even for children that end at once.
	type started struct {
		ch   <-chan unix.WaitStatus
		code int
	}
	var all []started
	for i, argv := range [][]string{{"sh", "-c", "exit 3"}, {"true"}, {"sh", "-c", "exit 42"}} {
		bin, err := LookPath(argv[0], os.Environ(), "")
		if err != nil {
			t.Fatal(err)
		}
		p, ch, err := r.Start(bin, argv, &os.ProcAttr{})
		if err != nil {
			t.Fatal(err)
		}
		p.Release()
		all = append(all, started{ch, []int{3, 0, 42}[i]})
	}
	for i, s := range all {
		if ws := <-s.ch; ws.ExitStatus() != s.code {
			t.Errorf("child %d: exit %d, want %d", i, ws.ExitStatus(), s.code)
		}
	}
	// Signal reaches every group still running; WaitIdle waits for them.
	var sleepers []<-chan unix.WaitStatus
	for range 2 {
		p, ch, err := r.Start("/bin/sh", []string{"sh", "-c", "sleep 1000"}, &os.ProcAttr{Sys: &syscall.SysProcAttr{Setpgid: true}})
		if err != nil {
			t.Fatal(err)
		}
		p.Release()
		sleepers = append(sleepers, ch)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := r.WaitIdle(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitIdle with children running: %v", err)
	}
	r.Signal(syscall.SIGKILL)
	for i, ch := range sleepers {
		if ws := <-ch; !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("sleeper %d: %v, want killed by SIGKILL", i, ws)
		}
	}
	if err := signalGroup(1, syscall.Signal(0)); err == nil {
		t.Fatal("signalGroup accepted pid 1")
	}
}

// TestStartInCgroupFails: a tasks file init cannot write moves nothing and
// leaves Start forking as before (init then reserves threads instead).
func TestStartInCgroupFails(t *testing.T) {
	r := StartReaper()
	f, err := os.Open(os.DevNull) // read-only: the write fails
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := r.StartInCgroup(f); err == nil {
		t.Fatal("StartInCgroup with a read-only file: no error")
	}
	r.mu.Lock()
	spawn := r.spawn
	r.mu.Unlock()
	if spawn != nil {
		t.Fatal("forks handed to a thread that is not in the cgroup")
	}
	bin, err := LookPath("true", os.Environ(), "")
	if err != nil {
		t.Fatal(err)
	}
	p, ch, err := r.Start(bin, []string{"true"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	p.Release()
	if ws := <-ch; ws.ExitStatus() != 0 {
		t.Fatalf("true: exit %d", ws.ExitStatus())
	}
}
