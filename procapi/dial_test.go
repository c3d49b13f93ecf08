package procapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// acceptAll accepts on a socket until the test ends and reads every
// connection to its end; handled gets the bytes each carried.
type acceptAll struct {
	conns   atomic.Int64
	handled chan int64
	done    chan struct{}
}

func listenCounting(t *testing.T, path string) *acceptAll {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	a := &acceptAll{done: make(chan struct{}), handled: make(chan int64, 16)}
	go func() {
		defer close(a.done)
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			a.conns.Add(1)
			n, _ := io.Copy(io.Discard, nc)
			nc.Close()
			a.handled <- n
		}
	}()
	t.Cleanup(func() { l.Close(); <-a.done })
	return a
}

func acceptAny(*unix.Ucred) error { return nil }

// TestDialSocketRefusesWhatASandboxCanPlant: the socket's directory is
// writable by the sandbox; whatever it puts at the socket's name other than
// a socket is refused without being followed or opened.
func TestDialSocketRefusesWhatASandboxCanPlant(t *testing.T) {
	ctx := testCtx(t)
	other := t.TempDir()
	victim := listenCounting(t, filepath.Join(other, "init.sock"))
	cases := []struct {
		name  string
		plant func(path string) error
	}{
		{"symlink to another sandbox's socket", func(p string) error { return os.Symlink(filepath.Join(other, "init.sock"), p) }},
		{"relative symlink", func(p string) error { return os.Symlink("../x/init.sock", p) }},
		{"regular file", func(p string) error { return os.WriteFile(p, []byte("x"), 0o600) }},
		{"fifo (opening it would block)", func(p string) error { return unix.Mkfifo(p, 0o600) }},
		{"directory", func(p string) error { return os.Mkdir(p, 0o700) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := tc.plant(filepath.Join(dir, "init.sock")); err != nil {
				t.Fatal(err)
			}
			nc, err := DialSocket(ctx, dir, "init.sock", acceptAny)
			if err == nil {
				nc.Close()
				t.Fatal("dialled")
			}
			if !errors.Is(err, ErrUntrustedPeer) || !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("got %v, want untrusted and unavailable", err)
			}
		})
	}
	if n := victim.conns.Load(); n != 0 {
		t.Fatalf("the other socket got %d connections", n)
	}
}

// TestDialSocketSymlinkedDir: the directory itself is not followed either
// (its last component; the rest of the path is the host's).
func TestDialSocketSymlinkedDir(t *testing.T) {
	real := t.TempDir()
	listenCounting(t, filepath.Join(real, "init.sock"))
	link := filepath.Join(t.TempDir(), "run")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if nc, err := DialSocket(testCtx(t), link, "init.sock", acceptAny); err == nil {
		nc.Close()
		t.Fatal("dialled through a symlinked directory")
	}
}

// TestDialSocketPeerCheck: the check sees the listener's credentials (this
// process here) and a refused listener gets a connection but not a byte.
func TestDialSocketPeerCheck(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	a := listenCounting(t, filepath.Join(dir, "init.sock"))
	var seen *unix.Ucred
	nc, err := DialSocket(ctx, dir, "init.sock", func(c *unix.Ucred) error { seen = c; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if seen == nil || int(seen.Pid) != os.Getpid() || int(seen.Uid) != os.Geteuid() {
		t.Fatalf("peer credentials %+v; want pid %d uid %d", seen, os.Getpid(), os.Geteuid())
	}
	if _, err := nc.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	if n := <-a.handled; n != 5 {
		t.Fatalf("the accepted connection carried %d bytes, want 5", n)
	}

	_, err = DialSocket(ctx, dir, "init.sock", func(c *unix.Ucred) error {
		return fmt.Errorf("pid %d is not init", c.Pid)
	})
	if !errors.Is(err, ErrUntrustedPeer) || !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("refused peer: %v, want untrusted and unavailable", err)
	}
	if n := <-a.handled; n != 0 {
		t.Fatalf("the refused listener received %d bytes", n)
	}
}

// TestDialSocketNotServing: nothing at the path, or a socket nobody listens
// on, is unavailable but not untrusted (init is still starting).
func TestDialSocketNotServing(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	_, err := DialSocket(ctx, dir, "init.sock", acceptAny)
	if !errors.Is(err, errdefs.ErrUnavailable) || errors.Is(err, ErrUntrustedPeer) {
		t.Fatalf("missing socket: %v", err)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: filepath.Join(dir, "init.sock")}); err != nil {
		t.Fatal(err)
	}
	_, err = DialSocket(ctx, dir, "init.sock", acceptAny)
	if !errors.Is(err, errdefs.ErrUnavailable) || errors.Is(err, ErrUntrustedPeer) {
		t.Fatalf("socket without a listener: %v", err)
	}
	if _, err := DialSocket(ctx, dir, "init.sock", nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("no check: %v", err)
	}
}

// TestWaitReadyStopsAtAnUntrustedSocket: waiting does not help once the
// sandbox has planted something; WaitReady says so at once.
func TestWaitReadyStopsAtAnUntrustedSocket(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink("/nonexistent", filepath.Join(dir, "init.sock")); err != nil {
		t.Fatal(err)
	}
	c := NewClient("test", func(ctx context.Context) (net.Conn, error) {
		return DialSocket(ctx, dir, "init.sock", acceptAny)
	})
	if err := c.WaitReady(testCtx(t)); !errors.Is(err, ErrUntrustedPeer) {
		t.Fatalf("WaitReady: %v, want untrusted", err)
	}
}
