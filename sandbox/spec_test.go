package sandbox

import (
	"errors"
	"math"
	"runtime"
	"slices"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func mustSpec(t *testing.T, opts ...SpecOpt) *specs.Spec {
	t.Helper()
	s, err := GenerateSpec(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestDefaultCapabilities: the set is minimal and exactly what is documented;
// the capabilities the issue names are never there.
func TestDefaultCapabilities(t *testing.T) {
	s := mustSpec(t, WithSeccomp())
	want := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
		"CAP_NET_BIND_SERVICE", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_CHROOT",
	}
	c := s.Process.Capabilities
	for name, set := range map[string][]string{"bounding": c.Bounding, "effective": c.Effective, "permitted": c.Permitted} {
		got := slices.Sorted(slices.Values(set))
		if !slices.Equal(got, want) {
			t.Errorf("%s: %v, want %v", name, got, want)
		}
	}
	if len(c.Inheritable) != 0 || len(c.Ambient) != 0 {
		t.Errorf("inheritable %v ambient %v: want none (a non-root user gets no capabilities)", c.Inheritable, c.Ambient)
	}
	for _, forbidden := range []string{
		"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_MODULE",
		"CAP_MKNOD", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_AUDIT_WRITE", "CAP_SYS_RAWIO", "CAP_SYS_TIME",
		"CAP_SYS_BOOT", "CAP_DAC_READ_SEARCH", "CAP_SYSLOG", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_RESOURCE",
	} {
		if slices.Contains(c.Bounding, forbidden) {
			t.Errorf("%s is granted", forbidden)
		}
	}
	// DefaultCapabilities hands out a copy.
	got := DefaultCapabilities()
	got[0] = "CAP_SYS_ADMIN"
	if slices.Contains(DefaultCapabilities(), "CAP_SYS_ADMIN") || slices.Contains(mustSpec(t).Process.Capabilities.Bounding, "CAP_SYS_ADMIN") {
		t.Fatal("DefaultCapabilities returned its internal slice")
	}
	// The three sets do not share a backing array (a SpecOpt editing one must not edit the others).
	s.Process.Capabilities.Effective[0] = "X"
	if s.Process.Capabilities.Bounding[0] == "X" || s.Process.Capabilities.Permitted[0] == "X" {
		t.Fatal("capability sets share storage")
	}
}

// TestDefaultSpecHardening: the base spec's namespaces, masked and read-only
// paths, mounts, rlimits and device policy.
func TestDefaultSpecHardening(t *testing.T) {
	s := mustSpec(t)
	if !s.Process.NoNewPrivileges {
		t.Error("no_new_privileges is off")
	}
	var ns []specs.LinuxNamespaceType
	for _, n := range s.Linux.Namespaces {
		ns = append(ns, n.Type)
		if n.Path != "" {
			t.Errorf("namespace %s joins %q by default", n.Type, n.Path)
		}
	}
	for _, want := range []specs.LinuxNamespaceType{specs.PIDNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.MountNamespace, specs.NetworkNamespace, specs.CgroupNamespace} {
		if !slices.Contains(ns, want) {
			t.Errorf("no %s namespace", want)
		}
	}
	for _, p := range []string{"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware", "/proc/acpi", "/proc/scsi"} {
		if !slices.Contains(s.Linux.MaskedPaths, p) {
			t.Errorf("%s is not masked", p)
		}
	}
	for _, p := range []string{"/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"} {
		if !slices.Contains(s.Linux.ReadonlyPaths, p) {
			t.Errorf("%s is not read-only", p)
		}
	}
	mounts := map[string]specs.Mount{}
	for _, m := range s.Mounts {
		mounts[m.Destination] = m
	}
	tests := []struct {
		dest string
		want []string
	}{
		{"/sys", []string{"ro", "nosuid", "nodev", "noexec"}},
		{"/sys/fs/cgroup", []string{"ro", "nosuid", "nodev", "noexec"}},
		{"/proc", []string{"nosuid", "nodev", "noexec"}},
		{"/dev", []string{"nosuid"}},
		{"/dev/shm", []string{"nosuid", "nodev", "noexec"}},
		{"/dev/pts", []string{"nosuid", "noexec", "newinstance"}},
	}
	for _, tc := range tests {
		m, ok := mounts[tc.dest]
		if !ok {
			t.Errorf("no %s mount", tc.dest)
			continue
		}
		for _, o := range tc.want {
			if !slices.Contains(m.Options, o) {
				t.Errorf("%s mount options %v: missing %s", tc.dest, m.Options, o)
			}
		}
	}
	for _, rl := range s.Process.Rlimits {
		if rl.Hard > MaxNoFile || rl.Soft > rl.Hard {
			t.Errorf("rlimit %s soft %d hard %d: above the host's %d", rl.Type, rl.Soft, rl.Hard, MaxNoFile)
		}
	}
	if !slices.ContainsFunc(s.Process.Rlimits, func(r specs.POSIXRlimit) bool { return r.Type == "RLIMIT_NOFILE" }) {
		t.Error("no RLIMIT_NOFILE")
	}
	if d := s.Linux.Resources.Devices; len(d) == 0 || d[0].Allow || d[0].Access != "rwm" || d[0].Type != "" {
		t.Errorf("device cgroup does not start with deny-all: %+v", d)
	}
	if s.Linux.Seccomp != nil {
		t.Error("seccomp without WithSeccomp (it must be applied last, after the capabilities)")
	}
}

// allowed reports whether the profile lets syscall name through unconditionally.
func allowed(p *specs.LinuxSeccomp, name string) bool {
	for _, sc := range p.Syscalls {
		if sc.Action == specs.ActAllow && len(sc.Args) == 0 && slices.Contains(sc.Names, name) {
			return true
		}
	}
	return false
}

// TestWithSeccomp: containerd's default profile, shaped by our capability set:
// the escape-relevant syscalls are not allowed. (ptrace and process_vm_* are,
// as in Docker since kernel 4.8: the kernel's own checks confine them to the
// sandbox's dumpable processes of the same uid.)
func TestWithSeccomp(t *testing.T) {
	s := mustSpec(t, WithSeccomp())
	p := s.Linux.Seccomp
	if p == nil {
		t.Fatal("no seccomp profile")
	}
	if p.DefaultAction != specs.ActErrno {
		t.Errorf("default action %s, want SCMP_ACT_ERRNO", p.DefaultAction)
	}
	// The native ABI only: no i386/x32 (or arm) compat system calls.
	if want, ok := nativeArch[runtime.GOARCH]; ok && !slices.Equal(p.Architectures, []specs.Arch{want}) {
		t.Errorf("architectures %v, want only the native %s", p.Architectures, want)
	}
	for _, ok := range []string{"read", "write", "openat", "execve", "wait4", "ptrace"} {
		if !allowed(p, ok) {
			t.Errorf("%s is not allowed: the profile is broken", ok)
		}
	}
	for _, name := range []string{
		"mount", "umount2", "unshare", "setns", "pivot_root", "init_module", "finit_module", "delete_module",
		"kexec_load", "reboot", "swapon", "bpf", "open_by_handle_at", "keyctl", "add_key", "syslog",
		"clock_settime", "settimeofday", "iopl", "ioperm", "fanotify_init",
	} {
		if allowed(p, name) {
			t.Errorf("%s is allowed", name)
		}
	}
	// clone only without namespace flags.
	for _, sc := range p.Syscalls {
		if slices.Contains(sc.Names, "clone") && sc.Action == specs.ActAllow {
			if len(sc.Args) == 0 || sc.Args[0].Op != specs.OpMaskedEqual || sc.Args[0].ValueTwo != 0 {
				t.Errorf("clone allowed with %+v: namespace flags not filtered", sc.Args)
			}
		}
	}
}

// TestSpecOpts: each option alone, valid and invalid input.
func TestSpecOpts(t *testing.T) {
	tests := []struct {
		name  string
		opts  []SpecOpt
		check func(*testing.T, *specs.Spec)
		err   bool // ErrInvalidArgument expected
	}{
		{name: "process", opts: []SpecOpt{WithProcess([]string{"/bin/sh", "-c", "x"}, []string{"A=1", "PATH=/x"}, "/work", "1000:100")},
			check: func(t *testing.T, s *specs.Spec) {
				if !slices.Equal(s.Process.Args, []string{"/bin/sh", "-c", "x"}) || s.Process.Cwd != "/work" {
					t.Errorf("args %v cwd %q", s.Process.Args, s.Process.Cwd)
				}
				if !slices.Equal(s.Process.Env, []string{"PATH=/x", "A=1"}) {
					t.Errorf("env %v: PATH overridden in place, A appended", s.Process.Env)
				}
				if s.Process.User.UID != 1000 || s.Process.User.GID != 100 {
					t.Errorf("user %+v", s.Process.User)
				}
			}},
		{name: "process uid only sets gid=uid", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "", "1234")},
			check: func(t *testing.T, s *specs.Spec) {
				if s.Process.User.UID != 1234 || s.Process.User.GID != 1234 || s.Process.Cwd != "/" {
					t.Errorf("user %+v cwd %q", s.Process.User, s.Process.Cwd)
				}
			}},
		{name: "process root", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "", "root")},
			check: func(t *testing.T, s *specs.Spec) {
				if s.Process.User.UID != 0 || s.Process.User.GID != 0 {
					t.Errorf("user %+v", s.Process.User)
				}
			}},
		{name: "process empty args", opts: []SpecOpt{WithProcess(nil, nil, "", "")}, err: true},
		{name: "process relative cwd", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "tmp", "")}, err: true},
		{name: "process user name", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "", "nobody")}, err: true},
		{name: "process bad gid", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "", "1:g")}, err: true},
		{name: "process uid overflow", opts: []SpecOpt{WithProcess([]string{"x"}, nil, "", "4294967296")}, err: true},
		{name: "hostname", opts: []SpecOpt{WithHostname("sb-1")},
			check: func(t *testing.T, s *specs.Spec) {
				if s.Hostname != "sb-1" {
					t.Errorf("hostname %q", s.Hostname)
				}
			}},
		{name: "netns", opts: []SpecOpt{WithNetNS("/run/netns/x")},
			check: func(t *testing.T, s *specs.Spec) {
				for _, n := range s.Linux.Namespaces {
					if (n.Type == specs.NetworkNamespace) != (n.Path == "/run/netns/x") {
						t.Errorf("namespace %s path %q", n.Type, n.Path)
					}
				}
			}},
		{name: "bind ro and rw", opts: []SpecOpt{WithBind("/a", "/b", true), WithBind("/c", "/d", false)},
			check: func(t *testing.T, s *specs.Spec) {
				n := len(s.Mounts)
				ro, rw := s.Mounts[n-2], s.Mounts[n-1]
				if ro.Source != "/a" || ro.Destination != "/b" || ro.Type != "bind" || !slices.Contains(ro.Options, "ro") || slices.Contains(ro.Options, "rw") {
					t.Errorf("ro bind %+v", ro)
				}
				if rw.Source != "/c" || !slices.Contains(rw.Options, "rw") || slices.Contains(rw.Options, "ro") {
					t.Errorf("rw bind %+v", rw)
				}
				for _, m := range []specs.Mount{ro, rw} {
					if !slices.Contains(m.Options, "nosuid") || !slices.Contains(m.Options, "nodev") {
						t.Errorf("bind %s without nosuid,nodev: %v", m.Destination, m.Options)
					}
				}
			}},
		{name: "resources", opts: []SpecOpt{WithResources("/chalk/sb", 1.5, 64<<20, 100)},
			check: func(t *testing.T, s *specs.Spec) {
				r := s.Linux.Resources
				if s.Linux.CgroupsPath != "/chalk/sb" {
					t.Errorf("cgroups path %q", s.Linux.CgroupsPath)
				}
				if r.CPU == nil || *r.CPU.Quota != 150000 || *r.CPU.Period != 100000 {
					t.Errorf("cpu %+v", r.CPU)
				}
				if r.Memory == nil || *r.Memory.Limit != 64<<20 || *r.Memory.Swap != 64<<20 {
					t.Errorf("memory %+v: want limit = memory+swap (no swap)", r.Memory)
				}
				if r.Pids == nil || r.Pids.Limit == nil || *r.Pids.Limit != 100 {
					t.Errorf("pids %+v", r.Pids)
				}
				if len(r.Devices) == 0 || r.Devices[0].Allow {
					t.Errorf("resources dropped the device deny-all: %+v", r.Devices)
				}
			}},
		{name: "resources tiny cpu has a floor", opts: []SpecOpt{WithResources("/c", 0.001, 0, 0)},
			check: func(t *testing.T, s *specs.Spec) {
				r := s.Linux.Resources
				if *r.CPU.Quota != 1000 || r.Memory != nil || r.Pids != nil {
					t.Errorf("cpu %+v memory %+v pids %+v", r.CPU, r.Memory, r.Pids)
				}
			}},
		{name: "resources negative memory", opts: []SpecOpt{WithResources("/c", 0, -1, 0)}, err: true},
		{name: "resources negative pids", opts: []SpecOpt{WithResources("/c", 0, 0, -5)}, err: true},
		{name: "resources negative cpu", opts: []SpecOpt{WithResources("/c", -1, 0, 0)}, err: true},
		{name: "resources NaN cpu", opts: []SpecOpt{WithResources("/c", math.NaN(), 0, 0)}, err: true},
		{name: "resources Inf cpu", opts: []SpecOpt{WithResources("/c", math.Inf(1), 0, 0)}, err: true},
		{name: "nofile", opts: []SpecOpt{WithNoFile(1024)},
			check: func(t *testing.T, s *specs.Spec) {
				n := 0
				for _, rl := range s.Process.Rlimits {
					if rl.Type == "RLIMIT_NOFILE" {
						n++
						if rl.Soft != 1024 || rl.Hard != 1024 {
							t.Errorf("nofile %+v", rl)
						}
					}
				}
				if n != 1 {
					t.Errorf("%d RLIMIT_NOFILE entries", n)
				}
			}},
		{name: "nofile at the host limit", opts: []SpecOpt{WithNoFile(MaxNoFile)}},
		{name: "nofile above the host limit", opts: []SpecOpt{WithNoFile(MaxNoFile + 1)}, err: true},
		{name: "nofile zero", opts: []SpecOpt{WithNoFile(0)}, err: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := GenerateSpec(tc.opts...)
			if tc.err {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("got %v, want ErrInvalidArgument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, s)
			}
		})
	}
}

// TestGenerateSpecIndependent: every spec is built fresh; options on one do
// not leak into the next (no shared slices with package state).
func TestGenerateSpecIndependent(t *testing.T) {
	a := mustSpec(t, WithBind("/x", "/y", true), WithNoFile(10))
	a.Linux.MaskedPaths[0] = "/changed"
	a.Process.Capabilities.Bounding = append(a.Process.Capabilities.Bounding[:0], "CAP_SYS_ADMIN")
	b := mustSpec(t)
	if b.Linux.MaskedPaths[0] == "/changed" || slices.Contains(b.Process.Capabilities.Bounding, "CAP_SYS_ADMIN") || len(b.Mounts) == len(a.Mounts) {
		t.Fatal("a spec shares state with the next one")
	}
	if b.Process.Rlimits[0].Hard != MaxNoFile {
		t.Fatalf("nofile of a fresh spec: %d", b.Process.Rlimits[0].Hard)
	}
}

// TestWithUserNS: the sandbox joins the given user namespace (never a new
// one) with the same mappings for runc; bad input is refused.
func TestWithUserNS(t *testing.T) {
	s, err := GenerateSpec(WithUserNS("/run/chalk/userns/sb-1", 1<<20+65536, 65536))
	if err != nil {
		t.Fatal(err)
	}
	var joined int
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.UserNamespace {
			joined++
			if ns.Path != "/run/chalk/userns/sb-1" {
				t.Errorf("user namespace path %q", ns.Path)
			}
		}
	}
	want := []specs.LinuxIDMapping{{ContainerID: 0, HostID: 1<<20 + 65536, Size: 65536}}
	if joined != 1 || !slices.Equal(s.Linux.UIDMappings, want) || !slices.Equal(s.Linux.GIDMappings, want) {
		t.Fatalf("user namespaces %d, uid %+v gid %+v", joined, s.Linux.UIDMappings, s.Linux.GIDMappings)
	}
	for _, bad := range []struct {
		path       string
		host, size uint32
	}{{"", 1 << 20, 65536}, {"/x", 0, 65536}, {"/x", 1 << 20, 0}, {"/x", 1<<32 - 100, 65536}} {
		if _, err := GenerateSpec(WithUserNS(bad.path, bad.host, bad.size)); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("WithUserNS(%q, %d, %d): %v", bad.path, bad.host, bad.size, err)
		}
	}
}
