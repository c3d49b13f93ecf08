package sandbox

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/sandbox/seccompbpf"
)

// Who loads a runc sandbox's seccomp filter (Config.Seccomp).
const (
	// SeccompInit: chalkd compiles the profile once (seccompbpf), removes
	// it from the spec and passes the program to chalk-init (--seccomp-fd,
	// a sealed memfd), which loads it before anything else; chalkd then
	// checks init is filtered before the sandbox is used.
	SeccompInit = "init"
	// SeccompRunc: the profile stays in the spec; runc compiles it with
	// libseccomp on every start (~5 ms of CPU).
	SeccompRunc = "runc"
)

// seccompCache holds the compiled program of each distinct profile (the
// profile depends on the bounding capabilities).
type seccompCache struct {
	mu    sync.Mutex
	key   []byte            // scratch for profileKey, under mu
	progs map[string][]byte // profileKey -> encoded program; nil: not compilable
}

func (c *seccompCache) get(p *specs.LinuxSeccomp) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.key = profileKey(c.key[:0], p)
	if b, ok := c.progs[string(c.key)]; ok {
		if b == nil {
			return nil, seccompbpf.ErrUnsupported
		}
		return b, nil
	}
	prog, err := seccompbpf.Compile(p)
	if err != nil && !errors.Is(err, seccompbpf.ErrUnsupported) {
		return nil, err
	}
	if c.progs == nil {
		c.progs = map[string][]byte{}
	}
	var b []byte
	if err == nil {
		b = prog.Encode()
	}
	c.progs[string(c.key)] = b
	return b, err
}

// profileKey appends to b an encoding of the whole profile p that is
// injective (every field; strings and lists length-prefixed, pointers with
// a presence byte): two profiles that differ in anything have different
// keys, so they never share a program. It replaces json.Marshal (~22 µs a
// start for the default profile; TestSeccompKeyCoversProfile fails if the
// spec types gain a field this does not encode).
func profileKey(b []byte, p *specs.LinuxSeccomp) []byte {
	if p == nil {
		return append(b, 0)
	}
	b = append(b, 1)
	b = keyString(b, string(p.DefaultAction))
	b = keyUintPtr(b, p.DefaultErrnoRet)
	b = binary.AppendUvarint(b, uint64(len(p.Architectures)))
	for _, a := range p.Architectures {
		b = keyString(b, string(a))
	}
	b = binary.AppendUvarint(b, uint64(len(p.Flags)))
	for _, f := range p.Flags {
		b = keyString(b, string(f))
	}
	b = keyString(b, p.ListenerPath)
	b = keyString(b, p.ListenerMetadata)
	b = binary.AppendUvarint(b, uint64(len(p.Syscalls)))
	for i := range p.Syscalls {
		sc := &p.Syscalls[i]
		b = binary.AppendUvarint(b, uint64(len(sc.Names)))
		for _, n := range sc.Names {
			b = keyString(b, n)
		}
		b = keyString(b, string(sc.Action))
		b = keyUintPtr(b, sc.ErrnoRet)
		b = binary.AppendUvarint(b, uint64(len(sc.Args)))
		for _, a := range sc.Args {
			b = binary.AppendUvarint(b, uint64(a.Index))
			b = binary.AppendUvarint(b, a.Value)
			b = binary.AppendUvarint(b, a.ValueTwo)
			b = keyString(b, string(a.Op))
		}
	}
	return b
}

func keyString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func keyUintPtr(b []byte, u *uint) []byte {
	if u == nil {
		return append(b, 0)
	}
	return binary.AppendUvarint(append(b, 1), uint64(*u))
}

// takeSeccomp moves spec's seccomp profile out of the spec into a compiled
// program for init: it returns the program as a sealed memfd (to pass as
// init's fd number fd) and adds --seccomp-fd to init's arguments; nil if the
// profile stays in the spec (runsc, Config.Seccomp SeccompRunc, no profile,
// no no_new_privs, or a profile the compiler does not reproduce).
func (r *Runtime) takeSeccomp(spec *specs.Spec, fd int) (*os.File, error) {
	if r.cfg.Runtime != RuntimeRunc || r.cfg.Seccomp != SeccompInit || spec.Linux == nil || spec.Linux.Seccomp == nil {
		return nil, nil
	}
	// Without no_new_privs init (no CAP_SYS_ADMIN) cannot load a filter;
	// runc loads it before dropping capabilities.
	if spec.Process == nil || !spec.Process.NoNewPrivileges || len(spec.Process.Args) == 0 {
		return nil, nil
	}
	prog, err := r.seccomp.get(spec.Linux.Seccomp)
	if errors.Is(err, seccompbpf.ErrUnsupported) {
		r.log.Warn("seccomp profile left to runc", "err", err)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("compile seccomp profile: %w", err)
	}
	mfd, err := unix.MemfdCreate("chalk-seccomp", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("seccomp program: %w", err)
	}
	f := os.NewFile(uintptr(mfd), "seccomp")
	if _, err := f.Write(prog); err != nil {
		f.Close()
		return nil, fmt.Errorf("seccomp program: %w", err)
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE); err != nil {
		f.Close()
		return nil, fmt.Errorf("seal seccomp program: %w", err)
	}
	// First among init's flags: init loads it before it parses the others.
	a := spec.Process.Args
	spec.Process.Args = append([]string{a[0], "--seccomp-fd", strconv.Itoa(fd)}, a[1:]...)
	spec.Linux.Seccomp = nil
	return f, nil
}

// checkFiltered fails unless process pid runs under a seccomp filter
// (/proc/PID/status: "Seccomp: 2", at least one filter).
func checkFiltered(pid int) error {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return fmt.Errorf("check init's seccomp filter: %w", err)
	}
	mode, filters := "", -1
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		switch k {
		case "Seccomp":
			mode = strings.TrimSpace(v)
		case "Seccomp_filters":
			filters, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	if mode != "2" || filters < 1 {
		return fmt.Errorf("init (pid %d) is not under its seccomp filter (Seccomp %q, %d filters): sandbox refused", pid, mode, filters)
	}
	return nil
}
