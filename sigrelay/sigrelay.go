// Package sigrelay delivers signals to a process's code like os/signal's
// Notify, without the OS thread os/signal keeps blocked for it.
//
// os/signal's receiver is a goroutine that waits for the runtime's signal
// handler in a blocking sleep: one OS thread of the process, for good, and
// with it ~40 KiB of every idle sandbox whose init is a Go program
// (docs/ARCHITECTURE.md, "Where the time and memory go", round 7). Here a
// handler of a few instructions, installed with rt_sigaction in place of the
// Go runtime's own for the signals relayed, writes the signal's number to a
// non-blocking pipe (a self-pipe), at most one byte per signal pending; a
// goroutine reads the pipe through the runtime's netpoller, which needs no
// thread of its own, and calls the functions registered for the signal.
// Like os/signal, signals of one kind that arrive before the first is read
// coalesce into one.
//
// Only where the handler is written (linux/amd64); elsewhere Notify uses
// os/signal. A signal relayed here must not also be passed to os/signal
// (its Notify would put the runtime's handler back).
package sigrelay

import (
	"fmt"
	"os"
	"sync"
	"syscall"
)

// Notify calls fn, on the relay's goroutine, for every arrival of each of
// sigs (arrivals that come before the relay has read the first coalesce).
// fn must not block for long: it delays every signal after it. An error
// names the signal that could not be relayed; those before it in sigs are.
func Notify(fn func(syscall.Signal), sigs ...syscall.Signal) error {
	mu.Lock()
	defer mu.Unlock()
	for _, s := range sigs {
		if s <= 0 || int(s) >= len(handlers) {
			return fmt.Errorf("relay signal %d: %w", int(s), syscall.EINVAL)
		}
	}
	if err := startLocked(); err != nil {
		return fmt.Errorf("relay signals: %w", err)
	}
	for _, s := range sigs {
		first := len(handlers[s]) == 0
		handlers[s] = append(handlers[s], fn)
		if first {
			if err := install(s); err != nil {
				handlers[s] = handlers[s][:len(handlers[s])-1]
				return fmt.Errorf("relay %v: %w", s, err)
			}
		}
	}
	return nil
}

// NotifyChan is Notify sending each signal to c, without blocking (a signal
// is dropped when c is full), as os/signal.Notify does.
func NotifyChan(c chan<- os.Signal, sigs ...syscall.Signal) error {
	return Notify(func(s syscall.Signal) {
		select {
		case c <- s:
		default:
		}
	}, sigs...)
}

var (
	mu       sync.Mutex
	handlers [65][]func(syscall.Signal)
)

// dispatch calls the functions registered for s.
func dispatch(s syscall.Signal) {
	mu.Lock()
	fns := handlers[s]
	mu.Unlock()
	for _, fn := range fns {
		fn(s)
	}
}
