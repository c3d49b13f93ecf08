// Command probe makes a list of system calls, each in a child process, and
// prints what each got: "ok", an errno, or the signal that killed it. With
// -install FILE it first loads the compiled filter in FILE (as chalk-init
// does); "sleep" sleeps (for reading the filter a runtime installed).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/sandbox/seccompbpf"
	"golang.org/x/sys/unix"
)

type probe struct {
	name string
	nr   uintptr
	args [6]uintptr
}

var probes = []probe{
	{"getpid", unix.SYS_GETPID, [6]uintptr{}},
	{"unshare user", unix.SYS_UNSHARE, [6]uintptr{unix.CLONE_NEWUSER}},
	{"unshare ns", unix.SYS_UNSHARE, [6]uintptr{unix.CLONE_NEWNS}},
	{"mount", unix.SYS_MOUNT, [6]uintptr{}},
	{"keyctl", unix.SYS_KEYCTL, [6]uintptr{0}},
	{"add_key", unix.SYS_ADD_KEY, [6]uintptr{}},
	{"bpf", unix.SYS_BPF, [6]uintptr{}},
	{"kexec_load", unix.SYS_KEXEC_LOAD, [6]uintptr{}},
	{"setns", unix.SYS_SETNS, [6]uintptr{^uintptr(0)}},
	// clone: CLONE_SIGHAND without CLONE_VM passes the filter and fails
	// with EINVAL in the kernel; with a namespace flag the filter refuses.
	{"clone sighand", unix.SYS_CLONE, [6]uintptr{unix.CLONE_SIGHAND}},
	{"clone newns", unix.SYS_CLONE, [6]uintptr{unix.CLONE_SIGHAND | unix.CLONE_NEWNS}},
	{"clone newuser", unix.SYS_CLONE, [6]uintptr{unix.CLONE_SIGHAND | unix.CLONE_NEWUSER}},
	{"clone high half", unix.SYS_CLONE, [6]uintptr{1<<32 | unix.CLONE_SIGHAND}},
	{"clone3", unix.SYS_CLONE3, [6]uintptr{}},
	{"socket unix", unix.SYS_SOCKET, [6]uintptr{unix.AF_UNIX, unix.SOCK_DGRAM}},
	{"socket 37", unix.SYS_SOCKET, [6]uintptr{37, unix.SOCK_DGRAM}},
	{"socket 38", unix.SYS_SOCKET, [6]uintptr{38, unix.SOCK_DGRAM}},
	{"socket 39", unix.SYS_SOCKET, [6]uintptr{39, unix.SOCK_DGRAM}},
	{"socket vsock", unix.SYS_SOCKET, [6]uintptr{unix.AF_VSOCK, unix.SOCK_DGRAM}},
	{"socket 46", unix.SYS_SOCKET, [6]uintptr{46, unix.SOCK_DGRAM}},
	{"socket high half", unix.SYS_SOCKET, [6]uintptr{1<<32 | unix.AF_UNIX, unix.SOCK_DGRAM}},
	{"personality query", unix.SYS_PERSONALITY, [6]uintptr{0xffffffff}},
	{"personality 64-bit -1", unix.SYS_PERSONALITY, [6]uintptr{^uintptr(0)}},
	{"personality linux", unix.SYS_PERSONALITY, [6]uintptr{0}},
	{"personality 1", unix.SYS_PERSONALITY, [6]uintptr{1}},
	{"uretprobe (gap)", 335, [6]uintptr{}},
	{"statmount (above)", 457, [6]uintptr{}},
	{"nr 1000", 1000, [6]uintptr{}},
	{"nr 0x80000000", 0x80000000, [6]uintptr{}},
	{"nr -1", 0xffffffff, [6]uintptr{}},
	{"x32 getpid", unix.SYS_GETPID | 0x40000000, [6]uintptr{}},
	{"x32 1000", 1000 | 0x40000000, [6]uintptr{}},
}

// The main goroutine keeps the thread group leader, so that a probe's
// killed thread is never the leader (whose exit a thread pidfd reports only
// with the whole process's).
func init() { runtime.LockOSThread() }

func main() {
	install := flag.String("install", "", "load this compiled filter first")
	flag.Parse()
	switch flag.Arg(0) {
	case "sleep":
		time.Sleep(time.Hour)
		return
	case "one":
		i, _ := strconv.Atoi(flag.Arg(1))
		fmt.Print(one(probes[i]))
		return
	}
	if *install != "" {
		b, err := os.ReadFile(*install)
		if err != nil {
			fatal(err)
		}
		prog, err := seccompbpf.Decode(b)
		if err != nil {
			fatal(err)
		}
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			fatal(err)
		}
		if err := seccompbpf.Install(prog); err != nil {
			fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	for i, p := range probes {
		out, err := exec.Command(self, "one", strconv.Itoa(i)).Output()
		res := string(out)
		if ee, ok := err.(*exec.ExitError); ok {
			if ws := ee.Sys().(syscall.WaitStatus); ws.Signaled() {
				res = "signal " + ws.Signal().String()
			} else {
				res = fmt.Sprintf("exit %d", ws.ExitStatus())
			}
		} else if err != nil {
			fatal(err)
		}
		fmt.Printf("%s: %s\n", p.name, res)
	}
}

// one makes the call on a thread of its own and returns its result, or
// "killed" if the filter killed the thread (SECCOMP_RET_KILL_THREAD kills
// only the calling thread of a multi-threaded process: the exit of that
// thread is seen through a thread pidfd).
func one(p probe) string {
	res := make(chan string, 2)
	tid := make(chan int)
	start := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread stays while the result is read
		tid <- unix.Gettid()
		<-start
		_, _, e := syscall.RawSyscall6(p.nr, p.args[0], p.args[1], p.args[2], p.args[3], p.args[4], p.args[5])
		if e != 0 {
			res <- fmt.Sprintf("errno %d", e)
		} else {
			res <- "ok"
		}
		select {}
	}()
	pfd, err := unix.PidfdOpen(<-tid, pidfdThread)
	if err != nil {
		fatal(err)
	}
	close(start)
	go func() {
		fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil {
				res <- "killed"
				return
			} else if err != unix.EINTR {
				fatal(err)
			}
		}
	}()
	return <-res
}

// pidfdThread is PIDFD_THREAD (Linux 6.9): a pidfd of one thread.
const pidfdThread = unix.O_EXCL

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "probe:", err)
	os.Exit(1)
}
