// Package seccompbpf compiles an OCI seccomp profile (specs.LinuxSeccomp)
// into a classic BPF seccomp filter with the semantics runc 1.1 and
// libseccomp give the same profile, so chalkd can compile a profile once and
// hand the program to the sandbox's init instead of having runc compile it
// with libseccomp on every start.
//
// The program:
//
//   - kills the thread (SECCOMP_RET_KILL_THREAD, libseccomp's bad-arch
//     action as runc uses it) for a call through another ABI than the native
//     one (seccomp_data.arch is not AUDIT_ARCH_X86_64);
//   - kills the thread for an x32 call (the number has bit 30,
//     __X32_SYSCALL_BIT, set), except the number -1 (0xffffffff) which, as in
//     libseccomp's filter, gets the default action;
//   - returns ENOSYS for a number greater than the largest the profile names
//     (runc's patchbpf stub, so that libc falls back from a call newer than
//     the profile, e.g. clone3 -> clone, instead of failing with the default
//     errno), unless the default action allows (as runc);
//   - otherwise applies the profile: a call's rules are OR'ed, a rule's
//     conditions AND'ed, each condition compares the full 64-bit argument
//     (both 32-bit halves), and a call no rule matches gets the default
//     action.
//
// System call names are resolved with the table in zsysnum_amd64.go
// (gentable.py): golang.org/x/sys's numbers, restricted to the names the
// node's libseccomp knows. A name the table lacks is skipped, as runc skips a
// name libseccomp cannot resolve: it is neither allowed nor counted for the
// ENOSYS bound. Profiles this package cannot reproduce exactly (other or
// several architectures, flags, notify/trace actions, one call with rules
// of different actions) are refused with ErrUnsupported; the caller then
// leaves the profile to runc.
package seccompbpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"unsafe"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// ErrUnsupported: the profile uses something this compiler does not
// reproduce; leave it to the OCI runtime.
var ErrUnsupported = errors.New("seccomp profile not supported by the filter compiler")

// Seccomp return values and the x32 bit (linux/seccomp.h, asm/unistd.h).
const (
	retKillThread  = unix.SECCOMP_RET_KILL_THREAD
	retKillProcess = unix.SECCOMP_RET_KILL_PROCESS
	retTrap        = unix.SECCOMP_RET_TRAP
	retErrno       = unix.SECCOMP_RET_ERRNO
	retLog         = unix.SECCOMP_RET_LOG
	retAllow       = unix.SECCOMP_RET_ALLOW
	x32SyscallBit  = 0x40000000
	// Offsets in struct seccomp_data.
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// Program is a compiled filter.
type Program []unix.SockFilter

// Compile compiles p for the node's native architecture.
func Compile(p *specs.LinuxSeccomp) (Program, error) {
	if runtime.GOARCH != "amd64" {
		return nil, fmt.Errorf("%w: architecture %s", ErrUnsupported, runtime.GOARCH)
	}
	return compile(p, specs.ArchX86_64, unix.AUDIT_ARCH_X86_64, sysnumAMD64())
}

type rule struct {
	action uint32
	args   []specs.LinuxSeccompArg // AND'ed; empty: always
}

func compile(p *specs.LinuxSeccomp, arch specs.Arch, auditArch uint32, table map[string]uint32) (Program, error) {
	if p == nil {
		return nil, errors.New("no seccomp profile")
	}
	if len(p.Architectures) != 1 || p.Architectures[0] != arch {
		return nil, fmt.Errorf("%w: architectures %v (only [%s])", ErrUnsupported, p.Architectures, arch)
	}
	if len(p.Flags) > 0 || p.ListenerPath != "" || p.ListenerMetadata != "" {
		return nil, fmt.Errorf("%w: flags or listener", ErrUnsupported)
	}
	def, err := action(p.DefaultAction, p.DefaultErrnoRet)
	if err != nil {
		return nil, fmt.Errorf("default action: %w", err)
	}
	rules := map[uint32][]rule{}
	var maxNr uint32
	for _, sc := range p.Syscalls {
		act, err := action(sc.Action, sc.ErrnoRet)
		if err != nil {
			return nil, fmt.Errorf("syscalls %v: %w", sc.Names, err)
		}
		for _, a := range sc.Args {
			if a.Index > 5 {
				return nil, fmt.Errorf("syscalls %v: argument index %d", sc.Names, a.Index)
			}
			if !cmpOp(a.Op) {
				return nil, fmt.Errorf("%w: syscalls %v: operator %q", ErrUnsupported, sc.Names, a.Op)
			}
		}
		for _, name := range sc.Names {
			nr, ok := table[name]
			if !ok {
				continue // as runc: a name libseccomp does not know is ignored
			}
			maxNr = max(maxNr, nr)
			rules[nr] = append(rules[nr], rule{act, sc.Args})
		}
	}
	nrs := make([]uint32, 0, len(rules))
	for nr, rs := range rules {
		for _, r := range rs[1:] {
			if r.action != rs[0].action {
				return nil, fmt.Errorf("%w: system call %d has rules with different actions", ErrUnsupported, nr)
			}
		}
		for _, r := range rs {
			if len(r.args) == 0 { // an unconditional rule covers the others
				rules[nr] = []rule{r}
				break
			}
		}
		if rules[nr][0].action == def && len(rules[nr][0].args) == 0 {
			delete(rules, nr) // same as no rule
			continue
		}
		nrs = append(nrs, nr)
	}
	sort.Slice(nrs, func(i, j int) bool { return nrs[i] < nrs[j] })

	var a asm
	a.ld(offArch)
	a.jeq(auditArch, "", "kill")
	a.ld(offNr)
	a.jset(x32SyscallBit, "x32", "")
	// runc adds its ENOSYS stub only under a default action that refuses.
	if maxNr > 0 && def != retAllow && def != retLog {
		a.jgt(maxNr, "enosys", "")
	}
	a.jmp("dispatch")
	a.label("x32")
	a.jeq(0xffffffff, "dispatch", "kill")
	a.label("kill")
	a.ret(retKillThread)
	a.label("enosys")
	a.ret(retErrno | uint32(unix.ENOSYS))

	// Dispatch on the number (A holds it): a conditional jump reaches at
	// most 255 instructions, so each entry jumps over an unconditional one.
	a.label("dispatch")
	for _, nr := range nrs {
		a.jeq(nr, "", "+1")
		rs := rules[nr]
		if len(rs[0].args) == 0 {
			a.jmp(fmt.Sprintf("ret%#x", rs[0].action))
		} else {
			a.jmp(fmt.Sprintf("sys%d", nr))
		}
	}
	a.ret(def)
	rets := map[uint32]bool{}
	for _, nr := range nrs {
		rs := rules[nr]
		if len(rs[0].args) == 0 {
			if !rets[rs[0].action] {
				rets[rs[0].action] = true
				a.label(fmt.Sprintf("ret%#x", rs[0].action))
				a.ret(rs[0].action)
			}
			continue
		}
		a.label(fmt.Sprintf("sys%d", nr))
		for i, r := range rs {
			next := fmt.Sprintf("sys%d.%d", nr, i+1)
			for j, c := range r.args {
				a.cond(c, next, fmt.Sprintf("sys%d.%d.%d", nr, i, j))
			}
			a.ret(r.action)
			a.label(next)
		}
		a.ret(def)
	}
	return a.assemble()
}

// action is the filter's return value for an OCI action; errnoRet defaults
// to EPERM, as runc's.
func action(act specs.LinuxSeccompAction, errnoRet *uint) (uint32, error) {
	switch act {
	case specs.ActAllow:
		return retAllow, nil
	case specs.ActErrno:
		e := uint32(unix.EPERM)
		if errnoRet != nil {
			if *errnoRet > 0xffff {
				return 0, fmt.Errorf("errnoRet %d", *errnoRet)
			}
			e = uint32(*errnoRet)
		}
		return retErrno | e, nil
	case specs.ActKill, specs.ActKillThread:
		return retKillThread, nil
	case specs.ActKillProcess:
		return retKillProcess, nil
	case specs.ActTrap:
		return retTrap, nil
	case specs.ActLog:
		return retLog, nil
	}
	return 0, fmt.Errorf("%w: action %q", ErrUnsupported, act)
}

// cmpOp says whether op is one the compiler reproduces (a switch, not a
// package-level map: chalk-init links this package and allocates nothing
// for it at start).
func cmpOp(op specs.LinuxSeccompOperator) bool {
	switch op {
	case specs.OpNotEqual, specs.OpLessThan, specs.OpLessEqual, specs.OpEqualTo,
		specs.OpGreaterEqual, specs.OpGreaterThan, specs.OpMaskedEqual:
		return true
	}
	return false
}

// Encode is the program as struct sock_filter array, in host byte order:
// what the kernel takes.
func (p Program) Encode() []byte {
	b := make([]byte, 0, 8*len(p))
	for _, f := range p {
		b = binary.NativeEndian.AppendUint16(b, f.Code)
		b = append(b, f.Jt, f.Jf)
		b = binary.NativeEndian.AppendUint32(b, f.K)
	}
	return b
}

// Decode is the inverse of Encode.
func Decode(b []byte) (Program, error) {
	if len(b) == 0 || len(b)%8 != 0 || len(b)/8 > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("seccomp program of %d bytes", len(b))
	}
	p := make(Program, len(b)/8)
	for i := range p {
		c := b[8*i:]
		p[i] = unix.SockFilter{Code: binary.NativeEndian.Uint16(c), Jt: c[2], Jf: c[3], K: binary.NativeEndian.Uint32(c[4:])}
	}
	return p, nil
}

// View is the program b encodes (Encode), read in place: the returned
// Program shares b's memory, nothing is copied or allocated (chalk-init maps
// the program's memfd and installs it from there; see its installSeccomp).
// b must be 4-byte aligned (a mapping is).
func View(b []byte) (Program, error) {
	if len(b) == 0 || len(b)%8 != 0 || len(b)/8 > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("seccomp program of %d bytes", len(b))
	}
	if uintptr(unsafe.Pointer(&b[0]))%unsafe.Alignof(unix.SockFilter{}) != 0 {
		return nil, errors.New("seccomp program: unaligned")
	}
	return unsafe.Slice((*unix.SockFilter)(unsafe.Pointer(&b[0])), len(b)/8), nil
}

// Install loads the program as a filter of every thread of the calling
// process (SECCOMP_FILTER_FLAG_TSYNC). The caller must have no_new_privs set
// (or CAP_SYS_ADMIN).
func Install(p Program) error {
	if len(p) == 0 {
		return errors.New("empty seccomp program")
	}
	prog := unix.SockFprog{Len: uint16(len(p)), Filter: &p[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(p)
	if errno != 0 {
		return fmt.Errorf("seccomp(SET_MODE_FILTER, TSYNC): %w", errno)
	}
	if r != 0 {
		// TSYNC: the id of a thread that could not be synchronised.
		return fmt.Errorf("seccomp(SET_MODE_FILTER, TSYNC): thread %d could not be synchronised", r)
	}
	return nil
}
