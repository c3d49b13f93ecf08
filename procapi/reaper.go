package procapi

import (
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper is the one place that waits for child processes. As PID 1 (or a
// child subreaper) init inherits orphans; a single wait4(-1) loop reaps them
// all and hands the statuses of the processes we started to their waiters.
// Spawning goes through Reaper.Start, which holds the lock across fork and
// registration so a fast-exiting child cannot be reaped before it is known.
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
	sigs    chan os.Signal
	stop    chan struct{}
}

// NewReaper starts reaping children of this process. If it is not PID 1 it
// becomes a child subreaper so orphans of its children come to it too.
func NewReaper() *Reaper {
	if os.Getpid() != 1 {
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	}
	r := &Reaper{waiters: map[int]chan unix.WaitStatus{}, sigs: make(chan os.Signal, 64), stop: make(chan struct{})}
	signal.Notify(r.sigs, syscall.SIGCHLD)
	go r.loop()
	return r
}

// Close stops reaping.
func (r *Reaper) Close() {
	signal.Stop(r.sigs)
	close(r.stop)
}

func (r *Reaper) loop() {
	for {
		select {
		case <-r.stop:
			return
		case <-r.sigs:
			r.reap()
		}
	}
}

func (r *Reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		if ch, ok := r.waiters[pid]; ok {
			delete(r.waiters, pid)
			ch <- ws
		}
	}
}

// Start starts a process and returns a channel that receives its wait status.
func (r *Reaper) Start(argv0 string, argv []string, attr *os.ProcAttr) (*os.Process, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, err := os.StartProcess(argv0, argv, attr)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[p.Pid] = ch
	// Children are the OOM killer's preferred victims, so a memory bomb kills
	// the bomb, not init (and with it the sandbox). Raising a score needs no
	// privilege, unlike lowering init's.
	_ = os.WriteFile("/proc/"+strconv.Itoa(p.Pid)+"/oom_score_adj", []byte("500"), 0)
	// Reap anything that exited before we registered (a SIGCHLD may have
	// arrived while we held the lock; the loop will also run).
	go r.reap()
	return p, ch, nil
}
