package seccompbpf

import (
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// asm assembles classic BPF with forward jumps to named labels. A
// conditional jump's target is a label, "" (the next instruction) or "+1"
// (skip one); targets more than 255 instructions away are an error, so the
// compiler only jumps far with jmp.
type asm struct {
	ins    []unix.SockFilter
	jt, jf []string // per instruction: label targets ("" none)
	labels map[string]int
}

func (a *asm) emit(code uint16, k uint32, jt, jf string) {
	a.ins = append(a.ins, unix.SockFilter{Code: code, K: k})
	a.jt = append(a.jt, jt)
	a.jf = append(a.jf, jf)
}

func (a *asm) label(name string) {
	if a.labels == nil {
		a.labels = map[string]int{}
	}
	if _, dup := a.labels[name]; dup {
		panic("seccompbpf: duplicate label " + name)
	}
	a.labels[name] = len(a.ins)
}

func (a *asm) ld(off uint32) { a.emit(unix.BPF_LD|unix.BPF_W|unix.BPF_ABS, off, "", "") }
func (a *asm) and(k uint32)  { a.emit(unix.BPF_ALU|unix.BPF_AND|unix.BPF_K, k, "", "") }
func (a *asm) ret(k uint32)  { a.emit(unix.BPF_RET|unix.BPF_K, k, "", "") }
func (a *asm) jmp(to string) { a.emit(unix.BPF_JMP|unix.BPF_JA, 0, to, "") }
func (a *asm) jeq(k uint32, jt, jf string) {
	a.emit(unix.BPF_JMP|unix.BPF_JEQ|unix.BPF_K, k, jt, jf)
}
func (a *asm) jgt(k uint32, jt, jf string) {
	a.emit(unix.BPF_JMP|unix.BPF_JGT|unix.BPF_K, k, jt, jf)
}
func (a *asm) jge(k uint32, jt, jf string) {
	a.emit(unix.BPF_JMP|unix.BPF_JGE|unix.BPF_K, k, jt, jf)
}
func (a *asm) jset(k uint32, jt, jf string) {
	a.emit(unix.BPF_JMP|unix.BPF_JSET|unix.BPF_K, k, jt, jf)
}

// cond emits the test of one argument condition: it jumps to fail when the
// condition does not hold and falls through (to label pass, placed after
// it) when it does. The 64-bit argument is compared as two 32-bit halves,
// high half first; seccomp_data's args are in host byte order (little
// endian on amd64: the low half first).
func (a *asm) cond(c specs.LinuxSeccompArg, fail, pass string) {
	lo, hi := offArgs+8*uint32(c.Index), offArgs+8*uint32(c.Index)+4
	vl, vh := uint32(c.Value), uint32(c.Value>>32)
	switch c.Op {
	case specs.OpEqualTo:
		a.ld(hi)
		a.jeq(vh, "", fail)
		a.ld(lo)
		a.jeq(vl, "", fail)
	case specs.OpNotEqual:
		a.ld(hi)
		a.jeq(vh, "", pass)
		a.ld(lo)
		a.jeq(vl, fail, "")
	case specs.OpMaskedEqual: // (arg & Value) == ValueTwo
		wl, wh := uint32(c.ValueTwo), uint32(c.ValueTwo>>32)
		a.ld(hi)
		a.and(vh)
		a.jeq(wh, "", fail)
		a.ld(lo)
		a.and(vl)
		a.jeq(wl, "", fail)
	case specs.OpLessThan, specs.OpLessEqual: // hi < vh, or hi == vh and lo < (<=) vl
		a.ld(hi)
		a.jgt(vh, fail, "")
		a.jeq(vh, "", pass)
		a.ld(lo)
		if c.Op == specs.OpLessThan {
			a.jge(vl, fail, "")
		} else {
			a.jgt(vl, fail, "")
		}
	case specs.OpGreaterThan, specs.OpGreaterEqual: // hi > vh, or hi == vh and lo > (>=) vl
		a.ld(hi)
		a.jgt(vh, pass, "")
		a.jeq(vh, "", fail)
		a.ld(lo)
		if c.Op == specs.OpGreaterThan {
			a.jgt(vl, "", fail)
		} else {
			a.jge(vl, "", fail)
		}
	default:
		panic("seccompbpf: operator " + string(c.Op)) // compile checked it
	}
	a.label(pass)
}

func (a *asm) assemble() (Program, error) {
	if len(a.ins) > unix.BPF_MAXINSNS {
		return nil, fmt.Errorf("seccomp program of %d instructions (at most %d)", len(a.ins), unix.BPF_MAXINSNS)
	}
	off := func(i int, to string) (int, error) {
		switch to {
		case "":
			return 0, nil
		case "+1":
			return 1, nil
		}
		t, ok := a.labels[to]
		if !ok {
			return 0, fmt.Errorf("seccompbpf: no label %q", to)
		}
		if t <= i || t > len(a.ins)-1 {
			return 0, fmt.Errorf("seccompbpf: label %q (%d) is not ahead of %d", to, t, i)
		}
		return t - i - 1, nil
	}
	p := make(Program, len(a.ins))
	copy(p, a.ins)
	for i := range p {
		jt, err := off(i, a.jt[i])
		if err != nil {
			return nil, err
		}
		jf, err := off(i, a.jf[i])
		if err != nil {
			return nil, err
		}
		if p[i].Code == unix.BPF_JMP|unix.BPF_JA {
			p[i].K = uint32(jt)
			continue
		}
		if jt > 255 || jf > 255 {
			return nil, fmt.Errorf("seccompbpf: conditional jump of %d/%d at %d", jt, jf, i)
		}
		p[i].Jt, p[i].Jf = uint8(jt), uint8(jf)
	}
	if last := p[len(p)-1]; last.Code != unix.BPF_RET|unix.BPF_K {
		return nil, fmt.Errorf("seccompbpf: program does not end with a return")
	}
	return p, nil
}
