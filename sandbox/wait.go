package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// waitPid blocks until pid exits, using a pidfd registered with Go's netpoller
// (no thread is parked per sandbox). If pid is our child (we are its subreaper)
// it is reaped and its status returned; otherwise the exit is only observed.
func waitPid(ctx context.Context, pid int) (Exit, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return Exit{}, nil // already gone and reaped by someone else
	}
	if err != nil {
		return Exit{}, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return Exit{}, err
	}
	stop := context.AfterFunc(ctx, func() { _ = f.Close() })
	defer stop()
	var ex Exit
	var done bool
	rerr := rc.Read(func(fd uintptr) bool {
		var info unix.Siginfo
		werr := unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
		switch {
		case werr == nil && sigchldPid(&info) != 0:
			ex, done = exitFromSiginfo(&info), true
			return true
		case errors.Is(werr, unix.ECHILD):
			// Not our child: readable pidfd means it exited.
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, _ := unix.Poll(pfd, 0); n > 0 {
				done = true
				return true
			}
		}
		return false
	})
	if !done {
		if ctx.Err() != nil {
			return Exit{}, ctx.Err()
		}
		return Exit{}, fmt.Errorf("wait for pid %d: %w", pid, rerr)
	}
	return ex, nil
}

// exitedChan is closed when pid exits (without reaping it) or ctx ends.
func exitedChan(ctx context.Context, pid int) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
		if err != nil {
			return
		}
		f := os.NewFile(uintptr(fd), "pidfd")
		defer f.Close()
		rc, err := f.SyscallConn()
		if err != nil {
			return
		}
		stop := context.AfterFunc(ctx, func() { _ = f.Close() })
		defer stop()
		_ = rc.Read(func(fd uintptr) bool {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(pfd, 0)
			return n > 0
		})
	}()
	return ch
}

// sigchldFields is the SIGCHLD layout of siginfo_t after its 16-byte header.
type sigchldFields struct {
	Pid    int32
	UID    uint32
	Status int32
}

func sigchld(info *unix.Siginfo) *sigchldFields {
	return (*sigchldFields)(unsafe.Pointer(uintptr(unsafe.Pointer(info)) + 16))
}

func sigchldPid(info *unix.Siginfo) int32 { return sigchld(info).Pid }

// exitFromSiginfo decodes a waitid result.
func exitFromSiginfo(info *unix.Siginfo) Exit {
	f := sigchld(info)
	const cldExited, cldKilled, cldDumped = 1, 2, 3
	switch info.Code {
	case cldExited:
		return Exit{Code: int(f.Status), Known: true}
	case cldKilled, cldDumped:
		sig := unix.Signal(f.Status)
		return Exit{Code: 128 + int(f.Status), Signal: unix.SignalName(sig), Known: true}
	}
	return Exit{}
}

// watchCreate reports on the returned channel when an entry called name is
// created in, or renamed into, dir (init binds its socket under a temporary
// name and renames it into place). Start the watch before whatever creates
// the entry; stop releases it without waiting (the returned channel is
// closed once the watch's descriptor is closed). The channel never fires
// for entries that existed before the watch.
//
// stop does not wait because closing an inotify descriptor does: the
// kernel destroys the instance's marks and waits for an SRCU grace period
// (fsnotify_destroy_group), measured at 10-35 ms per close under load on
// 2 cores (issue #18 round 4) — on every cold start's path, after init
// was already serving.
func watchCreate(dir, name string) (appeared <-chan struct{}, stop func() <-chan struct{}, err error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, nil, fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("inotify watch %s: %w", dir, err)
	}
	// Non-blocking, so reads park in Go's netpoller and Close ends them.
	f := os.NewFile(uintptr(fd), "inotify")
	ch := make(chan struct{})
	go func() {
		buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				end := off + unix.SizeofInotifyEvent + int(ev.Len)
				if end > n {
					break
				}
				got := string(bytes.TrimRight(buf[off+unix.SizeofInotifyEvent:end], "\x00"))
				if got == name {
					close(ch)
					return
				}
				off = end
			}
		}
	}()
	var once sync.Once
	closed := make(chan struct{})
	return ch, func() <-chan struct{} {
		once.Do(func() {
			go func() {
				_ = f.Close()
				close(closed)
			}()
		})
		return closed
	}, nil
}
