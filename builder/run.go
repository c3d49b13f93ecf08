package builder

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	runc "github.com/containerd/go-runc"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/moby/sys/user"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/nodecache"
)

// MaxNoFile is the open-files limit of RUN steps (the hosts' hard limit is 20000).
const MaxNoFile = 16384

// TailBytes is how much of a failing command's output its error carries.
const TailBytes = 4096

// idPrefix starts the runc id of every build container.
const idPrefix = "chalk-build-"

// defaultPath is PATH for RUN steps of images that set none.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// RunError is a RUN step whose command failed. It wraps
// errdefs.ErrFailedPrecondition.
type RunError struct {
	Command  string
	ExitCode int    // 128+N when killed by signal N
	Output   string // the last TailBytes of stdout and stderr
}

func (e *RunError) Error() string {
	return fmt.Sprintf("command %q exited with code %d; last output:\n%s", e.Command, e.ExitCode, e.Output)
}

// Unwrap makes errors.Is(err, errdefs.ErrFailedPrecondition) hold.
func (e *RunError) Unwrap() error { return errdefs.ErrFailedPrecondition }

// buildCaps is the capability set of RUN steps (Docker's default set: what
// package managers need to chown, drop privileges and bind ports).
var buildCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
	"CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE",
}

type runcRunner = *runc.Runc

func newRunc(bin, root string) *runc.Runc {
	return &runc.Runc{Command: bin, Root: root, PdeathSignal: unix.SIGKILL}
}

// run executes cmd in a build container over the image cur and returns the
// path of the layer tar of what it changed (the caller removes it).
func (b *Builder) run(ctx context.Context, cur name.Digest, cfg v1.Config, cmd string, args map[string]string, line func(string)) (string, error) {
	lower, err := b.cfg.Layers.Ensure(ctx, cur, nil)
	if err != nil {
		return "", fmt.Errorf("prepare layers of %s: %w", cur, err)
	}
	if a, ok := b.cfg.Layers.(interface {
		Acquire(*nodecache.Image) func()
	}); ok {
		defer a.Acquire(lower)()
	}
	idb := make([]byte, 8)
	_, _ = rand.Read(idb)
	id := idPrefix + hex.EncodeToString(idb)
	dir := filepath.Join(b.cfg.WorkDir, id)
	rootfs, upper := filepath.Join(dir, "rootfs"), filepath.Join(dir, "upper")
	for _, d := range []string{rootfs, upper, filepath.Join(dir, "work"), filepath.Join(dir, "empty")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			b.log.Warn("remove build dir", "dir", dir, "err", err)
		}
	}()
	lowers := lower.LowerDirs()
	if len(lowers) == 0 {
		lowers = []string{filepath.Join(dir, "empty")}
	}
	opts := "lowerdir=" + strings.Join(lowers, ":") + ",upperdir=" + upper + ",workdir=" + filepath.Join(dir, "work")
	if len(opts) >= 4096 {
		return "", fmt.Errorf("image %s: %d layers are too many for one overlay mount: %w", cur, len(lowers), errdefs.ErrResourceExhausted)
	}
	if err := unix.Mount("overlay", rootfs, "overlay", 0, opts); err != nil {
		return "", fmt.Errorf("overlay mount for %s: %w", id, err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			if err := unix.Unmount(rootfs, unix.MNT_DETACH); err != nil {
				b.log.Warn("unmount build rootfs", "dir", rootfs, "err", err)
			}
			mounted = false
		}
	}
	defer unmount()

	spec, err := b.runSpec(ctx, id, dir, rootfs, cfg, cmd, args)
	if err != nil {
		return "", err
	}
	if spec.detach != nil {
		defer spec.detach()
	}
	data, err := json.Marshal(spec.Spec)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600); err != nil {
		return "", err
	}
	out := newOutput(line)
	defer func() {
		// A cancelled build leaves the container to kill.
		if err := b.runc.Delete(context.WithoutCancel(ctx), id, &runc.DeleteOpts{Force: true}); err != nil && !strings.Contains(err.Error(), "does not exist") {
			b.log.Debug("delete build container", "id", id, "err", err)
		}
	}()
	status, err := b.runc.Run(ctx, id, dir, &runc.CreateOpts{IO: out})
	out.flush()
	if ctx.Err() != nil {
		return "", fmt.Errorf("command %q: %w", cmd, ctxErr(ctx))
	}
	var exitErr *runc.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		return "", fmt.Errorf("run build container: %w: %s", err, out.tail())
	}
	if status != 0 {
		return "", &RunError{Command: cmd, ExitCode: status, Output: out.tail()}
	}
	unmount()
	f, err := os.CreateTemp(b.cfg.WorkDir, "layer-*.tar")
	if err != nil {
		return "", err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = writeUpperTar(upper, bw, b.epoch)
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", fmt.Errorf("layer of %q: %w", cmd, err)
	}
	return f.Name(), nil
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", errdefs.ErrDeadlineExceeded, ctx.Err())
	}
	return ctx.Err()
}

type runSpec struct {
	*specs.Spec
	detach func()
}

// runSpec is the OCI runtime spec of a RUN step.
func (b *Builder) runSpec(ctx context.Context, id, dir, rootfs string, cfg v1.Config, cmd string, args map[string]string) (*runSpec, error) {
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	usr, err := execUser(root, cfg.User)
	if err != nil {
		return nil, err
	}
	cwd := cfg.WorkingDir
	if cwd == "" {
		cwd = "/"
	}
	cwd = path.Clean(cwd)
	if cwd != "/" {
		// As WORKDIR does: the working directory exists for the command.
		if err := root.MkdirAll(strings.TrimPrefix(cwd, "/"), 0o755); err != nil {
			return nil, fmt.Errorf("working directory %s: %w", cwd, err)
		}
	}
	// Environment: the node's build env, then ARGs, then the image's ENV
	// (later wins, as ENV overrides ARG in a Dockerfile).
	env := slices.Clone(b.cfg.Env)
	for _, k := range sortedKeys(args) {
		env = setEnv(env, k, args[k])
	}
	for _, kv := range cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		env = setEnv(env, k, v)
	}
	hasPath := slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "PATH=") })
	if !hasPath {
		env = append(env, "PATH="+defaultPath)
	}
	if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "HOME=") }) {
		home := usr.Home
		if home == "" {
			home = "/root"
		}
		env = append(env, "HOME="+home)
	}
	gids := make([]uint32, 0, len(usr.Sgids))
	for _, g := range usr.Sgids {
		gids = append(gids, uint32(g))
	}
	s := &specs.Spec{
		Version:  specs.Version,
		Root:     &specs.Root{Path: rootfs},
		Hostname: "chalk-build",
		Process: &specs.Process{
			Args: []string{"/bin/sh", "-c", cmd},
			Env:  env,
			Cwd:  cwd,
			User: specs.User{UID: uint32(usr.Uid), GID: uint32(usr.Gid), AdditionalGids: gids},
			Capabilities: &specs.LinuxCapabilities{
				Bounding: slices.Clone(buildCaps), Effective: slices.Clone(buildCaps), Permitted: slices.Clone(buildCaps),
			},
			NoNewPrivileges: true,
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: MaxNoFile, Soft: MaxNoFile}},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
				"/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
			},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
		},
	}
	hosts := []byte("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tchalk-build\n")
	if err := os.WriteFile(filepath.Join(dir, "hosts"), hosts, 0o644); err != nil {
		return nil, err
	}
	s.Mounts = append(s.Mounts, specs.Mount{Destination: "/etc/hosts", Type: "bind", Source: filepath.Join(dir, "hosts"), Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
	rs := &runSpec{Spec: s}
	netns := specs.LinuxNamespace{Type: specs.NetworkNamespace}
	if b.cfg.Network != nil {
		nsPath, resolv, detach, err := b.cfg.Network.Attach(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("build network: %w", err)
		}
		rs.detach = detach
		netns.Path = nsPath
		if len(resolv) > 0 {
			if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), resolv, 0o644); err != nil {
				detach()
				return nil, err
			}
			s.Mounts = append(s.Mounts, specs.Mount{Destination: "/etc/resolv.conf", Type: "bind", Source: filepath.Join(dir, "resolv.conf"), Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
		}
	}
	s.Linux.Namespaces = append(s.Linux.Namespaces, netns)
	return rs, nil
}

// execUser resolves an image's User ("", name, uid, name:group, uid:gid)
// against the rootfs's /etc/passwd and /etc/group (read inside root).
func execUser(root *os.Root, spec string) (*user.ExecUser, error) {
	open := func(p string) io.Reader {
		b, err := root.ReadFile(p)
		if err != nil {
			return nil
		}
		return bytes.NewReader(b)
	}
	passwd, group := open("etc/passwd"), open("etc/group")
	u, err := user.GetExecUser(spec, &user.ExecUser{Home: "/root"}, passwd, group)
	if err != nil {
		return nil, fmt.Errorf("user %q: %v: %w", spec, err, errdefs.ErrFailedPrecondition)
	}
	return u, nil
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// output is the IO of a build container: stdout and stderr together, split
// into lines for the event callback, with the last TailBytes kept.
type output struct {
	mu      sync.Mutex
	line    func(string)
	partial []byte
	ring    []byte
}

var _ runc.IO = (*output)(nil)

func newOutput(line func(string)) *output { return &output{line: line} }

func (o *output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.ring = append(o.ring, p...)
	if len(o.ring) > 2*TailBytes {
		o.ring = append(o.ring[:0], o.ring[len(o.ring)-TailBytes:]...)
	}
	o.partial = append(o.partial, p...)
	for {
		i := bytes.IndexByte(o.partial, '\n')
		if i < 0 {
			break
		}
		o.emit(o.partial[:i])
		o.partial = o.partial[i+1:]
	}
	if len(o.partial) > 16<<10 { // a very long line without newline
		o.emit(o.partial)
		o.partial = o.partial[:0]
	}
	return len(p), nil
}

func (o *output) emit(l []byte) {
	s := strings.TrimRight(string(l), "\r")
	if o.line != nil {
		o.line(s)
	}
}

func (o *output) flush() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.partial) > 0 {
		o.emit(o.partial)
		o.partial = nil
	}
}

func (o *output) tail() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	t := o.ring
	if len(t) > TailBytes {
		t = t[len(t)-TailBytes:]
	}
	return string(t)
}

func (o *output) Close() error          { return nil }
func (o *output) Stdin() io.WriteCloser { return nil }
func (o *output) Stdout() io.ReadCloser { return nil }
func (o *output) Stderr() io.ReadCloser { return nil }
func (o *output) Set(cmd *exec.Cmd)     { cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, o, o }

// cleanupLeftovers removes what a previous process left: build containers
// (by id prefix) in RuncRoot, overlay mounts and directories in WorkDir.
func (b *Builder) cleanupLeftovers(ctx context.Context) {
	if cs, err := b.runc.List(ctx); err == nil {
		for _, c := range cs {
			if strings.HasPrefix(c.ID, idPrefix) {
				if err := b.runc.Delete(ctx, c.ID, &runc.DeleteOpts{Force: true}); err != nil {
					b.log.Warn("delete leftover build container", "id", c.ID, "err", err)
				}
			}
		}
	}
	ents, err := os.ReadDir(b.cfg.WorkDir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := filepath.Join(b.cfg.WorkDir, e.Name())
		switch {
		case strings.HasPrefix(e.Name(), idPrefix):
			if err := unix.Unmount(filepath.Join(p, "rootfs"), unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				b.log.Warn("unmount leftover build rootfs", "dir", p, "err", err)
				continue // never remove through a mount
			}
			_ = os.RemoveAll(p)
		case strings.HasPrefix(e.Name(), "layer-") || strings.HasPrefix(e.Name(), "copy-"):
			_ = os.Remove(p)
		}
	}
}
