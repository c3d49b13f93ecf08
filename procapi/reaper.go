package procapi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/sigrelay"
)

// Reaper is the one place in the process that waits for child processes.
// As PID 1, or as a child subreaper when it is not (tests), the process
// inherits every orphan below it; a single wait4(-1) loop driven by SIGCHLD
// (relayed by package sigrelay, which keeps no thread for it) reaps them all
// and hands the statuses of the processes started through Start to their
// waiters.
//
// Because it reaps every child, nothing else in the process may wait for
// children: no os/exec Cmd.Wait or Run, no os.Process.Wait. Start processes
// with Reaper.Start instead.
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	// pass is closed (and replaced) after every reap pass that reaped
	// something; idle records whether the last pass found no children.
	pass chan struct{}
	idle bool
	// tasks, once StartInCgroup has succeeded, is the workload cgroup's
	// tasks file; spawn then takes every fork to the thread that lives in
	// that cgroup (nil until it is made, on demand), and spawned answers.
	// onSpawnFail hears of a thread that could not be moved (tasks is then
	// dropped).
	tasks       *os.File
	spawn       chan spawnJob
	spawned     chan spawnResult
	onSpawnFail func(error)
}

type spawnJob struct {
	argv0 string
	argv  []string
	attr  *os.ProcAttr
}

type spawnResult struct {
	pid int
	err error
}

var (
	reaperOnce sync.Once
	theReaper  *Reaper
)

// StartReaper starts reaping the children of this process and returns the
// process's Reaper; later calls return the same one. When the process is
// not PID 1 it becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER) so
// that orphans of its children come to it too.
func StartReaper() *Reaper {
	reaperOnce.Do(func() {
		if os.Getpid() != 1 {
			_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
		}
		r := &Reaper{
			waiters: map[int]chan unix.WaitStatus{},
			pass:    make(chan struct{}),
		}
		if err := sigrelay.Notify(func(syscall.Signal) { r.reap() }, syscall.SIGCHLD); err != nil {
			panic(fmt.Sprintf("procapi: relay SIGCHLD: %v", err))
		}
		// Children that ended before SIGCHLD was caught are reaped now.
		r.reap()
		theReaper = r
	})
	return theReaper
}

// reap reaps every child that has ended. SIGCHLDs coalesce, so one signal
// may stand for several children: loop until none is left to reap.
func (r *Reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reapLocked()
}

func (r *Reaper) reapLocked() {
	reaped := false
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			r.idle = errors.Is(err, unix.ECHILD)
			break
		}
		reaped = true
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- ws // buffered: never blocks
		}
	}
	if reaped {
		close(r.pass)
		r.pass = make(chan struct{})
	}
}

// Start starts a process like os.StartProcess and returns its pid and a
// channel that receives its wait status once it has ended and been reaped.
func (r *Reaper) Start(argv0 string, argv []string, attr *os.ProcAttr) (int, <-chan unix.WaitStatus, error) {
	// The lock is held across fork and registration so a child that ends at
	// once is not reaped before it is known; its SIGCHLD triggers a pass
	// that waits for the lock.
	r.mu.Lock()
	defer r.mu.Unlock()
	var pid int
	var err error
	if r.tasks != nil && r.spawn == nil {
		r.startSpawnerLocked()
	}
	if r.spawn != nil {
		r.spawn <- spawnJob{argv0, argv, attr}
		res := <-r.spawned
		pid, err = res.pid, res.err
	} else {
		pid, err = startProcess(argv0, argv, attr)
	}
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[pid] = ch
	r.idle = false
	// Children are the OOM killer's preferred victims, so a memory bomb
	// kills the bomb, not init (and with it the sandbox). Raising a score
	// needs no privilege, unlike lowering init's.
	// (Raw system calls: os.WriteFile costs five more on a /proc file.)
	if fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", unix.O_WRONLY|unix.O_CLOEXEC, 0); err == nil {
		_, _ = unix.Write(fd, []byte("500"))
		unix.Close(fd)
	}
	return pid, ch, nil
}

// startProcess is os.StartProcess without a pidfd. Since Go 1.23
// os.StartProcess asks the kernel for a pidfd of every child (CLONE_PIDFD),
// and before the process's first child it checks once that pidfds work:
// pidfd_open, waitid and pidfd_send_signal on itself and a test clone of a
// child that exits at once. The reaper waits by pid and never uses the
// pidfd, so each exec paid for a descriptor it closed unused, and a
// sandbox's first exec (the claim of a pre-started sandbox, which is timed
// to its first exec) paid for the check and the extra child as well. The
// rest is what os.StartProcess does on Linux: the files' descriptors
// (f.Fd, which sets a non-blocking one back to blocking), the default
// environment for a nil Env, the directory's check when there is no Sys,
// and its error.
func startProcess(argv0 string, argv []string, attr *os.ProcAttr) (int, error) {
	if attr.Sys == nil && attr.Dir != "" {
		if _, err := os.Stat(attr.Dir); err != nil {
			pe := err.(*os.PathError)
			pe.Op = "chdir"
			return 0, pe
		}
	}
	sysattr := &syscall.ProcAttr{Dir: attr.Dir, Env: attr.Env, Sys: attr.Sys}
	if sysattr.Env == nil {
		sysattr.Env = syscall.Environ()
	}
	sysattr.Files = make([]uintptr, 0, len(attr.Files))
	for _, f := range attr.Files {
		sysattr.Files = append(sysattr.Files, f.Fd())
	}
	pid, _, err := syscall.StartProcess(argv0, argv, sysattr)
	runtime.KeepAlive(attr)
	if err != nil {
		return 0, &os.PathError{Op: "fork/exec", Path: argv0, Err: err}
	}
	return pid, nil
}

// StartInCgroup makes every process that Start starts from now on begin in
// another cgroup (v1) than this process: tasks is that cgroup's `tasks`
// file, open for writing, which the reaper keeps (the caller must not close
// it). The forks are done by one OS thread of this process moved into that
// cgroup (a child starts in the cgroup of the thread that forked it); the
// rest of the process, the threads the Go runtime makes later included,
// stays where it was.
//
// chalk-init uses it to keep its own threads out of the workload's pids
// limit: the workload's cgroup is a child of the sandbox's with a lower
// pids.max, so a fork bomb can never take the pids init needs for a new
// thread (docs/SECURITY.md, "Fork bombs do not kill init").
//
// The forking thread is made when it is first needed (Start, StartSpawner,
// Prewarm), and
// kept: a process that never starts one (an idle sandbox never used, or a
// pre-started one not yet claimed) keeps no thread for it, nor the Go
// runtime's template thread that a locked thread brings (made at the first
// lock; docs/ARCHITECTURE.md, "Where the time and memory go", round 8).
// Moving a thread into a pids cgroup is not refused at its limit, so the
// thread is made and moved under a fork bomb too (its forks then fail).
//
// Its error (tasks not open for writing) means nothing changed: Start forks
// on the calling thread as before. A move that fails later (the cgroup is
// gone) is passed to onFail (may be nil), once, and Start forks on the
// calling thread from then on.
func (r *Reaper) StartInCgroup(tasks *os.File, onFail func(error)) error {
	fl, err := unix.FcntlInt(tasks.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("workload's cgroup: %w", err)
	}
	if fl&unix.O_ACCMODE == unix.O_RDONLY {
		return fmt.Errorf("workload's cgroup: %s is not open for writing", tasks.Name())
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tasks, r.onSpawnFail = tasks, onFail
	return nil
}

// StartSpawner makes the forking thread of StartInCgroup now, if there is
// none (chalk-init's --prestarted).
func (r *Reaper) StartSpawner() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tasks != nil && r.spawn == nil {
		r.startSpawnerLocked()
	}
}

// Prewarm is StartSpawner in the background: chalk-init calls it when a
// pre-started sandbox is claimed, so that the first exec finds the thread.
func (r *Reaper) Prewarm() { go r.StartSpawner() }

// startSpawnerLocked makes the forking thread: a goroutine locked to a
// thread it moves into the workload's cgroup, serving r.spawn for good. It
// returns with r.spawn set, or with r.tasks dropped if the thread could not
// be moved (r.mu held).
func (r *Reaper) startSpawnerLocked() {
	errc := make(chan error, 1)
	spawn := make(chan spawnJob)
	spawned := make(chan spawnResult)
	tasks := r.tasks
	go func() {
		// Locked for good: the thread is in the workload's cgroup and no
		// other goroutine may run on it. A new thread the runtime needs
		// while this one is locked is made by its template thread, which
		// is not in the workload's cgroup.
		runtime.LockOSThread()
		if _, err := tasks.WriteString(strconv.Itoa(unix.Gettid())); err != nil {
			runtime.UnlockOSThread() // the thread is where it was
			errc <- fmt.Errorf("move the spawning thread into the workload's cgroup: %w", err)
			return
		}
		errc <- nil
		for j := range spawn {
			pid, err := startProcess(j.argv0, j.argv, j.attr)
			spawned <- spawnResult{pid, err}
		}
	}()
	if err := <-errc; err != nil {
		r.tasks = nil
		if r.onSpawnFail != nil {
			go r.onSpawnFail(err)
		}
		return
	}
	r.spawn, r.spawned = spawn, spawned
}

// Signal sends sig to every process started through Start that has not been
// reaped yet, and to its process group.
func (r *Reaper) Signal(sig syscall.Signal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for pid := range r.waiters {
		_ = signalGroup(pid, sig)
	}
}

// WaitIdle returns once this process has no children left (all reaped), or
// with ctx's error.
func (r *Reaper) WaitIdle(ctx context.Context) error {
	for {
		r.mu.Lock()
		r.reapLocked()
		idle, pass := r.idle, r.pass
		r.mu.Unlock()
		if idle {
			return nil
		}
		select {
		case <-pass:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// signalGroup signals the process group led by pid, and pid itself if it
// has moved to another group.
func signalGroup(pid int, sig syscall.Signal) error {
	if pid <= 1 {
		// Never init, and never kill(-1) (everything) or kill(0) (our group).
		return fmt.Errorf("signal pid %d: %w", pid, errdefs.ErrInvalidArgument)
	}
	if pg, err := unix.Getpgid(pid); err == nil && pg != pid {
		_ = unix.Kill(pid, sig)
	}
	return unix.Kill(-pid, sig)
}
