package seccompbpf

import (
	"encoding/binary"
	"errors"
	"testing"
	"unsafe"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// call is one seccomp_data input.
type call struct {
	nr   uint32
	arch uint32
	args [6]uint64
}

// vm runs a program on seccomp_data inputs. x/net/bpf's VM loads words big
// endian, so the input is laid out for it with the kernel's native (little
// endian) meaning: each argument's low half at its offset, the high half 4
// bytes on.
type vm struct{ *bpf.VM }

func newVM(t testing.TB, p Program) vm {
	t.Helper()
	raw := make([]bpf.RawInstruction, len(p))
	for i, f := range p {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	ins, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatalf("program does not disassemble")
	}
	v, err := bpf.NewVM(ins)
	if err != nil {
		t.Fatalf("bpf.NewVM: %v", err)
	}
	return vm{v}
}

func (v vm) run(t testing.TB, c call) uint32 {
	t.Helper()
	in := make([]byte, 64)
	binary.BigEndian.PutUint32(in[offNr:], c.nr)
	binary.BigEndian.PutUint32(in[offArch:], c.arch)
	for i, a := range c.args {
		binary.BigEndian.PutUint32(in[offArgs+8*i:], uint32(a))
		binary.BigEndian.PutUint32(in[offArgs+8*i+4:], uint32(a>>32))
	}
	r, err := v.Run(in)
	if err != nil {
		t.Fatalf("run %+v: %v", c, err)
	}
	return uint32(r)
}

func u(v uint) *uint { return &v }

var testTable = map[string]uint32{"read": 0, "write": 1, "open": 2, "close": 3, "socket": 41, "clone": 56, "personality": 135, "mount": 165, "kexec": 246, "clone3": 435, "big": 500}

const x86 = unix.AUDIT_ARCH_X86_64

func TestCompileSemantics(t *testing.T) {
	p := &specs.LinuxSeccomp{
		DefaultAction:   specs.ActErrno,
		DefaultErrnoRet: u(uint(unix.EACCES)),
		Architectures:   []specs.Arch{specs.ArchX86_64},
		Syscalls: []specs.LinuxSyscall{
			{Names: []string{"read", "write", "nosuchcall"}, Action: specs.ActAllow},
			{Names: []string{"close"}, Action: specs.ActErrno}, // EPERM: errnoRet unset
			{Names: []string{"kexec"}, Action: specs.ActKillProcess},
			{Names: []string{"clone3"}, Action: specs.ActErrno, ErrnoRet: u(uint(unix.ENOSYS))},
			// OR of two rules, one with two AND'ed conditions
			{Names: []string{"socket"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 0, Value: 38, Op: specs.OpLessThan}}},
			{Names: []string{"socket"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				{Index: 0, Value: 0x1_0000_0005, Op: specs.OpEqualTo},
				{Index: 2, Value: 7, Op: specs.OpGreaterEqual},
			}},
			{Names: []string{"clone"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 0, Value: 0xf_7e02_0000, ValueTwo: 0x1_0000_0000, Op: specs.OpMaskedEqual}}},
			{Names: []string{"personality"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 5, Value: 0xffffffff, Op: specs.OpNotEqual}}},
			{Names: []string{"personality"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 1, Value: 0x2_0000_0000, Op: specs.OpGreaterThan}}},
			{Names: []string{"mount"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{{Index: 3, Value: 0x1_0000_0010, Op: specs.OpLessEqual}}},
		},
	}
	prog, err := compile(p, specs.ArchX86_64, x86, testTable)
	if err != nil {
		t.Fatal(err)
	}
	v := newVM(t, prog)
	const (
		allow  = retAllow
		def    = retErrno | uint32(unix.EACCES)
		eperm  = retErrno | uint32(unix.EPERM)
		enosys = retErrno | uint32(unix.ENOSYS)
		kill   = retKillThread
	)
	for _, tc := range []struct {
		name string
		c    call
		want uint32
	}{
		{"allowed", call{nr: 0, arch: x86}, allow},
		{"allowed with args", call{nr: 1, arch: x86, args: [6]uint64{^uint64(0), 1, 2, 3, 4, 5}}, allow},
		{"not listed: default errnoRet", call{nr: 4, arch: x86}, def},
		{"errno without errnoRet: EPERM", call{nr: 3, arch: x86}, eperm},
		{"kill process", call{nr: 246, arch: x86}, retKillProcess},
		{"errnoRet ENOSYS", call{nr: 435, arch: x86}, enosys},
		{"largest named", call{nr: 435, arch: x86}, enosys},
		{"above largest: ENOSYS", call{nr: 436, arch: x86}, enosys},
		{"far above", call{nr: 500, arch: x86}, enosys},
		{"far above, bit 30 clear", call{nr: 0x8000_0000, arch: x86}, enosys},
		{"i386", call{nr: 0, arch: unix.AUDIT_ARCH_I386}, kill},
		{"other arch", call{nr: 1, arch: unix.AUDIT_ARCH_AARCH64}, kill},
		{"x32 read", call{nr: 0 | 0x4000_0000, arch: x86}, kill},
		{"x32 above", call{nr: 600 | 0x4000_0000, arch: x86}, kill},
		{"x32 bit with high bit", call{nr: 0xc000_0000, arch: x86}, kill},
		{"-1: default", call{nr: 0xffff_ffff, arch: x86}, def},
		// socket: arg0 < 38 (64-bit)
		{"socket lt", call{nr: 41, arch: x86, args: [6]uint64{37}}, allow},
		{"socket not lt", call{nr: 41, arch: x86, args: [6]uint64{38}}, def},
		{"socket lt: high half set", call{nr: 41, arch: x86, args: [6]uint64{1<<32 | 1}}, def},
		// second rule: arg0 == 0x1_0000_0005 && arg2 >= 7
		{"socket rule 2", call{nr: 41, arch: x86, args: [6]uint64{0x1_0000_0005, 0, 7}}, allow},
		{"socket rule 2, arg2 short", call{nr: 41, arch: x86, args: [6]uint64{0x1_0000_0005, 0, 6}}, def},
		{"socket rule 2, arg2 high", call{nr: 41, arch: x86, args: [6]uint64{0x1_0000_0005, 0, 1 << 32}}, allow},
		{"socket rule 2, low half only", call{nr: 41, arch: x86, args: [6]uint64{5 + 40, 0, 7}}, def},
		{"socket rule 2, eq low only", call{nr: 41, arch: x86, args: [6]uint64{0x2_0000_0005, 0, 7}}, def},
		// clone: arg0 & 0xf_7e02_0000 == 0x1_0000_0000
		{"clone masked ok", call{nr: 56, arch: x86, args: [6]uint64{0x1_0001_0011}}, allow},
		{"clone masked low bit", call{nr: 56, arch: x86, args: [6]uint64{0x1_0000_0000 | unix.CLONE_NEWNS}}, def},
		{"clone masked, high half wrong", call{nr: 56, arch: x86, args: [6]uint64{0x3_0000_0000}}, def},
		{"clone masked, high half zero", call{nr: 56, arch: x86, args: [6]uint64{0}}, def},
		{"clone masked, high bits outside mask", call{nr: 56, arch: x86, args: [6]uint64{0xf0_0000_0000 | 0x1_0000_0000}}, allow},
		// personality: arg5 != 0xffffffff || arg1 > 0x2_0000_0000
		{"ne: differs", call{nr: 135, arch: x86, args: [6]uint64{5: 0}}, allow},
		{"ne: equal", call{nr: 135, arch: x86, args: [6]uint64{5: 0xffffffff}}, def},
		{"ne: high half differs", call{nr: 135, arch: x86, args: [6]uint64{5: 0x1_ffff_ffff}}, allow},
		{"gt: high greater", call{nr: 135, arch: x86, args: [6]uint64{1: 0x3_0000_0000, 5: 0xffffffff}}, allow},
		{"gt: equal", call{nr: 135, arch: x86, args: [6]uint64{1: 0x2_0000_0000, 5: 0xffffffff}}, def},
		{"gt: low greater", call{nr: 135, arch: x86, args: [6]uint64{1: 0x2_0000_0001, 5: 0xffffffff}}, allow},
		{"gt: high less, low greater", call{nr: 135, arch: x86, args: [6]uint64{1: 0x1_ffff_ffff, 5: 0xffffffff}}, def},
		// mount: arg3 <= 0x1_0000_0010
		{"le: equal", call{nr: 165, arch: x86, args: [6]uint64{3: 0x1_0000_0010}}, allow},
		{"le: less high", call{nr: 165, arch: x86, args: [6]uint64{3: 0xffff_ffff}}, allow},
		{"le: greater low", call{nr: 165, arch: x86, args: [6]uint64{3: 0x1_0000_0011}}, def},
		{"le: greater high", call{nr: 165, arch: x86, args: [6]uint64{3: 0x2_0000_0000}}, def},
	} {
		if got := v.run(t, tc.c); got != tc.want {
			t.Errorf("%s: %+v: got %#x, want %#x", tc.name, tc.c, got, tc.want)
		}
	}
}

// TestCompileOps checks every operator against its definition on many
// values, each side of both 32-bit halves.
func TestCompileOps(t *testing.T) {
	vals := []uint64{0, 1, 2, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 32, 1<<32 | 1, 1<<32 | 0xffff_ffff, 2 << 32, 0x8000_0000_0000_0000, ^uint64(0), 0xdead_beef_0000_0005}
	ops := map[specs.LinuxSeccompOperator]func(a, v, v2 uint64) bool{
		specs.OpEqualTo:      func(a, v, _ uint64) bool { return a == v },
		specs.OpNotEqual:     func(a, v, _ uint64) bool { return a != v },
		specs.OpLessThan:     func(a, v, _ uint64) bool { return a < v },
		specs.OpLessEqual:    func(a, v, _ uint64) bool { return a <= v },
		specs.OpGreaterThan:  func(a, v, _ uint64) bool { return a > v },
		specs.OpGreaterEqual: func(a, v, _ uint64) bool { return a >= v },
		specs.OpMaskedEqual:  func(a, v, v2 uint64) bool { return a&v == v2 },
	}
	for op, want := range ops {
		for _, v := range vals {
			for _, v2 := range []uint64{0, v & 0x1_0000_0001} {
				for idx := uint(0); idx < 6; idx += 5 {
					p := &specs.LinuxSeccomp{
						DefaultAction: specs.ActErrno, Architectures: []specs.Arch{specs.ArchX86_64},
						Syscalls: []specs.LinuxSyscall{{Names: []string{"write"}, Action: specs.ActAllow,
							Args: []specs.LinuxSeccompArg{{Index: idx, Value: v, ValueTwo: v2, Op: op}}}},
					}
					prog, err := compile(p, specs.ArchX86_64, x86, testTable)
					if err != nil {
						t.Fatal(err)
					}
					m := newVM(t, prog)
					for _, a := range vals {
						for _, d := range []uint64{0, 1, ^uint64(0), 1 << 32} {
							c := call{nr: 1, arch: x86}
							c.args[idx] = a + d
							c.args[5-idx] = v // the other argument does not matter
							got := m.run(t, c) == retAllow
							if got != want(a+d, v, v2) {
								t.Fatalf("%s arg%d=%#x value %#x valueTwo %#x: allowed %v", op, idx, a+d, v, v2, got)
							}
						}
					}
				}
			}
		}
	}
}

// TestCompileAllowDefault: under a default action that allows, runc adds
// no ENOSYS stub: a number above the largest named is allowed.
func TestCompileAllowDefault(t *testing.T) {
	p := &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow, Architectures: []specs.Arch{specs.ArchX86_64},
		Syscalls: []specs.LinuxSyscall{{Names: []string{"mount"}, Action: specs.ActErrno}},
	}
	prog, err := compile(p, specs.ArchX86_64, x86, testTable)
	if err != nil {
		t.Fatal(err)
	}
	v := newVM(t, prog)
	for _, tc := range []struct {
		c    call
		want uint32
	}{
		{call{nr: 165, arch: x86}, retErrno | uint32(unix.EPERM)},
		{call{nr: 0, arch: x86}, retAllow},
		{call{nr: 435, arch: x86}, retAllow},
		{call{nr: 0x4000_0000, arch: x86}, retKillThread},
		{call{nr: 0, arch: unix.AUDIT_ARCH_I386}, retKillThread},
	} {
		if got := v.run(t, tc.c); got != tc.want {
			t.Errorf("%+v: got %#x, want %#x", tc.c, got, tc.want)
		}
	}
}

func TestCompileStructure(t *testing.T) {
	p := &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno, Architectures: []specs.Arch{specs.ArchX86_64},
		Syscalls: []specs.LinuxSyscall{{Names: []string{"read", "write"}, Action: specs.ActAllow}},
	}
	prog, err := compile(p, specs.ArchX86_64, x86, testTable)
	if err != nil {
		t.Fatal(err)
	}
	// The arch check comes first, before anything reads the number.
	if prog[0] != (unix.SockFilter{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArch}) {
		t.Errorf("first instruction %+v: not a load of the arch", prog[0])
	}
	if prog[1].Code != unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K || prog[1].K != x86 || prog[1].Jt != 0 {
		t.Errorf("second instruction %+v: not the arch check", prog[1])
	}
	if last := prog[len(prog)-1]; last.Code != unix.BPF_RET|unix.BPF_K {
		t.Errorf("last instruction %+v: not a return", last)
	}
	b := prog.Encode()
	if len(b) != 8*len(prog) {
		t.Fatalf("encoded %d bytes for %d instructions", len(b), len(prog))
	}
	back, err := Decode(b)
	if err != nil || len(back) != len(prog) {
		t.Fatalf("Decode: %d, %v", len(back), err)
	}
	for i := range prog {
		if back[i] != prog[i] {
			t.Fatalf("instruction %d: %+v decoded as %+v", i, prog[i], back[i])
		}
	}
	for _, bad := range [][]byte{nil, b[:7], make([]byte, 8*(unix.BPF_MAXINSNS+1))} {
		if _, err := Decode(bad); err == nil {
			t.Errorf("Decode of %d bytes: no error", len(bad))
		}
		if _, err := View(bad); err == nil {
			t.Errorf("View of %d bytes: no error", len(bad))
		}
	}
	// View reads the encoding in place (the struct's layout is the
	// encoding): the same program, sharing b.
	view, err := View(b)
	if err != nil || len(view) != len(prog) {
		t.Fatalf("View: %d, %v", len(view), err)
	}
	for i := range prog {
		if view[i] != prog[i] {
			t.Fatalf("instruction %d: %+v viewed as %+v", i, prog[i], view[i])
		}
	}
	if unsafe.Pointer(&view[0]) != unsafe.Pointer(&b[0]) {
		t.Error("View copied the program")
	}
	odd := make([]byte, len(b)+1)
	copy(odd[1:], b)
	if _, err := View(odd[1:]); err == nil {
		t.Error("View of an unaligned buffer: no error")
	}
}

func TestCompileUnsupported(t *testing.T) {
	base := func() *specs.LinuxSeccomp {
		return &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Architectures: []specs.Arch{specs.ArchX86_64},
			Syscalls: []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow}}}
	}
	for name, edit := range map[string]func(p *specs.LinuxSeccomp){
		"compat arch": func(p *specs.LinuxSeccomp) { p.Architectures = append(p.Architectures, specs.ArchX86) },
		"no arch":     func(p *specs.LinuxSeccomp) { p.Architectures = nil },
		"flags":       func(p *specs.LinuxSeccomp) { p.Flags = []specs.LinuxSeccompFlag{specs.LinuxSeccompFlagLog} },
		"listener":    func(p *specs.LinuxSeccomp) { p.ListenerPath = "/x" },
		"notify":      func(p *specs.LinuxSeccomp) { p.Syscalls[0].Action = specs.ActNotify },
		"trace":       func(p *specs.LinuxSeccomp) { p.DefaultAction = specs.ActTrace },
		"operator":    func(p *specs.LinuxSeccomp) { p.Syscalls[0].Args = []specs.LinuxSeccompArg{{Op: "SCMP_CMP_XX"}} },
		"mixed action": func(p *specs.LinuxSeccomp) {
			p.Syscalls = append(p.Syscalls, specs.LinuxSyscall{Names: []string{"read"}, Action: specs.ActKill})
		},
	} {
		p := base()
		edit(p)
		if _, err := compile(p, specs.ArchX86_64, x86, testTable); !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: %v, want ErrUnsupported", name, err)
		}
	}
	p := base()
	p.Syscalls[0].Args = []specs.LinuxSeccompArg{{Index: 6, Op: specs.OpEqualTo}}
	if _, err := compile(p, specs.ArchX86_64, x86, testTable); err == nil {
		t.Errorf("argument index 6: no error")
	}
}
