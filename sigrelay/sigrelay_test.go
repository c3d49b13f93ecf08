package sigrelay

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Registered once per test binary (-count runs TestNotify again).
var (
	notifyOnce sync.Once
	notifyErr  error
	got        = make(chan syscall.Signal, 1)
	ch         = make(chan os.Signal, 1)
)

// TestNotify: every signal sent reaches the function registered for it
// (each waited for before the next is sent, so none coalesce), from
// whichever thread took it.
func TestNotify(t *testing.T) {
	notifyOnce.Do(func() {
		notifyErr = errors.Join(
			Notify(func(s syscall.Signal) { got <- s }, syscall.SIGUSR1),
			NotifyChan(ch, syscall.SIGUSR2))
	})
	if notifyErr != nil {
		t.Fatal(notifyErr)
	}
	// Threads blocked in system calls (a blocking read each, outside the
	// netpoller): the kernel may deliver a signal to any of them.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var b [1]byte
			for {
				if _, err := unix.Read(p[0], b[:]); err != unix.EINTR {
					return
				}
			}
		}()
	}
	defer func() { unix.Close(p[1]); wg.Wait(); unix.Close(p[0]) }()
	for i := range 500 {
		sig := syscall.SIGUSR1
		if i%2 == 1 {
			sig = syscall.SIGUSR2
		}
		if err := unix.Kill(os.Getpid(), sig); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-got:
			if s != syscall.SIGUSR1 || sig != syscall.SIGUSR1 {
				t.Fatalf("signal %d: got %v, sent %v", i, s, sig)
			}
		case s := <-ch:
			if s != syscall.SIGUSR2 || sig != syscall.SIGUSR2 {
				t.Fatalf("signal %d: got %v on the channel, sent %v", i, s, sig)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("signal %d (%v) not relayed", i, sig)
		}
	}
}

// TestNotifyBadSignal: a number outside the signals is refused.
func TestNotifyBadSignal(t *testing.T) {
	for _, s := range []syscall.Signal{0, -1, 65} {
		if err := Notify(func(syscall.Signal) {}, s); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Notify(%d): %v, want EINVAL", s, err)
		}
	}
}
