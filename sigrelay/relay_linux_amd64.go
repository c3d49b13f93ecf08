package sigrelay

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read by the handler (relay_linux_amd64.s): pending[s] is 1 while the
// pipe holds a byte for signal s that the relay has not taken yet; pipeW
// is the pipe's write end; ownPid is this process's pid (as getpid(2)
// returns it).
var (
	pending [65]uint32
	pipeW   int32 = -1
	ownPid  int32
)

// handler is the signal handler, called by the kernel as
// void handler(int sig) on the thread the signal was delivered to: in this
// process (not a child sharing its memory between fork and exec), if no
// byte for sig is pending it marks one and writes it to pipeW. Two system
// calls (getpid, write) and an exchange: it touches nothing of the Go
// runtime's, so it is safe on any thread at any moment.
func handler()

// restorer is the handler's return path (rt_sigreturn), which amd64's
// rt_sigaction requires.
func restorer()

// handlerAddrs returns the entry addresses of handler and restorer.
func handlerAddrs() (h, r uintptr)

// startLocked makes the pipe and starts the goroutine that reads it; once.
func startLocked() error {
	if pipeW >= 0 {
		return nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return err
	}
	// Non-blocking, so os.NewFile puts it in the netpoller: the relay
	// parks without a thread. The write end never blocks the handler
	// either; at most one byte per signal is in the pipe.
	r := os.NewFile(uintptr(p[0]), "sigrelay")
	atomic.StoreInt32(&ownPid, int32(unix.Getpid()))
	atomic.StoreInt32(&pipeW, int32(p[1]))
	go relay(r)
	return nil
}

// relay reads signal numbers from the pipe and dispatches them. A byte's
// pending mark is cleared before its functions run, so a signal that
// arrives while they run writes a byte again and is seen.
func relay(r *os.File) {
	buf := make([]byte, len(pending))
	for {
		n, err := r.Read(buf)
		if err != nil {
			// The write end is never closed and the runtime retries
			// EINTR and EAGAIN: signals could no longer be seen (a
			// child never reaped, a SIGTERM ignored).
			panic(fmt.Sprintf("sigrelay: read: %v", err))
		}
		for _, b := range buf[:n] {
			if int(b) >= len(pending) {
				continue
			}
			atomic.StoreUint32(&pending[b], 0)
			dispatch(syscall.Signal(b))
		}
	}
}

// sigactiont is the kernel's struct sigaction on amd64.
type sigactiont struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

const (
	saOnstack  = 0x08000000
	saRestart  = 0x10000000
	saRestorer = 0x04000000
)

// install makes handler the handler of s, with the Go runtime's own
// flags: SA_ONSTACK (it runs on the alternate signal stack the runtime
// gives every thread it makes), SA_RESTART, and every signal blocked while
// it runs.
func install(s syscall.Signal) error {
	h, rest := handlerAddrs()
	sa := sigactiont{handler: h, flags: saOnstack | saRestart | saRestorer, restorer: rest, mask: ^uint64(0)}
	_, _, errno := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(s), uintptr(unsafe.Pointer(&sa)), 0, 8, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
