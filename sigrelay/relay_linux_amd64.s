#include "textflag.h"

// func handler()
// Called by the kernel as void handler(int sig), DI the signal number, on
// the alternate signal stack of the thread the signal was delivered to.
TEXT ·handler(SB),NOSPLIT|NOFRAME,$0-0
	CMPQ	DI, $64
	JA	done
	MOVQ	DI, R12
	// Only in this process: a child between fork and exec that still has
	// this handler (a signal the Go runtime does not reset there) shares
	// the memory but must not relay.
	MOVQ	$39, AX			// SYS_getpid
	SYSCALL
	CMPL	AX, ·ownPid(SB)
	JNE	done
	LEAQ	·pending(SB), AX
	MOVL	$1, CX
	XCHGL	CX, (AX)(R12*4)
	TESTL	CX, CX
	JNZ	done			// a byte for it is in the pipe already
	SUBQ	$16, SP
	MOVQ	R12, 0(SP)		// the byte to write: its low byte, sig
	MOVLQSX	·pipeW(SB), DI
	MOVQ	SP, SI
	MOVQ	$1, DX
	MOVQ	$1, AX			// SYS_write
	SYSCALL
	ADDQ	$16, SP
done:
	RET

// func restorer()
TEXT ·restorer(SB),NOSPLIT|NOFRAME,$0-0
	MOVQ	$15, AX			// SYS_rt_sigreturn
	SYSCALL
	INT	$3

// func handlerAddrs() (h, r uintptr)
TEXT ·handlerAddrs(SB),NOSPLIT,$0-16
	LEAQ	·handler(SB), AX
	MOVQ	AX, h+0(FP)
	LEAQ	·restorer(SB), AX
	MOVQ	AX, r+8(FP)
	RET
