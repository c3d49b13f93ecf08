package sandbox

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
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
// profile in chalkd) and a cache hit (every start: profileKey's encoding
// of the profile as the key).
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

// TestSeccompCacheKeysWholeProfile: profiles that differ in one field
// (of the profile, of a rule, of an argument condition) get different
// programs from the cache, each the one its own profile compiles to, and a
// profile equal to one seen before (a copy) gets that one's program.
func TestSeccompCacheKeysWholeProfile(t *testing.T) {
	spec, err := GenerateSpec(WithProcess([]string{"/x"}, nil, "", ""), WithSeccomp())
	if err != nil {
		t.Fatal(err)
	}
	base := spec.Linux.Seccomp
	withArgs := slices.IndexFunc(base.Syscalls, func(s specs.LinuxSyscall) bool { return len(s.Args) > 0 })
	if withArgs < 0 {
		t.Fatal("the default profile has no argument condition")
	}
	errnoRule := slices.IndexFunc(base.Syscalls, func(s specs.LinuxSyscall) bool { return s.Action == specs.ActErrno })
	if errnoRule < 0 {
		t.Fatal("the default profile has no errno rule")
	}
	enosys, eperm := uint(unix.ENOSYS), uint(unix.EPERM)
	variants := map[string]func(p *specs.LinuxSeccomp){
		"default errno":   func(p *specs.LinuxSeccomp) { p.DefaultErrnoRet = &enosys },
		"a rule's action": func(p *specs.LinuxSeccomp) { p.Syscalls[0].Action = specs.ActErrno },
		"a rule's errno":  func(p *specs.LinuxSeccomp) { p.Syscalls[errnoRule].ErrnoRet = &eperm },
		"a name less":     func(p *specs.LinuxSeccomp) { p.Syscalls[0].Names = p.Syscalls[0].Names[1:] },
		"an arg's value":  func(p *specs.LinuxSeccomp) { p.Syscalls[withArgs].Args[0].Value++ },
		"an arg's index":  func(p *specs.LinuxSeccomp) { p.Syscalls[withArgs].Args[0].Index++ },
	}
	var c seccompCache
	got0, err := c.get(base)
	if err != nil {
		t.Fatal(err)
	}
	for name, change := range variants {
		p := cloneProfile(t, base)
		change(p)
		got, err := c.get(p)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want, err := seccompbpf.Compile(p)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if bytes.Equal(got, got0) || !bytes.Equal(got, want.Encode()) {
			t.Errorf("%s: the cache gave the base profile's program, or not this profile's own", name)
		}
	}
	if again, err := c.get(cloneProfile(t, base)); err != nil || !bytes.Equal(again, got0) {
		t.Errorf("a copy of the base profile: %v, not its program", err)
	}
	if n := len(c.progs); n != len(variants)+1 {
		t.Errorf("%d programs cached, want %d", n, len(variants)+1)
	}
}

// TestSeccompKeyCoversProfile: changing any one field anywhere in a
// profile (found by reflection, so a field the spec types gain is covered
// too) changes its cache key, and no two of these changes give one key.
func TestSeccompKeyCoversProfile(t *testing.T) {
	zero := uint(0)
	base := &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno, DefaultErrnoRet: &zero,
		Architectures: []specs.Arch{specs.ArchX86_64}, Flags: []specs.LinuxSeccompFlag{"f"},
		ListenerPath: "l", ListenerMetadata: "m",
		Syscalls: []specs.LinuxSyscall{{Names: []string{"a", "b"}, Action: specs.ActAllow, ErrnoRet: &zero,
			Args: []specs.LinuxSeccompArg{{Index: 1, Value: 2, ValueTwo: 3, Op: specs.OpEqualTo}}}},
	}
	keys := map[string]string{string(profileKey(nil, base)): "the base"}
	n := 0
	var walk func(path string, v reflect.Value)
	walk = func(path string, v reflect.Value) {
		switch v.Kind() {
		case reflect.Struct:
			for i := range v.NumField() {
				walk(path+"."+v.Type().Field(i).Name, v.Field(i))
			}
			return
		case reflect.Slice:
			for i := range v.Len() {
				walk(fmt.Sprintf("%s[%d]", path, i), v.Index(i))
			}
		case reflect.Pointer:
			if !v.IsNil() {
				walk("*"+path, v.Elem())
			}
		}
		// Change this field in a copy (found again by the same walk).
		p := cloneProfile(t, base)
		if !mutateAt(reflect.ValueOf(p).Elem(), "", path) {
			t.Fatalf("%s: not found in the copy", path)
		}
		n++
		k := string(profileKey(nil, p))
		if other, ok := keys[k]; ok {
			t.Errorf("changing %s gives the key of %s", path, other)
		}
		keys[k] = path
	}
	walk("", reflect.ValueOf(base).Elem())
	if n < 20 {
		t.Fatalf("only %d changes made", n)
	}
}

// mutateAt changes the value at path (as TestSeccompKeyCoversProfile's walk
// names it) under v: a string gets longer, a number larger, a nil pointer
// set, a slice an element more.
func mutateAt(v reflect.Value, at, path string) bool {
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			if mutateAt(v.Field(i), at+"."+v.Type().Field(i).Name, path) {
				return true
			}
		}
	case reflect.Slice:
		for i := range v.Len() {
			if mutateAt(v.Index(i), fmt.Sprintf("%s[%d]", at, i), path) {
				return true
			}
		}
	case reflect.Pointer:
		if !v.IsNil() && mutateAt(v.Elem(), "*"+at, path) {
			return true
		}
	}
	if at != path {
		return false
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(v.String() + "x")
	case reflect.Uint, reflect.Uint64, reflect.Uint32:
		v.SetUint(v.Uint() + 1)
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		} else {
			v.Set(reflect.Zero(v.Type()))
		}
	case reflect.Slice:
		v.Set(reflect.Append(v, reflect.Zero(v.Type().Elem())))
	default:
		panic("mutateAt: kind " + v.Kind().String() + " at " + path)
	}
	return true
}

// cloneProfile is a deep copy of p.
func cloneProfile(t *testing.T, p *specs.LinuxSeccomp) *specs.LinuxSeccomp {
	t.Helper()
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var c specs.LinuxSeccomp
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return &c
}
