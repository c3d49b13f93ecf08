package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// lockedBuffer is an io.Writer read while a process still writes to it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor polls cond (another process's output) until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond) // polling output produced by a sandbox on the node
	}
}

// TestFleetStreams: the node API's streaming paths end to end through a
// control plane and a node, as a user sees them from the SDK: stdin
// (written in pieces, then EOF), signals, a terminal and its resize, an exec
// timeout, followed logs, and a sandbox timeout enforced by the control plane
// for a sandbox that runs on a node. TestFleet covers the plain calls.
func TestFleetStreams(t *testing.T) {
	control := chalktest.StartControl(t)
	chalktest.StartFleetNode(t, control, 1)
	waitNodesHealthy(t, control, "node1")
	c := control.Client()

	sb, err := c.Create(ctxT(t, 2*time.Minute), chalkcompute.Base("busybox"),
		chalkcompute.WithEntrypoint("sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done"))
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	defer sb.Terminate(context.Background())

	t.Run("stdin", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		var out lockedBuffer
		p, err := sb.Start(ctx, []string{"sh", "-c", "wc -c; echo done"}, chalkcompute.ExecStdin(), chalkcompute.Stdout(&out))
		if err != nil {
			t.Fatal(err)
		}
		chunk := bytes.Repeat([]byte("x"), 300<<10)
		for range 4 { // 1.2 MiB in several writes: more than one stdin message
			if _, err := p.Stdin().Write(chunk); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Stdin().Close(); err != nil {
			t.Fatal(err)
		}
		st, err := p.Wait()
		if err != nil || st.Code != 0 || strings.TrimSpace(out.String()) != "1228800\ndone" {
			t.Fatalf("stdin through the node: %+v %v %q", st, err, out.String())
		}
	})

	t.Run("signal", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		var out lockedBuffer
		p, err := sb.Start(ctx, []string{"sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.05; done"}, chalkcompute.Stdout(&out))
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "the trap to be set", func() bool { return strings.Contains(out.String(), "ready") })
		if err := p.Signal(ctx, "TERM"); err != nil {
			t.Fatal(err)
		}
		st, err := p.Wait()
		if err != nil || st.Code != 7 || !strings.Contains(out.String(), "got-term") {
			t.Fatalf("TERM through the node: %+v %v %q", st, err, out.String())
		}

		p, err = sb.Start(ctx, []string{"sleep", "1000"})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Signal(ctx, "KILL"); err != nil {
			t.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Signal != "SIGKILL" {
			t.Fatalf("KILL through the node: %+v %v", st, err)
		}
	})

	t.Run("terminal", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		var out lockedBuffer
		// read blocks until the line is typed, so the resize is in place
		// before stty asks for the size.
		p, err := sb.Start(ctx, []string{"sh", "-c", "stty size; read x; stty size; [ -t 0 ] && echo is-a-tty"},
			chalkcompute.ExecPTY(24, 80), chalkcompute.ExecStdin(), chalkcompute.Stdout(&out))
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, 30*time.Second, "the first size", func() bool { return strings.Contains(out.String(), "24 80") })
		if err := p.Resize(ctx, 30, 100); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Stdin().Write([]byte("go\n")); err != nil {
			t.Fatal(err)
		}
		st, err := p.Wait()
		if err != nil || st.Code != 0 || !strings.Contains(out.String(), "30 100") || !strings.Contains(out.String(), "is-a-tty") {
			t.Fatalf("terminal through the node: %+v %v %q", st, err, out.String())
		}
	})

	t.Run("exec-timeout", func(t *testing.T) {
		res, err := sb.Exec(ctxT(t, time.Minute), []string{"sleep", "1000"}, chalkcompute.ExecTimeout(time.Second))
		if err != nil || !res.TimedOut {
			t.Fatalf("exec timeout through the node: %+v %v", res, err)
		}
	})

	t.Run("logs-follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(ctxT(t, time.Minute))
		defer cancel()
		var out lockedBuffer
		done := make(chan error, 1)
		go func() { done <- sb.Logs(ctx, &out, true) }()
		// Lines written after the call began arrive while it follows: the
		// entrypoint counts on, so a tick beyond the first ones seen proves it.
		waitFor(t, 30*time.Second, "the first ticks", func() bool { return strings.Contains(out.String(), "tick-2\n") })
		first := strings.Count(out.String(), "tick-")
		waitFor(t, 30*time.Second, "ticks that came while following", func() bool {
			return strings.Count(out.String(), "tick-") >= first+3
		})
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) && !strings.Contains(err.Error(), "canceled") {
			t.Fatalf("logs follow: %v", err)
		}
	})

	t.Run("sandbox-timeout", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		short, err := c.Create(ctx, chalkcompute.Base("busybox"),
			chalkcompute.WithEntrypoint("sleep", "1000"), chalkcompute.WithTimeout(2*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		info, err := short.Wait(ctx)
		if err != nil || info.State != "stopped" || info.EndReason != "timeout" {
			t.Fatalf("sandbox timeout on a node: %+v %v", info, err)
		}
	})
}
