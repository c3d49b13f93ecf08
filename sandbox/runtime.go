// Package sandbox runs sandboxes with runc: an overlay rootfs over the node
// cache's extracted layers, an OCI bundle, `runc run -d`, and our own init
// (cmd/chalk-init) as PID 1 serving the process API (package procapi) on a unix
// socket the host holds. Exec never spawns `runc exec`.
//
// Layout of one sandbox on the host (Config.StateDir/<id>, a size-limited tmpfs:
// the disk quota, see disk.go):
//
//	bundle/config.json   OCI spec
//	rootfs/              overlay mount point (lower = image layers, upper/work below)
//	upper/ work/         the sandbox's writable layer
//	run/                 bind-mounted at /.chalk/run; holds init.sock
//	etc/                 resolv.conf, hosts, hostname bind-mounted into /etc
//
// Config.LogDir/<id>.log holds init's (and the entrypoint's) stdout and stderr
// and outlives the sandbox.
//
// The chalkd process should be a child subreaper (see SetSubreaper) so that a
// sandbox's init becomes its child once `runc run -d` returns; Wait then reaps
// it and reports the exit status. After a chalkd restart the sandboxes belong to
// the host's PID 1, and Wait falls back to observing the exit through a pidfd.
package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Paths inside every sandbox.
const (
	InitPath    = "/.chalk/bin/chalk-init"
	ChalkPath   = "/usr/local/bin/chalk"
	RunDir      = "/.chalk/run"
	SocketName  = "init.sock"
	IdentityDir = "/.chalk/identity"
)

// Config configures a Runtime. Zero values get the documented defaults.
type Config struct {
	StateDir   string // per-sandbox directories; required
	LogDir     string // console logs, kept after a sandbox ends; default StateDir/../logs
	RuncRoot   string // runc --root; default /run/chalk/runc
	RuncBinary string // default "runc" from PATH (or "runsc" with Runtime RuntimeRunsc)
	// Runtime is the OCI runtime: RuntimeRunc (default) or RuntimeRunsc
	// (gVisor: the sandbox's kernel is gVisor's Sentry; see runsc.go).
	Runtime      string
	InitBinary   string // host path of the static chalk-init; required
	ChalkBinary  string // host path of the chalk CLI, mounted at /usr/local/bin/chalk; optional
	CgroupParent string // cgroupfs parent of every sandbox's cgroup; default "/chalk"
	// Disk is how the writable layer's quota is enforced: DiskTmpfs (default)
	// or DiskNone. See disk.go.
	Disk string
	// DefaultDiskMB is the writable-layer quota of a Spec without DiskMB;
	// default DefaultDiskMB (10 GiB).
	DefaultDiskMB int64
	// LogMaxBytes caps each console log (default DefaultLogMaxBytes): init
	// rotates it into LogPath+".1" (see cmd/chalk-init's console), so at
	// most twice this is kept per sandbox. On runsc (no extra fds) init
	// empties the log at the cap instead: at most this, no .1.
	LogMaxBytes int64
	// Seccomp is who loads the sandbox's seccomp filter with the runc
	// runtime: SeccompInit (default) compiles the profile once per distinct
	// profile in chalkd (package seccompbpf) and chalk-init loads it first
	// thing; SeccompRunc leaves the profile in the spec for runc and
	// libseccomp to compile on every start. runsc always keeps it in the
	// spec (gVisor's Sentry implements it). See seccomp.go.
	Seccomp string
	Logger  *slog.Logger
}

// DefaultLogMaxBytes is Config.LogMaxBytes's default.
const DefaultLogMaxBytes = 8 << 20

// Runtime creates, watches and destroys sandboxes on this node.
type Runtime struct {
	cfg  Config
	runc *runc.Runc
	log  *slog.Logger

	// helpers are the helper children (runsc's gofer) of sandboxes killed
	// by Kill, found while they were alive: once dead they are zombies no
	// longer in the sandbox's cgroup, and destroy must still reap them.
	helpersMu sync.Mutex
	helpers   map[string][]int

	seccomp seccompCache
}

// noteHelpers records sandbox id's helper children (see helpers).
func (r *Runtime) noteHelpers(id string) {
	hs := r.helperChildren(id)
	if len(hs) == 0 {
		return
	}
	r.helpersMu.Lock()
	defer r.helpersMu.Unlock()
	if r.helpers == nil {
		r.helpers = map[string][]int{}
	}
	r.helpers[id] = hs
}

// takeHelpers returns sandbox id's helper children: those Kill recorded and
// those alive in its cgroup now.
func (r *Runtime) takeHelpers(id string) []int {
	r.helpersMu.Lock()
	hs := r.helpers[id]
	delete(r.helpers, id)
	r.helpersMu.Unlock()
	for _, pid := range r.helperChildren(id) {
		if !slices.Contains(hs, pid) {
			hs = append(hs, pid)
		}
	}
	return hs
}

// New checks the configuration and prepares the state directories.
func New(cfg Config) (*Runtime, error) {
	if cfg.StateDir == "" || cfg.InitBinary == "" {
		return nil, fmt.Errorf("sandbox runtime: StateDir and InitBinary are required: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.LogDir == "" {
		cfg.LogDir = filepath.Join(filepath.Dir(cfg.StateDir), "logs")
	}
	if cfg.RuncRoot == "" {
		cfg.RuncRoot = "/run/chalk/runc"
	}
	switch cfg.Runtime {
	case "", RuntimeRunc:
		cfg.Runtime = RuntimeRunc
	case RuntimeRunsc:
	default:
		return nil, fmt.Errorf("sandbox runtime %q: want %q or %q: %w", cfg.Runtime, RuntimeRunc, RuntimeRunsc, errdefs.ErrInvalidArgument)
	}
	if cfg.RuncBinary == "" {
		cfg.RuncBinary = cfg.Runtime
	}
	switch cfg.Seccomp {
	case "":
		cfg.Seccomp = SeccompInit
	case SeccompInit, SeccompRunc:
	default:
		return nil, fmt.Errorf("sandbox runtime: seccomp loader %q: want %q or %q: %w", cfg.Seccomp, SeccompInit, SeccompRunc, errdefs.ErrInvalidArgument)
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = "/chalk"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Disk == "" {
		cfg.Disk = DiskTmpfs
	}
	if cfg.Disk != DiskTmpfs && cfg.Disk != DiskNone {
		return nil, fmt.Errorf("sandbox runtime: disk backend %q: want %q or %q: %w", cfg.Disk, DiskTmpfs, DiskNone, errdefs.ErrInvalidArgument)
	}
	if cfg.DefaultDiskMB == 0 {
		cfg.DefaultDiskMB = DefaultDiskMB
	}
	if cfg.LogMaxBytes == 0 {
		cfg.LogMaxBytes = DefaultLogMaxBytes
	}
	if _, err := os.Stat(cfg.InitBinary); err != nil {
		return nil, fmt.Errorf("sandbox init binary: %w", err)
	}
	bin, err := exec.LookPath(cfg.RuncBinary)
	if err != nil {
		if cfg.Runtime == RuntimeRunsc {
			return nil, fmt.Errorf("runsc not found (scripts/gvisor.sh builds it from gvisor.dev's Go module): %w", err)
		}
		return nil, fmt.Errorf("runc not found (install Debian's runc): %w", err)
	}
	for _, d := range []string{cfg.StateDir, cfg.RuncRoot} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return nil, err
		}
	}
	// Console logs are the sandboxes' output: chalkd's alone.
	if err := os.MkdirAll(cfg.LogDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(cfg.LogDir, 0o700); err != nil {
		return nil, err
	}
	return &Runtime{
		cfg:  cfg,
		runc: &runc.Runc{Command: bin, Root: cfg.RuncRoot, ExtraArgs: runtimeArgs(cfg.Runtime)},
		log:  cfg.Logger,
	}, nil
}

// SetSubreaper makes the calling process a child subreaper, so sandbox inits
// are reparented to it when runc exits. Call once at daemon start.
func SetSubreaper() error { return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }

// Bind is an extra bind mount into a sandbox.
type Bind struct {
	Source, Dest string
	ReadOnly     bool
}

// Spec describes one sandbox to start.
type Spec struct {
	ID         string
	LowerDirs  []string // image layers, top-most first
	Entrypoint []string // optional: run under init; the sandbox ends when it exits
	Env        []string
	Workdir    string
	User       string // name, uid or uid:gid; names resolve through the image's /etc/passwd
	CPU        float64
	Memory     int64 // bytes
	Pids       int64
	DiskMB     int64 // writable-layer quota in MiB; 0 = Config.DefaultDiskMB
	NetnsPath  string
	UserNS     *UserNS // nil: the sandbox's root is the host's root (confined by the rest)
	ResolvConf []byte
	Hosts      []byte
	Binds      []Bind
}

// prepareUserNS gives the sandbox's root what it must own on the host: its
// directory is root:HostID 0710, so the sandbox's root (runc's init joins
// the user namespace before it mounts the rootfs and binds) can pass through
// it and no other sandbox's uids can (even after an escape, another
// sandbox's writable layer, run dir and files are out of reach); the upper
// dir (the rootfs's / and everything the sandbox writes) and the run dir
// (init makes its socket there) belong to the sandbox's root.
// (CheckUserNS, called once at daemon start, checks that the sandbox's
// root can reach the state dir and binaries.)
func (r *Runtime) prepareUserNS(dir string, u *UserNS) error {
	id := int(u.HostID)
	if err := os.Chown(dir, 0, id); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o710); err != nil {
		return err
	}
	for _, d := range []string{"upper", "run"} {
		if err := os.Chown(filepath.Join(dir, d), id, id); err != nil {
			return err
		}
	}
	return nil
}

// CheckUserNS reports whether sandboxes with user namespaces can run here:
// their root, an unprivileged host uid, must reach the state dir and the
// binaries bind-mounted into every sandbox.
func (r *Runtime) CheckUserNS() error {
	return searchableByAll(r.cfg.StateDir, r.cfg.InitBinary, r.cfg.ChalkBinary)
}

// searchableByAll checks that a sandbox's root, an unprivileged host uid,
// can reach each path: every directory above it searchable by others, and
// the file itself readable and executable. Dockerd's data dir is 0711 under
// user namespace remapping for the same reason.
func searchableByAll(paths ...string) error {
	for _, p := range paths {
		if p == "" {
			continue
		}
		p, err := filepath.Abs(p)
		if err != nil {
			return err
		}
		for d := p; ; d = filepath.Dir(d) {
			st, err := os.Stat(d)
			if err != nil {
				return err
			}
			want := os.FileMode(0o001)
			if !st.IsDir() {
				want = 0o005
			}
			if st.Mode().Perm()&want != want {
				return fmt.Errorf("%s (mode %v) is not reachable by sandboxes running in user namespaces: %s needs o+x on every directory above it and o+rx on the file: %w",
					d, st.Mode().Perm(), p, errdefs.ErrFailedPrecondition)
			}
			if d == "/" {
				break
			}
		}
	}
	return nil
}

// Dir is the host directory of sandbox id.
func (r *Runtime) Dir(id string) string { return filepath.Join(r.cfg.StateDir, id) }

// LogPath is the console log of sandbox id.
func (r *Runtime) LogPath(id string) string { return filepath.Join(r.cfg.LogDir, id+".log") }

// cgroupPath is the cgroupfs path of sandbox id.
func (r *Runtime) cgroupPath(id string) string { return filepath.Join(r.cfg.CgroupParent, id) }

// Start creates and starts the sandbox and returns once its init serves the
// process API. On error everything it made is removed.
func (r *Runtime) Start(ctx context.Context, sp Spec) (pid int, err error) {
	if !validID(sp.ID) {
		return 0, fmt.Errorf("sandbox id %q: %w", sp.ID, errdefs.ErrInvalidArgument)
	}
	start := time.Now()
	dir := r.Dir(sp.ID)
	if _, err := os.Stat(dir); err == nil {
		return 0, fmt.Errorf("sandbox %q: %w", sp.ID, errdefs.ErrAlreadyExists)
	}
	diskMB, err := r.diskMB(sp)
	if err != nil {
		return 0, err
	}
	started := 0 // init's pid once runc ran it
	defer func() {
		if err != nil {
			if derr := r.Destroy(context.WithoutCancel(ctx), sp.ID); derr != nil {
				r.log.Warn("cleanup after failed start", "sandbox", sp.ID, "err", derr)
			} else if started > 0 {
				r.reap(ctx, sp.ID, started)
			}
		}
	}()
	if err := r.makeDir(dir, diskMB); err != nil {
		return 0, err
	}
	for _, d := range []string{"bundle", "rootfs", "upper", "work", "run", "etc", "empty"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return 0, err
		}
	}
	rootfs := filepath.Join(dir, "rootfs")
	lowers := sp.LowerDirs
	if sp.UserNS != nil {
		if err := r.prepareUserNS(dir, sp.UserNS); err != nil {
			return 0, err
		}
		if lowers, err = idmapLowers(lowers, sp.UserNS.Path, filepath.Join(dir, "lower")); err != nil {
			return 0, fmt.Errorf("sandbox %q image layers: %w", sp.ID, err)
		}
	}
	if len(lowers) == 0 {
		lowers = []string{filepath.Join(dir, "empty")}
	}
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", strings.Join(lowers, ":"),
		filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	if err := unix.Mount("overlay", rootfs, "overlay", 0, data); err != nil {
		return 0, fmt.Errorf("mount overlay rootfs: %w", err)
	}
	etc := filepath.Join(dir, "etc")
	files := map[string][]byte{
		"hostname":    []byte(sp.ID + "\n"),
		"hosts":       sp.Hosts,
		"resolv.conf": sp.ResolvConf,
	}
	if files["hosts"] == nil {
		files["hosts"] = []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + sp.ID + "\n")
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(etc, name), b, 0o644); err != nil {
			return 0, err
		}
	}
	user, err := resolveUser(rootfs, sp.User)
	if err != nil {
		return 0, err
	}
	// Init runs as root (it owns the socket and reaps); the image's user is
	// the default for the entrypoint and every exec.
	args := []string{InitPath, "--socket", RunDir + "/" + SocketName}
	// The log's previous part is init's fd 3 (ExtraFiles below); runsc
	// passes no extra fds, so on gVisor init empties the log at the cap.
	prevLog := r.cfg.Runtime == RuntimeRunc
	args = append(args, "--log-max", strconv.FormatInt(r.cfg.LogMaxBytes, 10))
	env, dropGomaxprocs := initEnv(sp.Env)
	if dropGomaxprocs {
		args = append(args, "--drop-gomaxprocs")
	}
	if prevLog {
		args = append(args, "--log-prev-fd", "3")
	}
	// The workload's pids cgroup (workcg.go): its tasks file is init's
	// next fd (ExtraFiles below).
	tasks, err := r.workloadTasks(sp.ID, sp.Pids)
	if err != nil {
		return 0, fmt.Errorf("sandbox %q: %w", sp.ID, err)
	}
	if tasks != nil {
		defer tasks.Close()
		fd := 3
		if prevLog {
			fd = 4
		}
		args = append(args, "--workload-tasks-fd", strconv.Itoa(fd))
	}
	// The compiled seccomp filter (seccomp.go) is init's next fd.
	seccompFD := 3
	if prevLog {
		seccompFD++
	}
	if tasks != nil {
		seccompFD++
	}
	if user != "" {
		args = append(args, "--user", user)
	}
	if len(sp.Entrypoint) > 0 {
		args = append(append(args, "--"), sp.Entrypoint...)
	}
	opts := []SpecOpt{
		WithProcess(args, env, sp.Workdir, ""),
		WithHostname(sp.ID),
		WithResources(r.cgroupPath(sp.ID), sp.CPU, sp.Memory, sp.Pids),
		WithSeccomp(),
		WithBind(r.cfg.InitBinary, InitPath, true),
		WithBind(filepath.Join(dir, "run"), RunDir, false),
		WithBind(filepath.Join(etc, "hostname"), "/etc/hostname", true),
		WithBind(filepath.Join(etc, "hosts"), "/etc/hosts", true),
	}
	if sp.ResolvConf != nil {
		opts = append(opts, WithBind(filepath.Join(etc, "resolv.conf"), "/etc/resolv.conf", true))
	}
	if sp.NetnsPath != "" {
		opts = append(opts, WithNetNS(sp.NetnsPath))
	}
	if sp.UserNS != nil {
		opts = append(opts, WithUserNS(sp.UserNS.Path, sp.UserNS.HostID, sp.UserNS.Size))
	}
	if r.cfg.ChalkBinary != "" {
		opts = append(opts, WithBind(r.cfg.ChalkBinary, ChalkPath, true))
	}
	for _, b := range sp.Binds {
		opts = append(opts, WithBind(b.Source, b.Dest, b.ReadOnly))
	}
	spec, err := GenerateSpec(opts...)
	if err != nil {
		return 0, fmt.Errorf("sandbox %q spec: %v: %w", sp.ID, err, errdefs.ErrInvalidArgument)
	}
	spec.Root.Path = rootfs
	filter, err := r.takeSeccomp(spec, seccompFD)
	if err != nil {
		return 0, fmt.Errorf("sandbox %q: %w", sp.ID, err)
	}
	if filter != nil {
		defer filter.Close()
	}
	cfgJSON, err := json.Marshal(spec)
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle", "config.json"), cfgJSON, 0o600); err != nil {
		return 0, err
	}
	// Read-write: init reads the log to rotate it into the previous part.
	logf, err := os.OpenFile(r.LogPath(sp.ID), os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o600)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	var extra []*os.File
	if prevLog {
		prev, err := os.OpenFile(r.LogPath(sp.ID)+".1", os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return 0, err
		}
		defer prev.Close()
		extra = []*os.File{prev}
	}
	if tasks != nil {
		extra = append(extra, tasks)
	}
	if filter != nil {
		extra = append(extra, filter)
	}
	pidFile := filepath.Join(dir, initPidFile)
	// Watch for init's socket before init can make it: readiness is then an
	// event, not a poll.
	appeared, stopWatch, werr := watchCreate(filepath.Join(dir, "run"), SocketName)
	if werr != nil {
		r.log.Warn("no inotify: polling for init's socket", "sandbox", sp.ID, "err", werr)
	} else {
		defer stopWatch()
	}
	tRun := time.Now()
	if _, err := r.runc.Run(ctx, sp.ID, filepath.Join(dir, "bundle"), &runc.CreateOpts{
		IO:         fileIO{logf},
		PidFile:    pidFile,
		Detach:     true,
		ExtraFiles: extra,
	}); err != nil {
		return 0, fmt.Errorf("runc run %s: %w (%s)", sp.ID, err, tail(r.LogPath(sp.ID), 2048))
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, fmt.Errorf("sandbox %q pid file: %w", sp.ID, err)
	}
	pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("sandbox %q pid file: %w", sp.ID, err)
	}
	started = pid
	tReady := time.Now()
	readyCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	defer func() {
		if err == nil {
			r.log.Debug("sandbox runtime started", "sandbox", sp.ID, "prepare", tRun.Sub(start), "runc_run", tReady.Sub(tRun), "init_ready", time.Since(tReady))
		}
	}()
	if err := r.waitReady(readyCtx, sp.ID, pid, appeared); err != nil {
		// An entrypoint that ends at once ends the sandbox at once: that is a
		// successful start (the watcher records the exit). Init's own failures
		// are logged with its name and fail the start.
		if errors.Is(err, errExitedEarly) && !strings.Contains(tail(r.LogPath(sp.ID), 4096), "chalk-init:") && len(sp.Entrypoint) > 0 {
			return pid, nil
		}
		return 0, err
	}
	if filter != nil {
		// The host's check that the boundary holds: init loads the
		// filter before it serves, so a served init without one is a
		// broken init and its sandbox is never used.
		if err := checkFiltered(pid); err != nil {
			return 0, fmt.Errorf("sandbox %q: %w", sp.ID, err)
		}
	}
	return pid, nil
}

var errExitedEarly = errors.New("init exited during start")

// waitReady waits until init serves, failing early if init dies first.
// appeared (nil: none) fires when init's socket is in place; without it the
// client polls.
func (r *Runtime) waitReady(ctx context.Context, id string, pid int, appeared <-chan struct{}) error {
	done := make(chan error, 1)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		if appeared != nil {
			select {
			case <-appeared:
			case <-wctx.Done():
			}
		}
		done <- r.Client(id).WaitReady(wctx)
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("sandbox %q init not ready: %w (%s)", id, err, tail(r.LogPath(id), 2048))
		}
		return nil
	case <-exitedChan(wctx, pid):
		return fmt.Errorf("sandbox %q: %w: %s: %w", id, errExitedEarly, tail(r.LogPath(id), 2048), errdefs.ErrFailedPrecondition)
	}
}

// helperChildren lists the processes of sandbox id, other than its init,
// that are children of this process: runsc's gofer, reparented to chalkd
// (the subreaper) like the sandbox process, is one. Destroy reaps them;
// init is left to whoever watches it (the control plane's watcher, or the
// pre-start pool for its members).
//
// Under runc there are none once runc has written init's pid: every other
// process of the sandbox is in init's pid namespace, and the kernel
// reparents an orphan of a pid namespace to a subreaper of that namespace
// or to its init, never to a subreaper outside it (find_new_reaper); runc
// leaves no process of its own (chalkd never runs `runc exec`). So the
// scan, which reads every chalkd thread's children and the cgroup of each
// child (~0.5 ms per call under churn, growing with the live sandboxes), is
// skipped. Without the pid file (runc died before writing it) init itself
// may be an unknown child: the scan runs, unless runc's state directory is
// gone too (runcStateGone: no container ever, or one deleted after its init
// ended, as when a kept writable layer is removed; a `runc run` that fails
// kills and waits for the init it made before it removes the directory,
// and a runc killed midway leaves the directory). TestRuncNoHelpers.
func (r *Runtime) helperChildren(id string) []int {
	initPID, _ := r.initPid(id)
	if r.cfg.Runtime == RuntimeRunc && (initPID > 0 || r.runcStateGone(id)) {
		return nil
	}
	cg := r.cgroupPath(id)
	var out []int
	for _, pid := range ownChildren() {
		if pid == initPID {
			continue
		}
		if in, _ := inCgroup(pid, cg); in {
			out = append(out, pid)
		}
	}
	return out
}

// ownChildren lists this process's children, zombies included: the
// children file of each of its threads (a child belongs to the thread that
// forked it, or that it was reparented to), which lists far fewer
// processes than /proc. Without that file (a kernel without
// CONFIG_PROC_CHILDREN) it scans /proc for processes whose parent is this
// one.
func ownChildren() []int {
	self := os.Getpid()
	task := "/proc/" + strconv.Itoa(self) + "/task"
	tids, err := os.ReadDir(task)
	if err == nil {
		var out []int
		read, failed := false, false
		var buf [4096]byte
		for _, t := range tids {
			b, err := readSmall(task+"/"+t.Name()+"/children", buf[:])
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended, or no children files at all
			}
			if err != nil {
				failed = true // (too many children for readSmall): scan /proc
				break
			}
			read = true
			// A child is listed by one thread only: its parent.
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					out = append(out, pid)
				}
			}
		}
		if read && !failed {
			return out
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	selfStr := strconv.Itoa(self)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		if f := strings.Fields(string(b[i+1:])); len(f) >= 2 && f[1] == selfStr {
			out = append(out, pid)
		}
	}
	return out
}

// reap waits (briefly) for a child process of a sandbox that was destroyed
// (the init of a sandbox that failed to start, runsc's gofer): this
// process, their subreaper, is their parent, and nobody else waits for them.
func (r *Runtime) reap(ctx context.Context, id string, pid int) {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := waitPid(wctx, pid); err != nil {
		r.log.Warn("reap a process of a destroyed sandbox", "sandbox", id, "pid", pid, "err", err)
	}
}

// Exit is how a sandbox's init ended.
type Exit struct {
	Code   int
	Signal string
	OOM    bool
	Known  bool // false when the status could not be observed (init was not our child)
}

// Wait blocks until the init with pid exits (or ctx is done) and reports how.
func (r *Runtime) Wait(ctx context.Context, id string, pid int) (Exit, error) {
	ex, err := waitPid(ctx, pid)
	if err != nil {
		return Exit{}, err
	}
	ex.OOM = r.oomKilled(id)
	return ex, nil
}

// Running reports whether runc sees sandbox id running, and its init pid.
func (r *Runtime) Running(ctx context.Context, id string) (int, bool) {
	c, err := r.runc.State(ctx, id)
	if err != nil || (c.Status != "running" && c.Status != "paused") {
		return 0, false
	}
	if !pidAlive(c.Pid) {
		// runsc's state says running while its sandbox process is a
		// zombie (dead, its parent gone before reaping it): not running.
		return 0, false
	}
	return c.Pid, true
}

// pidAlive reports whether process pid exists and is not a zombie.
func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] != 'Z' && b[i+2] != 'X'
}

// Pause freezes every process of sandbox id (`runc pause`: the cgroup
// freezer); they use no CPU until Resume. Pausing a paused sandbox is a no-op.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	if c, err := r.runc.State(ctx, id); err == nil && c.Status == "paused" {
		return nil
	}
	if err := r.runc.Pause(ctx, id); err != nil {
		return fmt.Errorf("runc pause %s: %w", id, err)
	}
	return nil
}

// Resume thaws a sandbox frozen by Pause. Resuming a running sandbox is a
// no-op.
func (r *Runtime) Resume(ctx context.Context, id string) error {
	if c, err := r.runc.State(ctx, id); err == nil && c.Status == "running" {
		return nil
	}
	if err := r.runc.Resume(ctx, id); err != nil {
		return fmt.Errorf("runc resume %s: %w", id, err)
	}
	return nil
}

// Paused reports whether sandbox id is frozen.
func (r *Runtime) Paused(ctx context.Context, id string) bool {
	c, err := r.runc.State(ctx, id)
	return err == nil && c.Status == "paused"
}

// pausedNoExec is Paused without running the runtime where it can: runc
// pauses through the cgroup freezer, which cgroupfs shows (frozen); runsc
// pauses inside its Sentry, which only `runsc state` knows. (destroy asks
// this of every sandbox it removes: a runc process less per teardown.)
func (r *Runtime) pausedNoExec(ctx context.Context, id string) bool {
	if r.cfg.Runtime == RuntimeRunc {
		return r.frozen(id)
	}
	return r.Paused(ctx, id)
}

// UpperDir is the host path of sandbox id's writable layer (overlay upper).
// It holds what the sandbox wrote: hostile content, read only with
// imagebuild's confined diff while the sandbox is frozen.
func (r *Runtime) UpperDir(id string) string { return filepath.Join(r.Dir(id), "upper") }

// NeedsNetworkAtStart reports whether the runtime takes over the
// sandbox's network as it is when the container starts: gVisor's network
// stack (runsc) copies the namespace's interfaces, addresses and routes
// at its start, runc only joins the namespace.
func (r *Runtime) NeedsNetworkAtStart() bool { return r.cfg.Runtime == RuntimeRunsc }

// CanUpdate reports whether SetLimits works on this runtime (runc; gVisor's
// runsc has no update).
func (r *Runtime) CanUpdate() bool { return r.cfg.Runtime == RuntimeRunc }

// SetLimits sets the cpu and memory limits of a running sandbox (zero: leave
// as is) with `runc update`.
func (r *Runtime) SetLimits(ctx context.Context, id string, cpu float64, memory int64) error {
	if !r.CanUpdate() {
		return fmt.Errorf("sandbox %q: limits cannot change on %s: %w", id, r.cfg.Runtime, errdefs.ErrFailedPrecondition)
	}
	res, err := Resources(cpu, memory, 0)
	if err != nil {
		return err
	}
	if err := r.runc.Update(ctx, id, res); err != nil {
		return fmt.Errorf("runc update %s: %w", id, err)
	}
	return nil
}

// Kill kills every process of sandbox id now, without waiting (Wait
// observes the end): SIGKILL to its init through a pidfd, after checking
// that the pid is in the sandbox's cgroup (a pid reused after init's death
// is not killed). Under runc init is pid 1 of the sandbox's pid namespace:
// the kernel kills every other process of the namespace as it dies, before
// init can be reaped. Under runsc the pid is the Sentry's, which runs every
// process of the sandbox. A frozen sandbox (cgroup freezer) is killed and
// thawed through runc: a frozen process dies only once thawed. What stays
// (mounts, cgroups, runc state, the network) is for Destroy.
func (r *Runtime) Kill(ctx context.Context, id string) error {
	if !validID(id) {
		return fmt.Errorf("sandbox id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	r.noteHelpers(id)
	if r.frozen(id) {
		if err := r.runc.Kill(ctx, id, int(unix.SIGKILL), &runc.KillOpts{All: true}); err != nil && !isNotExist(err) {
			return fmt.Errorf("runc kill %s: %w", id, err)
		}
		if err := r.runc.Resume(ctx, id); err != nil && !isNotExist(err) {
			return fmt.Errorf("runc resume %s: %w", id, err)
		}
		return nil
	}
	pid, err := r.initPid(id)
	if errors.Is(err, os.ErrNotExist) {
		return nil // never started, or destroyed already
	}
	if err != nil {
		return err
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // gone already
	}
	if err != nil {
		return fmt.Errorf("sandbox %q: pidfd_open %d: %w", id, pid, err)
	}
	defer unix.Close(fd)
	// The pidfd names the process that had pid when it was opened; if
	// /proc/pid is in the sandbox's cgroup now, that is the same process
	// (or it died and the signal goes nowhere).
	if in, err := inCgroup(pid, r.cgroupPath(id)); err != nil || !in {
		return nil // not the sandbox's: its init is gone
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("sandbox %q: kill init %d: %w", id, pid, err)
	}
	return nil
}

// keepOnlyUpper removes every entry of a destroyed sandbox's directory but
// upper/ and makes it 0700. Nothing is followed: os.RemoveAll removes links,
// not their targets.
func keepOnlyUpper(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if e.Name() != "upper" {
			errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		}
	}
	errs = append(errs, os.Chmod(dir, 0o700))
	return errors.Join(errs...)
}

// frozen reports whether sandbox id's cgroup is frozen (or freezing), read
// from cgroupfs (no runc call).
func (r *Runtime) frozen(id string) bool {
	cg := r.cgroupPath(id)
	if b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/freezer", cg, "freezer.state")); err == nil {
		return strings.TrimSpace(string(b)) != "THAWED"
	}
	if b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", cg, "cgroup.freeze")); err == nil {
		return strings.TrimSpace(string(b)) == "1"
	}
	return false
}

// Destroy kills the sandbox and removes its runc state, cgroup, mounts and
// directory. It is idempotent and safe on a half-created sandbox.
func (r *Runtime) Destroy(ctx context.Context, id string) error { return r.destroy(ctx, id, false) }

// DestroyKeepUpper is Destroy leaving the sandbox's writable layer
// (UpperDir, on its disk's tmpfs) in place for a snapshot of the stopped
// sandbox: its processes, runc state, cgroups, rootfs and lower mounts,
// bundle, init socket dir and pid file are removed, and its directory made
// 0700 (no longer reachable by the uid range, which another sandbox may
// get). Destroy removes the rest. A no-op keep without disk quotas
// (DiskNone: the layer is on the host's disk, kept by nothing).
func (r *Runtime) DestroyKeepUpper(ctx context.Context, id string) error {
	return r.destroy(ctx, id, r.cfg.Disk != DiskNone)
}

func (r *Runtime) destroy(ctx context.Context, id string, keepUpper bool) error {
	if !validID(id) {
		return fmt.Errorf("sandbox id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	var errs []error
	if r.pausedNoExec(ctx, id) {
		// A frozen process does not die of SIGKILL until thawed (cgroup v1
		// freezer), and runc delete would wait for it: kill, then thaw, so
		// nothing runs again but the kill.
		_ = r.runc.Kill(ctx, id, int(unix.SIGKILL), &runc.KillOpts{All: true})
		_ = r.runc.Resume(ctx, id)
	}
	helpers := r.takeHelpers(id)
	if done, err := r.deleteStopped(id); done {
		if err != nil {
			errs = append(errs, fmt.Errorf("delete the runc state of a stopped sandbox: %w", err))
		}
	} else if r.runcStateGone(id) {
		// Nothing for `runc delete` to remove (a runc process less when a
		// kept writable layer is removed: its state went with the layer's
		// first teardown).
	} else if err := r.runc.Delete(ctx, id, &runc.DeleteOpts{Force: true}); err != nil && !isNotExist(err) {
		errs = append(errs, fmt.Errorf("runc delete: %w", err))
	}
	for _, pid := range helpers {
		r.reap(ctx, id, pid)
	}
	r.removeCgroups(id)
	dir := r.Dir(id)
	rootfs := filepath.Join(dir, "rootfs")
	if err := unix.Unmount(rootfs, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount rootfs: %w", err))
	}
	if err := unmountLowers(filepath.Join(dir, "lower")); err != nil {
		errs = append(errs, err)
	}
	if keepUpper {
		if len(errs) > 0 {
			// A mount may still be there (the image's layers under
			// lower/): remove nothing; Destroy detaches the whole disk.
			return errors.Join(errs...)
		}
		return keepOnlyUpper(dir)
	}
	if err := unmountDir(dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// runcStateGone reports whether runc (not runsc) has no state directory
// for sandbox id. runc makes it before it starts the container's init and
// removes it last when it deletes the container; `runc delete --force` of
// an id without it only finds that it does not exist (and removes the
// directory, absent already). TestDestroyWithoutRuncState.
func (r *Runtime) runcStateGone(id string) bool {
	if r.cfg.Runtime != RuntimeRunc || !validID(id) {
		return false
	}
	_, err := os.Lstat(filepath.Join(r.cfg.RuncRoot, id))
	return errors.Is(err, os.ErrNotExist)
}

// removeCgroups removes the sandbox's cgroup directories that runc left (it
// can lose the race with exiting processes), the workload's child with them.
func (r *Runtime) removeCgroups(id string) {
	for _, ctl := range []string{"memory", "pids", "cpu", "cpuacct", "cpuset", "blkio", "devices", "freezer", "systemd", "unified", ""} {
		p := filepath.Join("/sys/fs/cgroup", ctl, r.cgroupPath(id))
		if err := removeCgroupDir(p); err != nil {
			r.log.Warn("remove cgroup", "path", p, "err", err)
		}
	}
}

// List returns the ids of the sandboxes runc knows on this node.
func (r *Runtime) List(ctx context.Context) ([]string, error) {
	cs, err := r.runc.List(ctx)
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(cs))
	for _, c := range cs {
		ids = append(ids, c.ID)
	}
	return ids, nil
}

// Leftovers lists what exists on this node for sandboxes not in live: runc
// containers, state directories, overlay mounts and cgroups. Used by the
// reconciler and by leak tests.
func (r *Runtime) Leftovers(ctx context.Context, live map[string]bool) ([]string, error) {
	var out []string
	ids, err := r.List(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if !live[id] {
			out = append(out, "runc:"+id)
		}
	}
	ents, _ := os.ReadDir(r.cfg.StateDir)
	for _, e := range ents {
		if !live[e.Name()] {
			out = append(out, "dir:"+e.Name())
		}
	}
	if mounts, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		prefix := r.cfg.StateDir + "/"
		for _, line := range strings.Split(string(mounts), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(f[4], prefix) {
				id, _, _ := strings.Cut(strings.TrimPrefix(f[4], prefix), "/")
				if !live[id] {
					out = append(out, "mount:"+f[4])
				}
			}
		}
	}
	for _, ctl := range []string{"memory", "pids", "cpu"} {
		ents, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup", ctl, r.cfg.CgroupParent))
		for _, e := range ents {
			if e.IsDir() && !live[e.Name()] {
				out = append(out, "cgroup:"+ctl+"/"+e.Name())
			}
		}
	}
	return out, nil
}

// oomKilled reads the cgroup's OOM kill counter (v1 memory.oom_control or v2 memory.events).
func (r *Runtime) oomKilled(id string) bool {
	for _, p := range []string{
		filepath.Join("/sys/fs/cgroup/memory", r.cgroupPath(id), "memory.oom_control"),
		filepath.Join("/sys/fs/cgroup", r.cgroupPath(id), "memory.events"),
		filepath.Join("/sys/fs/cgroup/unified", r.cgroupPath(id), "memory.events"),
	} {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, _ := strings.Cut(sc.Text(), " ")
			if k == "oom_kill" && strings.TrimSpace(v) != "0" {
				f.Close()
				return true
			}
		}
		f.Close()
	}
	return false
}

// fileIO hands one file to runc as the container's stdout and stderr; stdin is /dev/null.
type fileIO struct{ f *os.File }

func (fileIO) Close() error             { return nil }
func (fileIO) Stdin() io.WriteCloser    { return nil }
func (fileIO) Stdout() io.ReadCloser    { return nil }
func (fileIO) Stderr() io.ReadCloser    { return nil }
func (i fileIO) Set(cmd *exec.Cmd)      { cmd.Stdout, cmd.Stderr = i.f, i.f }
func (i fileIO) CloseAfterStart() error { return nil }
func isNotExist(err error) bool         { return err != nil && strings.Contains(err.Error(), "does not exist") }
func validID(id string) bool {
	return id != "" && len(id) <= 64 && strings.Trim(id, "abcdefghijklmnopqrstuvwxyz0123456789-") == ""
}

var _ runc.IO = fileIO{}

// tail returns the last n bytes of a file, for error messages.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := st.Size() - n
	if off < 0 {
		off = 0
	}
	b := make([]byte, st.Size()-off)
	_, _ = f.ReadAt(b, off)
	return strings.TrimSpace(string(b))
}

// resolveUser turns a user name into uid:gid through the rootfs's /etc/passwd.
func resolveUser(rootfs, user string) (string, error) {
	if user == "" || user == "root" {
		return "", nil
	}
	name, group, _ := strings.Cut(user, ":")
	if _, err := strconv.Atoi(name); err == nil {
		return user, nil
	}
	b, err := readInRoot(rootfs, "etc/passwd", 4<<20)
	if err != nil {
		return "", fmt.Errorf("user %q: image has no usable /etc/passwd (%v): %w", user, err, errdefs.ErrInvalidArgument)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) >= 4 && f[0] == name {
			if group != "" {
				return f[2] + ":" + group, nil
			}
			return f[2] + ":" + f[3], nil
		}
	}
	return "", fmt.Errorf("user %q not found in the image's /etc/passwd: %w", user, errdefs.ErrInvalidArgument)
}

// initEnv is init's environment: the sandbox's env with GOMAXPROCS=1 added,
// so that init's Go runtime starts with one P (two Ps at the start cost
// every idle sandbox ~0.3 MiB: docs/ARCHITECTURE.md, "Where the time and
// memory go", round 6); drop says init must remove it again before it starts
// anything (--drop-gomaxprocs). A GOMAXPROCS the sandbox sets itself is left
// as it is, for its processes (init then still runs one P, set in main).
func initEnv(env []string) (_ []string, drop bool) {
	for _, kv := range env {
		if strings.HasPrefix(kv, "GOMAXPROCS=") {
			return env, false
		}
	}
	return append(env[:len(env):len(env)], "GOMAXPROCS=1"), true
}
