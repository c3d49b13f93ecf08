package procapi

import (
	"context"
	"errors"
	"os"
	"strconv"
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
		_, ch, err := r.Start(bin, argv, &os.ProcAttr{})
		if err != nil {
			t.Fatal(err)
		}
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
		_, ch, err := r.Start("/bin/sh", []string{"sh", "-c", "sleep 1000"}, &os.ProcAttr{Sys: &syscall.SysProcAttr{Setpgid: true}})
		if err != nil {
			t.Fatal(err)
		}
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
	if err := r.StartInCgroup(f, nil); err == nil {
		t.Fatal("StartInCgroup with a read-only file: no error")
	}
	r.mu.Lock()
	spawn, tasks := r.spawn, r.tasks
	r.mu.Unlock()
	if spawn != nil || tasks != nil {
		t.Fatal("forks handed to a thread that is not in the cgroup")
	}
	bin, err := LookPath("true", os.Environ(), "")
	if err != nil {
		t.Fatal(err)
	}
	_, ch, err := r.Start(bin, []string{"true"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	if ws := <-ch; ws.ExitStatus() != 0 {
		t.Fatalf("true: exit %d", ws.ExitStatus())
	}
}

// TestStartProcess: the reaper's own fork + exec (os.StartProcess without a
// pidfd) keeps what os.StartProcess does — the files as the child's fds (a
// nil one closed), the default environment for a nil Env, the working
// directory, the SysProcAttr, and its errors — and leaves this process no
// pidfd of the child (os.StartProcess opens one per child, and checks
// pidfds with a test child before its first).
func TestStartProcess(t *testing.T) {
	r := StartReaper()
	dir := t.TempDir()
	t.Setenv("CHALK_REAPER_TEST", "inherited")
	out, err := os.Create(dir + "/out")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	gate, release, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer gate.Close()
	// fd 0: the gate (the child waits for it to close), 1: out, 2: closed.
	script := `read x; pwd; echo "$CHALK_REAPER_TEST"; echo pgid $(cut -d' ' -f5 /proc/self/stat) pid $$; if [ -e /proc/self/fd/2 ]; then echo fd2 open; else echo fd2 closed; fi`
	pid, ch, err := r.Start("/bin/sh", []string{"sh", "-c", script}, &os.ProcAttr{
		Dir:   dir,
		Files: []*os.File{gate, out, nil},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	// The child is running (it waits for the gate): this process holds no
	// pidfd for it.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == "anon_inode:[pidfd]" {
			t.Errorf("fd %s is a pidfd", e.Name())
		}
	}
	release.Close()
	if ws := <-ch; ws.ExitStatus() != 0 {
		t.Fatalf("child: %v", ws)
	}
	b, err := os.ReadFile(dir + "/out")
	if err != nil {
		t.Fatal(err)
	}
	want := dir + "\ninherited\npgid " + itoa(pid) + " pid " + itoa(pid) + "\nfd2 closed\n"
	if string(b) != want {
		t.Fatalf("child wrote %q, want %q", b, want)
	}

	// Errors are os.StartProcess's: a *os.PathError with the errno.
	if _, _, err := r.Start(dir+"/missing", []string{"missing"}, &os.ProcAttr{Sys: &syscall.SysProcAttr{}}); !isPathErr(err, "fork/exec", syscall.ENOENT) {
		t.Errorf("missing executable: %v", err)
	}
	if _, _, err := r.Start(dir+"/out", []string{"out"}, &os.ProcAttr{Sys: &syscall.SysProcAttr{}}); !isPathErr(err, "fork/exec", syscall.EACCES) {
		t.Errorf("file without x bits: %v", err)
	}
	if _, _, err := r.Start("/bin/true", []string{"true"}, &os.ProcAttr{Dir: dir + "/nodir"}); !isPathErr(err, "chdir", syscall.ENOENT) {
		t.Errorf("missing dir without Sys: %v", err)
	}
	if _, _, err := r.Start("/bin/true", []string{"true"}, &os.ProcAttr{Dir: dir + "/nodir", Sys: &syscall.SysProcAttr{}}); !isPathErr(err, "fork/exec", syscall.ENOENT) {
		t.Errorf("missing dir with Sys: %v", err)
	}
}

func isPathErr(err error, op string, errno syscall.Errno) bool {
	var pe *os.PathError
	return errors.As(err, &pe) && pe.Op == op && errors.Is(err, errno)
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestReaperSignalFlood: a flood of SIGCHLDs that are not exits (a sandbox
// can `kill -CHLD 1` in a loop) loses no exit status and leaves no child
// unreaped: the relay coalesces them, each pass reaps all that ended.
func TestReaperSignalFlood(t *testing.T) {
	r := StartReaper()
	stop := make(chan struct{})
	flooded := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				flooded <- n
				return
			default:
				_ = unix.Kill(os.Getpid(), unix.SIGCHLD)
				n++
			}
		}
	}()
	var chans []<-chan unix.WaitStatus
	for i := range 40 {
		_, ch, err := r.Start("/bin/sh", []string{"sh", "-c", "exit " + strconv.Itoa(i)}, &os.ProcAttr{})
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	for i, ch := range chans {
		select {
		case ws := <-ch:
			if ws.ExitStatus() != i {
				t.Errorf("child %d: exit %d", i, ws.ExitStatus())
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("child %d: no exit status", i)
		}
	}
	close(stop)
	if n := <-flooded; n < 100 {
		t.Errorf("only %d SIGCHLDs sent during the test", n)
	}
}
