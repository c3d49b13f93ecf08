package sandbox

import (
	"fmt"
	"math"
	"runtime"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// SpecOpt changes one aspect of an OCI runtime spec. Each is small and testable
// alone, in the manner of containerd's oci.SpecOpts.
type SpecOpt func(*specs.Spec) error

// MaxNoFile is the highest RLIMIT_NOFILE a sandbox gets. The machines we run on
// have a hard limit of 20000; asking for more makes runc fail.
const MaxNoFile = 20000

// defaultCaps is the capability set of a sandbox's root: Docker's default set
// minus everything a sandbox's workloads (shells, package managers, servers,
// image builds) do not need. Each one kept, and why:
//
//	CAP_CHOWN, CAP_FOWNER     package managers and tar chown/chmod files they unpack
//	CAP_DAC_OVERRIDE          root reads and writes files of other users (apt's _apt)
//	CAP_FSETID                keep setgid bits on unpacked files (dpkg: root:shadow 2755)
//	CAP_SETUID, CAP_SETGID    switch to the image's user and to service users (apt, su)
//	CAP_KILL                  signal processes of other users in the sandbox
//	CAP_NET_BIND_SERVICE      listen on ports below 1024
//	CAP_SYS_CHROOT            chroot(2) (dpkg, build tools); confined by pivot_root
//
// Dropped compared with Docker: NET_RAW (no raw sockets: no spoofing, no ping
// floods), MKNOD (no device nodes), SETFCAP (no file capabilities), SETPCAP
// (no changing the bounding set or securebits), AUDIT_WRITE (no audit log
// writes to the host). Never granted: NET_ADMIN, SYS_ADMIN, SYS_PTRACE,
// SYS_MODULE and every other capability.
var defaultCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
	"CAP_NET_BIND_SERVICE", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_CHROOT",
}

// DefaultCapabilities returns (a copy of) the capability set every sandbox
// process gets: bounding, effective and permitted; inheritable and ambient
// stay empty, so a process that switches to a non-root user has none.
func DefaultCapabilities() []string { return append([]string(nil), defaultCaps...) }

// GenerateSpec builds a spec from the defaults and opts, in order.
func GenerateSpec(opts ...SpecOpt) (*specs.Spec, error) {
	s := baseSpec()
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func baseSpec() *specs.Spec {
	return &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{
			Cwd:             "/",
			Env:             []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			NoNewPrivileges: true,
			Capabilities: &specs.LinuxCapabilities{
				Bounding: DefaultCapabilities(), Effective: DefaultCapabilities(), Permitted: DefaultCapabilities(),
			},
			Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: MaxNoFile, Soft: MaxNoFile}},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.CgroupNamespace},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
				"/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
			},
			ReadonlyPaths: []string{
				"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
			},
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
		},
	}
}

// WithSeccomp applies the default seccomp profile that containerd and Docker
// ship. The profile depends on the bounding capabilities (CAP_SYS_ADMIN would
// allow mount, unshare...), so apply it after anything that changes them.
//
// Only the node's native system call ABI is listed (containerd's profile
// adds the compat ones: i386 and x32 on amd64, arm on arm64): a system call
// through another ABI (int 0x80 on amd64) kills the calling process with
// SIGSYS. The compat entry points are kernel attack surface no sandbox
// needs, and compiling the filter for three ABIs was 35-40 ms of every
// `runc run` (half of a cold start on the 2-core CI machine).
func WithSeccomp() SpecOpt {
	return func(s *specs.Spec) error {
		p := seccomp.DefaultProfile(s)
		if a, ok := nativeArch[runtime.GOARCH]; ok {
			p.Architectures = []specs.Arch{a}
		}
		s.Linux.Seccomp = p
		return nil
	}
}

// nativeArch is the seccomp architecture of the node's own system calls.
var nativeArch = map[string]specs.Arch{
	"amd64":   specs.ArchX86_64,
	"arm64":   specs.ArchAARCH64,
	"riscv64": specs.ArchRISCV64,
	"s390x":   specs.ArchS390X,
	"ppc64le": specs.ArchPPC64LE,
}

// WithProcess sets argv, env (appended after the defaults; later wins), cwd and user ("uid[:gid]").
func WithProcess(args, env []string, cwd, user string) SpecOpt {
	return func(s *specs.Spec) error {
		if len(args) == 0 {
			return fmt.Errorf("process args: empty: %w", errdefs.ErrInvalidArgument)
		}
		s.Process.Args = args
		s.Process.Env = mergeEnv(s.Process.Env, env)
		if cwd != "" {
			if !strings.HasPrefix(cwd, "/") {
				return fmt.Errorf("workdir %q: must be absolute: %w", cwd, errdefs.ErrInvalidArgument)
			}
			s.Process.Cwd = cwd
		}
		uid, gid, err := parseUser(user)
		if err != nil {
			return err
		}
		s.Process.User = specs.User{UID: uid, GID: gid}
		return nil
	}
}

// WithHostname sets the UTS hostname.
func WithHostname(h string) SpecOpt {
	return func(s *specs.Spec) error { s.Hostname = h; return nil }
}

// WithNetNS joins the network namespace at path (made by sandboxnet).
func WithNetNS(path string) SpecOpt {
	return func(s *specs.Spec) error {
		for i, ns := range s.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				s.Linux.Namespaces[i].Path = path
			}
		}
		return nil
	}
}

// WithBind adds a bind mount.
func WithBind(src, dst string, readOnly bool) SpecOpt {
	return func(s *specs.Spec) error {
		opts := []string{"rbind", "nosuid", "nodev"}
		if readOnly {
			opts = append(opts, "ro")
		} else {
			opts = append(opts, "rw")
		}
		s.Mounts = append(s.Mounts, specs.Mount{Destination: dst, Type: "bind", Source: src, Options: opts})
		return nil
	}
}

// WithResources sets cgroup limits: cpu in cores (0 = none), memory in bytes
// (0 = none), pids (0 = none).
func WithResources(cgroupsPath string, cpu float64, memory, pids int64) SpecOpt {
	return func(s *specs.Spec) error {
		r, err := Resources(cpu, memory, pids)
		if err != nil {
			return err
		}
		s.Linux.CgroupsPath = cgroupsPath
		if r.CPU != nil {
			s.Linux.Resources.CPU = r.CPU
		}
		if r.Memory != nil {
			s.Linux.Resources.Memory = r.Memory
		}
		if r.Pids != nil {
			s.Linux.Resources.Pids = r.Pids
		}
		return nil
	}
}

// Resources is the OCI form of the limits (zero: unlimited): cpu in
// cores (a CFS quota over a 100ms period, at least 1ms), memory in bytes
// with no swap beyond it, and a pids limit.
func Resources(cpu float64, memory, pids int64) (*specs.LinuxResources, error) {
	if cpu < 0 || memory < 0 || pids < 0 || math.IsNaN(cpu) || math.IsInf(cpu, 0) {
		return nil, fmt.Errorf("resources (cpu %v, memory %d, pids %d): negative or invalid limit: %w", cpu, memory, pids, errdefs.ErrInvalidArgument)
	}
	r := &specs.LinuxResources{}
	if cpu > 0 {
		period := uint64(100000)
		quota := int64(cpu * float64(period))
		if quota < 1000 {
			quota = 1000
		}
		r.CPU = &specs.LinuxCPU{Period: &period, Quota: &quota}
	}
	if memory > 0 {
		swap := memory // no swap beyond the memory limit
		r.Memory = &specs.LinuxMemory{Limit: &memory, Swap: &swap}
	}
	if pids > 0 {
		r.Pids = &specs.LinuxPids{Limit: &pids}
	}
	return r, nil
}

// WithNoFile sets RLIMIT_NOFILE (soft = hard = n). It must be positive and at
// most MaxNoFile: runc fails a container that asks for more than the host allows.
func WithNoFile(n uint64) SpecOpt {
	return func(s *specs.Spec) error {
		if n == 0 || n > MaxNoFile {
			return fmt.Errorf("nofile %d: must be between 1 and %d: %w", n, MaxNoFile, errdefs.ErrInvalidArgument)
		}
		for i, rl := range s.Process.Rlimits {
			if rl.Type == "RLIMIT_NOFILE" {
				s.Process.Rlimits[i].Soft, s.Process.Rlimits[i].Hard = n, n
				return nil
			}
		}
		s.Process.Rlimits = append(s.Process.Rlimits, specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Soft: n, Hard: n})
		return nil
	}
}

func mergeEnv(base, add []string) []string {
	idx := map[string]int{}
	out := make([]string, 0, len(base)+len(add))
	for _, kv := range append(append([]string(nil), base...), add...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func parseUser(u string) (uint32, uint32, error) {
	if u == "" || u == "root" {
		return 0, 0, nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("user %q: only numeric uid[:gid] is supported here: %w", u, errdefs.ErrInvalidArgument)
	}
	gid := uid
	if hasG {
		g, err := strconv.ParseUint(gs, 10, 32)
		if err != nil {
			return 0, 0, fmt.Errorf("user %q: bad gid: %w", u, errdefs.ErrInvalidArgument)
		}
		gid = g
	}
	return uint32(uid), uint32(gid), nil
}

// WithUserNS joins the user namespace at path (made by sandboxnet) whose ids
// 0..size-1 are hostID.. on the host. runc needs the mappings too: it joins
// the namespace rather than writing them, but sets up /dev and the cgroup
// mounts for the mapped root.
func WithUserNS(path string, hostID, size uint32) SpecOpt {
	return func(s *specs.Spec) error {
		if path == "" || size == 0 || uint64(hostID)+uint64(size) > 1<<32-1 || hostID == 0 {
			return fmt.Errorf("user namespace %q (%d ids from %d): invalid: %w", path, size, hostID, errdefs.ErrInvalidArgument)
		}
		s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace, Path: path})
		s.Linux.UIDMappings = []specs.LinuxIDMapping{{ContainerID: 0, HostID: hostID, Size: size}}
		s.Linux.GIDMappings = []specs.LinuxIDMapping{{ContainerID: 0, HostID: hostID, Size: size}}
		return nil
	}
}
