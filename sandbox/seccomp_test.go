package sandbox

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"github.com/chalkcompute/chalkcompute/sandbox/seccompbpf"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestSeccompMatchesRunc is the differential test of the filter compiler
// against the old path: runc 1.1 with libseccomp compiling the sandbox's
// profile (WithSeccomp) itself.
//
//  1. The filter runc installs is read back from its container's process
//     (PTRACE_SECCOMP_GET_FILTER) and both programs are run in x/net/bpf's
//     VM on every system call number up to past the largest the profile
//     names, the x32 and -1 numbers, other architectures, and the argument
//     values around each condition of the profile (both 32-bit halves).
//  2. A probe (testdata/probe, built static) makes a list of system calls
//     each in a child process, once in a runc container with the profile and
//     once after loading the compiled filter itself (as chalk-init does);
//     the results (ok, errno, killing signal) must be the same.
func TestSeccompMatchesRunc(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs runc")
	}
	if runtime.GOARCH != "amd64" {
		t.Skip("the compiler covers amd64")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("no runc")
	}
	dir := t.TempDir()
	rootfs := filepath.Join(dir, "bundle", "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	probe := filepath.Join(rootfs, "probe")
	build := exec.Command("go", "build", "-o", probe, "./seccompbpf/testdata/probe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build probe: %v\n%s", err, out)
	}
	spec, err := GenerateSpec(WithProcess([]string{"/probe", "sleep"}, nil, "", ""), WithSeccomp())
	if err != nil {
		t.Fatal(err)
	}
	profile := spec.Linux.Seccomp
	prog, err := seccompbpf.Compile(profile)
	if err != nil {
		t.Fatal(err)
	}
	spec.Root = &specs.Root{Path: "rootfs", Readonly: true}
	spec.Linux.Resources = nil
	runcRoot := filepath.Join(dir, "runc")
	runc := func(args ...string) ([]byte, error) {
		return exec.Command("runc", append([]string{"--root", runcRoot}, args...)...).CombinedOutput()
	}
	writeSpec := func() {
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "bundle", "config.json"), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeSpec()
	id := "seccomp-diff-" + strings.ReplaceAll(filepath.Base(dir), "_", "-")
	// Detached: the container keeps runc's stdio, so not a pipe.
	run := exec.Command("runc", "--root", runcRoot, "run", "-d", "--bundle", filepath.Join(dir, "bundle"), id)
	if err := run.Run(); err != nil {
		t.Fatalf("runc run: %v", err)
	}
	t.Cleanup(func() { runc("delete", "--force", id) })
	out, err := runc("state", id)
	if err != nil {
		t.Fatalf("runc state: %v\n%s", err, out)
	}
	var st struct{ Pid int }
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatal(err)
	}
	theirs := readFilter(t, st.Pid)
	if out, err := runc("delete", "--force", id); err != nil {
		t.Fatalf("runc delete: %v\n%s", err, out)
	}

	// 1. Both programs on the same inputs.
	ours, old := progVM(t, prog), rawVM(t, theirs)
	var inputs [][]byte
	add := func(nr, arch uint32, args [6]uint64) {
		inputs = append(inputs, seccompData(nr, arch, args))
	}
	var argVals []uint64
	for _, sc := range profile.Syscalls {
		for _, a := range sc.Args {
			for _, v := range []uint64{a.Value, a.Value | a.ValueTwo, a.ValueTwo, a.Value &^ a.ValueTwo} {
				for _, d := range []uint64{0, 1, ^uint64(0), 1 << 32, 0xffffffff_00000000} {
					argVals = append(argVals, v+d, v^d)
				}
			}
		}
	}
	for nr := uint32(0); nr < 600; nr++ {
		for _, arch := range []uint32{unix.AUDIT_ARCH_X86_64, unix.AUDIT_ARCH_I386, unix.AUDIT_ARCH_AARCH64, 0} {
			add(nr, arch, [6]uint64{})
			add(nr|0x40000000, arch, [6]uint64{})
		}
		for _, a := range argVals {
			add(nr, unix.AUDIT_ARCH_X86_64, [6]uint64{a, a, a})
			add(nr, unix.AUDIT_ARCH_X86_64, [6]uint64{a, 0, 0, 0, 0, ^a})
		}
	}
	for _, nr := range []uint32{0x3fffffff, 0x7fffffff, 0x80000000, 0xbfffffff, 0xc0000000, 0xfffffffe, 0xffffffff} {
		add(nr, unix.AUDIT_ARCH_X86_64, [6]uint64{})
	}
	for _, in := range inputs {
		a, err := ours.Run(in)
		if err != nil {
			t.Fatal(err)
		}
		b, err := old.Run(in)
		if err != nil {
			t.Fatal(err)
		}
		if a != b {
			t.Fatalf("nr %#x arch %#x args %x: compiled filter returns %#x, runc's %#x",
				binary.BigEndian.Uint32(in), binary.BigEndian.Uint32(in[4:]), in[16:], uint32(a), uint32(b))
		}
	}
	t.Logf("%d inputs agree (compiled filter %d instructions, runc's %d)", len(inputs), len(prog), len(theirs))

	// 2. The probe under runc's filter, then under ours.
	spec.Process.Args = []string{"/probe"}
	writeSpec()
	want, err := runc("run", "--bundle", filepath.Join(dir, "bundle"), id+"-probe")
	if err != nil {
		t.Fatalf("probe under runc: %v\n%s", err, want)
	}
	progFile := filepath.Join(dir, "prog")
	if err := os.WriteFile(progFile, prog.Encode(), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := exec.Command(probe, "-install", progFile).CombinedOutput()
	if err != nil {
		t.Fatalf("probe with the compiled filter: %v\n%s", err, got)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("probe results differ\nrunc+libseccomp:\n%s\ncompiled:\n%s", want, got)
	}
	for _, line := range []string{
		"getpid: ok", "unshare user: errno 1", "mount: errno 1", "keyctl: errno 1",
		"clone sighand: errno 22", "clone newns: errno 1", "clone newuser: errno 1", "clone3: errno 38",
		"socket vsock: errno 1", "socket unix: ok", "statmount (above): errno 38", "x32 getpid: killed",
	} {
		if !strings.Contains(string(got), line+"\n") {
			t.Errorf("probe: no %q in\n%s", line, got)
		}
	}
}

// readFilter returns the (only) seccomp filter of process pid.
func readFilter(t *testing.T, pid int) []bpf.RawInstruction {
	t.Helper()
	runtime.LockOSThread() // ptrace requests come from the tracer thread
	defer runtime.UnlockOSThread()
	if err := unix.PtraceAttach(pid); err != nil {
		t.Fatalf("ptrace attach: %v", err)
	}
	defer unix.PtraceDetach(pid)
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, unix.WALL, nil); err != nil {
		t.Fatalf("wait for the tracee: %v", err)
	}
	n, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(pid), 0, 0, 0, 0)
	if e != 0 {
		t.Fatalf("PTRACE_SECCOMP_GET_FILTER: %v", e)
	}
	buf := make([]unix.SockFilter, n)
	if _, _, e := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(pid), 0, uintptr(unsafe.Pointer(&buf[0])), 0, 0); e != 0 {
		t.Fatalf("PTRACE_SECCOMP_GET_FILTER: %v", e)
	}
	raw := make([]bpf.RawInstruction, n)
	for i, f := range buf {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	return raw
}

func progVM(t *testing.T, p seccompbpf.Program) *bpf.VM {
	raw := make([]bpf.RawInstruction, len(p))
	for i, f := range p {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	return rawVM(t, raw)
}

func rawVM(t *testing.T, raw []bpf.RawInstruction) *bpf.VM {
	t.Helper()
	ins, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatal("program does not disassemble")
	}
	v, err := bpf.NewVM(ins)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// seccompData lays out struct seccomp_data for x/net/bpf's VM, which loads
// words big endian: each word's value as the (little endian) kernel sees it.
func seccompData(nr, arch uint32, args [6]uint64) []byte {
	in := make([]byte, 64)
	binary.BigEndian.PutUint32(in, nr)
	binary.BigEndian.PutUint32(in[4:], arch)
	for i, a := range args {
		binary.BigEndian.PutUint32(in[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(in[20+8*i:], uint32(a>>32))
	}
	return in
}

// BenchmarkSeccompCompile: compiling the sandbox profile (once per distinct
// profile in chalkd) and a cache hit (every start: the profile's JSON as
// the key).
func BenchmarkSeccompCompile(b *testing.B) {
	spec, err := GenerateSpec(WithProcess([]string{"/x"}, nil, "", ""), WithSeccomp())
	if err != nil {
		b.Fatal(err)
	}
	b.Run("compile", func(b *testing.B) {
		for b.Loop() {
			if _, err := seccompbpf.Compile(spec.Linux.Seccomp); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("cached", func(b *testing.B) {
		var c seccompCache
		for b.Loop() {
			if _, err := c.get(spec.Linux.Seccomp); err != nil {
				b.Fatal(err)
			}
		}
	})
}
