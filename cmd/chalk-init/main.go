// Command chalk-init is PID 1 of every sandbox. It reaps zombies, runs the
// optional entrypoint and serves the process API (package procapi) on a unix
// socket whose directory the host bind-mounts in. Build it static:
//
//	CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/chalk-init ./cmd/chalk-init
//
// Usage:
//
//	chalk-init [--socket /.chalk/run/init.sock] [--user uid[:gid]] [--grace 10s] [--] [entrypoint argv...]
//
// The socket appears only once init accepts connections on it (it is bound
// under a temporary name and renamed), with mode 0600. With an entrypoint,
// the entrypoint's stdout and stderr are init's, and init exits with the
// entrypoint's exit code (128+n if signal n killed it) when it ends; without
// one init serves until it is signalled. --user is the default user of the
// entrypoint and of every exec (init itself keeps its own user).
//
// Started without an entrypoint, init can be activated once through the
// process API (procapi.Client.Activate): that is how a pre-started sandbox
// receives the environment, working directory and entrypoint of the sandbox
// it becomes; from then on it behaves as if started with them.
//
// SIGTERM, SIGINT and SIGHUP are forwarded to every process (as PID 1: all of
// the sandbox; otherwise the process groups init started); init then waits up
// to --grace for the entrypoint (or, without one, for all children) to end,
// and exits. A second signal, or the end of the grace period, kills the rest.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox/seccompbpf"
	"github.com/chalkcompute/chalkcompute/sigrelay"
)

func main() {
	// First of all, before init reads anything or starts anything.
	if err := installSeccomp(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "chalk-init: seccomp: %v\n", err)
		os.Exit(1)
	}
	os.Exit(run(os.Args[1:]))
}

// installSeccomp loads the seccomp filter chalkd compiled (sandbox/seccompbpf)
// from the fd named by --seccomp-fd, if any, into every thread of init
// (TSYNC: the Go runtime's threads exist already), then closes the fd. Every
// process init starts inherits the filter. It runs before the flags are
// parsed (so it only scans for its own) and before anything is read from the
// sandbox: what ran before it is the Go runtime's start and this package's
// own code. An error is fatal: init exits (fail closed), and chalkd in any
// case refuses a sandbox whose init is not filtered.
func installSeccomp(args []string) error {
	fd := -1
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "seccomp-fd" {
			continue
		}
		if !hasVal {
			if i+1 >= len(args) {
				return errors.New("--seccomp-fd without a value")
			}
			i++
			val = args[i]
		}
		n, err := strconv.Atoi(val)
		if err != nil || n <= 2 {
			return fmt.Errorf("--seccomp-fd %q", val)
		}
		fd = n
	}
	if fd < 0 || skipSeccomp {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("fd %d: %w", fd, err)
	}
	if st.Size <= 0 || st.Size > 8*unix.BPF_MAXINSNS {
		return fmt.Errorf("fd %d: %d bytes", fd, st.Size)
	}
	// The program is installed from a private read-only mapping of the
	// memfd, unmapped after: nothing of it stays in init's heap (the kernel
	// keeps its own copy of the filter).
	n := uintptr(st.Size)
	mem, err := unix.MmapPtr(fd, 0, nil, n, unix.PROT_READ, unix.MAP_PRIVATE)
	unix.Close(fd)
	if err != nil {
		return fmt.Errorf("map fd %d: %w", fd, err)
	}
	defer unix.MunmapPtr(mem, n)
	prog, err := seccompbpf.View(unsafe.Slice((*byte)(mem), n))
	if err != nil {
		return err
	}
	return seccompbpf.Install(prog)
}

// run is chalk-init; it returns the exit code.
func run(args []string) int {
	fl := flag.NewFlagSet("chalk-init", flag.ContinueOnError)
	socket := fl.String("socket", "/.chalk/run/init.sock", "unix socket to serve the process API on")
	user := fl.String("user", "", "default user (numeric uid[:gid]) of the entrypoint and of execs")
	grace := fl.Duration("grace", 10*time.Second, "how long to wait for processes to end after a termination signal")
	logMax := fl.Int64("log-max", 0, "cap the console log (stdout, a regular file) at this many bytes, rotating into --log-prev-fd; the entrypoint's output then goes through init (0: no cap)")
	logPrev := fl.Int("log-prev-fd", 0, "fd of the console log's previous part (with --log-max)")
	fl.Int("seccomp-fd", 0, "fd of the compiled seccomp filter to load before anything else (read by main; see installSeccomp)")
	workTasks := fl.Int("workload-tasks-fd", 0, "fd of the `tasks` file (cgroup v1, open for writing) of the cgroup every process init starts begins in; without it init reserves threads instead")
	prestarted := fl.Bool("prestarted", false, "a pre-started sandbox's init: with --workload-tasks-fd, make the thread that forks at start, not at the first exec (the claim's first exec must not wait for it)")
	dropGomaxprocs := fl.Bool("drop-gomaxprocs", false, "GOMAXPROCS in init's environment is chalkd's, for init alone: remove it before init starts anything")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if *dropGomaxprocs {
		// chalkd set GOMAXPROCS=1 so that the runtime starts with one P:
		// with two, a goroutine of the runtime's start can run on the
		// second P before GOMAXPROCS(1) below, which leaves its spans and
		// metadata (~0.3 MiB) in every idle sandbox (docs/ARCHITECTURE.md,
		// "Where the time and memory go", round 6). The sandbox's
		// processes must not inherit it.
		os.Unsetenv("GOMAXPROCS")
	}
	entry := fl.Args()
	var stderr io.Writer = os.Stderr
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "chalk-init: "+format+"\n", a...)
		return code
	}
	var con *console
	if *logMax > 0 {
		var prev *os.File
		if *logPrev > 2 {
			// Inherited from runc without close-on-exec: nothing init
			// starts may get it.
			unix.CloseOnExec(*logPrev)
			prev = os.NewFile(uintptr(*logPrev), "console.1")
		}
		var err error
		if con, err = newConsole(os.Stdout, prev, *logMax); err != nil {
			return fail(1, "%v", err)
		}
		stderr = con
	}
	var pumpDone chan struct{} // closed when the entrypoint's output is all in the log

	// Not dumpable: processes of the sandbox (root among them, without
	// CAP_SYS_PTRACE) can then neither ptrace init nor read its
	// /proc/1/mem or /proc/1/environ. Children regain the flag at execve.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fail(1, "prctl(PR_SET_DUMPABLE): %v", err)
	}
	// One P: init's work (accept, fork, copy output) is small and mostly
	// waiting, and every P and thread is memory held by every idle sandbox
	// (each thread ~26 KiB of kernel and runtime memory; docs/ARCHITECTURE.md,
	// "Where the time and memory go"). chalkd starts init with
	// GOMAXPROCS=1 in its environment (--drop-gomaxprocs above), so this
	// is for an init whose sandbox sets GOMAXPROCS itself.
	runtime.GOMAXPROCS(1)
	// A small heap goal: Go's default lets the heap grow to 4 MiB before the
	// first collection, garbage every idle sandbox would hold; at 20 % the
	// goal is 0.8 MiB (or 1.2x what is live), and init's allocations (a
	// request, a frame buffer) are small and short-lived.
	debug.SetGCPercent(20)
	// Before anything can start a child, so no status is lost.
	reaper := procapi.StartReaper()
	if *workTasks <= 2 {
		reserveThreads(reservedThreads)
	} else if err := keepPidsHeadroom(reaper, *workTasks, func(err error) {
		fmt.Fprintf(stderr, "chalk-init: %v; reserving %d threads instead\n", err, reservedThreads)
		reserveThreads(reservedThreads)
	}); err != nil {
		fmt.Fprintf(stderr, "chalk-init: %v; reserving %d threads instead\n", err, reservedThreads)
		reserveThreads(reservedThreads)
	} else if *prestarted {
		reaper.StartSpawner()
	}
	sigs := make(chan os.Signal, 4)
	if err := sigrelay.NotifyChan(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP); err != nil {
		return fail(1, "signals: %v", err)
	}

	cred, err := procapi.ParseUser(*user)
	if err != nil {
		return fail(2, "%v", err)
	}
	l, err := listen(*socket)
	if err != nil {
		return fail(1, "%v", err)
	}
	trimBaseline()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// startEntry runs the entrypoint in a process group of its own, with
	// init's environment as it is now, as the default user.
	startEntry := func(argv []string) (<-chan unix.WaitStatus, int, error) {
		bin, err := procapi.LookPath(argv[0], os.Environ(), "")
		if err != nil {
			return nil, 127, fmt.Errorf("entrypoint: %w", err)
		}
		devnull, err := os.Open(os.DevNull)
		if err != nil {
			return nil, 1, err
		}
		defer devnull.Close()
		outF, errF := os.Stdout, os.Stderr
		if con != nil {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, 1, err
			}
			defer w.Close()
			outF, errF = w, w
			pumpDone = make(chan struct{})
			go con.pump(r, pumpDone)
		}
		_, ch, err := reaper.Start(bin, argv, &os.ProcAttr{
			Env:   os.Environ(),
			Files: []*os.File{devnull, outF, errF},
			Sys:   &syscall.SysProcAttr{Setpgid: true, Credential: cred},
		})
		if err != nil {
			return nil, 126, fmt.Errorf("start entrypoint %q: %w", argv[0], err)
		}
		return ch, 0, nil
	}

	// A pre-started sandbox (no entrypoint on the command line) is
	// activated once, when it is given to a user: its environment and
	// working directory are set, and its entrypoint started, before the
	// activate call returns, so the first exec already sees them.
	var (
		activateMu sync.Mutex
		activated  = len(entry) > 0
		entryCh    = make(chan (<-chan unix.WaitStatus), 1)
	)
	activate := func(a procapi.Activation) (func(), error) {
		activateMu.Lock()
		defer activateMu.Unlock()
		if activated {
			return nil, fmt.Errorf("activate: this sandbox was activated already: %w", errdefs.ErrFailedPrecondition)
		}
		for _, e := range a.Env {
			k, v, _ := strings.Cut(e, "=")
			if err := os.Setenv(k, v); err != nil {
				return nil, fmt.Errorf("activate: environment %q: %v: %w", k, err, errdefs.ErrInvalidArgument)
			}
		}
		if a.Dir != "" {
			if err := os.MkdirAll(a.Dir, 0o755); err != nil {
				return nil, fmt.Errorf("activate: working directory: %v: %w", err, errdefs.ErrInvalidArgument)
			}
			if cred != nil {
				_ = os.Chown(a.Dir, int(cred.Uid), int(cred.Gid))
			}
			if err := os.Chdir(a.Dir); err != nil {
				return nil, fmt.Errorf("activate: working directory: %v: %w", err, errdefs.ErrInvalidArgument)
			}
		}
		activated = true
		if len(a.Entrypoint) == 0 {
			// The claimed sandbox's first exec is coming: its forking
			// thread (made on demand, see keepPidsHeadroom) is made
			// meanwhile.
			reaper.Prewarm()
			return nil, nil
		}
		ch, code, err := startEntry(a.Entrypoint)
		if err != nil {
			// The sandbox ends as a cold start with this entrypoint would.
			fmt.Fprintf(stderr, "chalk-init: %v\n", err)
			ch = failedEntry(code)
		}
		// Handed to the main loop (which exits when the entrypoint does)
		// only once the answer is out.
		return func() { entryCh <- ch }, nil
	}
	donePumping := func() chan struct{} { // set by startEntry, under activateMu after start
		activateMu.Lock()
		defer activateMu.Unlock()
		return pumpDone
	}
	served := make(chan error, 1)
	go func() {
		served <- procapi.Serve(ctx, l, procapi.ServerOptions{DefaultUser: *user, Activate: activate,
			// Idle: what a burst of execs grew (output buffers, frames)
			// goes back to the host instead of staying in every idle
			// sandbox (docs/ARCHITECTURE.md, "Where the time and memory go").
			OnIdle: trimIfGrown, IdleAfter: idleTrimAfter})
	}()

	var entryExit <-chan unix.WaitStatus
	if len(entry) > 0 {
		ch, code, err := startEntry(entry)
		if err != nil {
			return fail(code, "%v", err)
		}
		entryExit = ch
	}

	for {
		select {
		case ws := <-entryExit:
			drained(donePumping())
			return exitCode(ws)
		case entryExit = <-entryCh:
		case err := <-served:
			return fail(1, "serve: %v", err)
		case sig := <-sigs:
			code := terminate(reaper, sig.(syscall.Signal), entryExit, sigs, *grace)
			drained(donePumping())
			return code
		}
	}
}

// terminate forwards sig, waits up to grace for the processes to end, and
// returns init's exit code.
func terminate(reaper *procapi.Reaper, sig syscall.Signal, entryExit <-chan unix.WaitStatus, sigs <-chan os.Signal, grace time.Duration) int {
	forward(reaper, sig)
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	idle := make(chan error, 1)
	if entryExit == nil {
		go func() { idle <- reaper.WaitIdle(ctx) }()
	}
	select {
	case ws := <-entryExit:
		return exitCode(ws)
	case err := <-idle:
		if err == nil {
			return 128 + int(sig)
		}
	case <-ctx.Done():
	case <-sigs:
	}
	forward(reaper, syscall.SIGKILL)
	return 128 + int(sig)
}

// forward sends sig to every process of the sandbox (init is PID 1 of its
// PID namespace), or else to the process groups init started.
func forward(reaper *procapi.Reaper, sig syscall.Signal) {
	if os.Getpid() == 1 {
		_ = unix.Kill(-1, sig) // all but init itself
		return
	}
	reaper.Signal(sig)
}

// listen binds the socket under a temporary name, restricts it to its owner
// and renames it into place, so it appears only when it accepts.
//
// The socket is made with system calls and handed to net.FileListener:
// net.Listen reads /proc/sys/net/core/somaxconn into a 64 KiB buffer, an
// object held by every idle sandbox (docs/ARCHITECTURE.md, "Where the time
// and memory go", round 8). The backlog asked for is the one net.Listen
// asks for: the kernel cuts it to somaxconn.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	tmp := path + "." + strconv.Itoa(os.Getpid()) + ".tmp"
	_ = os.Remove(tmp)
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	defer f.Close() // net.FileListener keeps a duplicate
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: tmp}); err != nil {
		return nil, &os.PathError{Op: "bind", Path: tmp, Err: err}
	}
	fail := func(err error) (net.Listener, error) {
		os.Remove(tmp)
		return nil, err
	}
	if err := unix.Listen(fd, listenBacklog); err != nil {
		return fail(os.NewSyscallError("listen", err))
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return fail(err)
	}
	return l, nil
}

// listenBacklog is net.Listen's largest backlog; the kernel uses at most
// net.core.somaxconn.
const listenBacklog = 1<<16 - 1

// idleTrimAfter is how long init waits with no connection open before it
// collects and returns its free memory to the host (trimIfGrown);
// trimMinGrowth is how much its anonymous memory must have grown since the
// last time (or since start).
const (
	idleTrimAfter = time.Second
	trimMinGrowth = 1 << 20
)

var (
	trimMu      sync.Mutex
	trimmedAnon int64 // anonymous memory after the last trim, or at start (trimBaseline)
)

// trimBaseline records init's anonymous memory at start, before it serves.
func trimBaseline() {
	trimMu.Lock()
	defer trimMu.Unlock()
	trimmedAnon = anonMemory()
}

// trimIfGrown collects and returns free memory to the host
// (debug.FreeOSMemory) if init's anonymous memory grew by trimMinGrowth
// since it last did (or since start): a burst of execs (output buffers,
// frames) grows the heap to ~2.5 MiB that the runtime would keep. Not for
// less: a collection in an init that has never collected (a pre-started
// sandbox, only pinged and activated) itself costs ~0.2 MiB (the
// collector's first-use structures), more than it frees.
//
// The growth is read from /proc/self/statm, not from the runtime: the
// first runtime/metrics.Read builds the runtime's table of metrics, ~20 KB
// of heap objects in seven size classes, and runtime.ReadMemStats flushes
// every span cache; either would stay in every sandbox that was ever idle
// (docs/ARCHITECTURE.md, "Where the time and memory go", round 8).
func trimIfGrown() {
	trimMu.Lock()
	defer trimMu.Unlock()
	if anon := anonMemory(); anon < 0 || anon-trimmedAnon < trimMinGrowth {
		return
	}
	debug.FreeOSMemory()
	trimmedAnon = anonMemory()
}

// anonMemory is this process's resident anonymous memory in bytes (resident
// less shared pages, /proc/self/statm), or -1 if it cannot be read. It
// allocates nothing.
func anonMemory() int64 {
	fd, err := unix.Open("/proc/self/statm", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	var buf [128]byte
	n, err := unix.Read(fd, buf[:])
	unix.Close(fd)
	if err != nil || n <= 0 {
		return -1
	}
	// size resident shared text lib data dt, in pages
	var f [3]int64
	k := 0
	for _, c := range buf[:n] {
		switch {
		case c >= '0' && c <= '9':
			f[k] = f[k]*10 + int64(c-'0')
		case c == ' ':
			if k++; k == len(f) {
				return (f[1] - f[2]) * int64(os.Getpagesize())
			}
		default:
			return -1
		}
	}
	return -1
}

// keepPidsHeadroom makes sure a fork bomb in the sandbox cannot kill init:
// init shares the sandbox's pids limit with everything in it, and a Go
// program that cannot make a thread when it needs one (a blocking system
// call while serving a request) dies of it, and with init the sandbox.
//
// With tasksFD (a runc sandbox on a node with the pids controller on
// cgroup v1, sandbox.Runtime.Start), the host made a child of the
// sandbox's pids cgroup with a limit below the sandbox's, and every process
// init starts begins there (procapi.Reaper.StartInCgroup): the workload can
// never take the last pids of the sandbox, so init makes threads as it
// needs them. The thread that forks in that cgroup is made when init first
// starts a process, or at start with --prestarted (a pool member: its
// claim's first exec must not wait for a thread creation and a cgroup
// move; an older chalkd's pool member makes it when activated), and kept: a
// sandbox never used keeps no thread for it, nor the runtime's template
// thread (docs/ARCHITECTURE.md, "Where the time and memory go", round 8;
// ending it when idle put a thread creation and a cgroup move on the next
// exec). Without tasksFD init makes its threads ahead
// (reserveThreads); each costs ~40 KiB of every idle sandbox (round 4).
// onFail runs if a later move into the cgroup fails.
func keepPidsHeadroom(reaper *procapi.Reaper, tasksFD int, onFail func(error)) error {
	// Inherited from runc without close-on-exec; kept open (the forking
	// thread is moved in when it is made). The sandbox cannot
	// reach it: init is not dumpable, and no process it starts inherits it.
	unix.CloseOnExec(tasksFD)
	f := os.NewFile(uintptr(tasksFD), "workload-tasks")
	if err := reaper.StartInCgroup(f, onFail); err != nil {
		f.Close()
		return err
	}
	return nil
}

// reservedThreads is how many OS threads init makes at start: with one P,
// enough for the requests that block in system calls at once under a fork
// bomb (TestEscapeForkBomb serves an exec, a file write and a signal).
const reservedThreads = 8

// reserveThreads makes n OS threads now and leaves them idle in the Go
// runtime (which keeps idle threads for reuse). Init shares the sandbox's
// pids limit with everything in it: under a fork bomb every pid is taken,
// and a Go program that then needs a new thread (a blocking syscall while
// serving a request) dies of it — and with init, the sandbox. With threads
// made ahead, serving the file API and execs through a bomb needs none.
func reserveThreads(n int) {
	var locked, release sync.WaitGroup
	locked.Add(n)
	release.Add(1)
	for range n {
		go func() {
			runtime.LockOSThread() // this goroutine's thread is now its own
			locked.Done()
			release.Wait()
			runtime.UnlockOSThread()
		}()
	}
	locked.Wait()
	release.Done()
}

// failedEntry is the exit of an entrypoint that could not be started.
func failedEntry(code int) <-chan unix.WaitStatus {
	ch := make(chan unix.WaitStatus, 1)
	ch <- unix.WaitStatus(code << 8)
	return ch
}

func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
