//go:build !(linux && amd64)

package sigrelay

import (
	"os"
	"os/signal"
	"syscall"
)

func startLocked() error { return nil }

// install passes s to os/signal, whose goroutine dispatches it.
func install(s syscall.Signal) error {
	c := make(chan os.Signal, 1)
	signal.Notify(c, s)
	go func() {
		for range c {
			dispatch(s)
		}
	}()
	return nil
}
