package main

import (
	"context"
	"fmt"
	"time"

	"github.com/creack/pty"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

// chunkWriter hands every output chunk to a channel.
type chunkWriter chan []byte

func (w chunkWriter) Write(b []byte) (int, error) {
	w <- append([]byte(nil), b...)
	return len(b), nil
}

// terminalBench measures a keystroke's echo round trip through a sandbox's
// terminal (SDK WriteStdin → chalkd → init → the terminal's line discipline
// echoes → output event), as `chalk compute sandbox shell` and the web
// console see it, beside the same echo on a terminal of this process, the
// physical limit.
func terminalBench(ctx context.Context, c *chalkcompute.Client, n int) {
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithTimeout(30*time.Minute))
	if err != nil {
		fail(err)
	}
	defer sb.Terminate(ctx)
	out := make(chunkWriter, 16)
	p, err := sb.Start(ctx, []string{"cat"}, chalkcompute.ExecPTY(24, 80), chalkcompute.ExecStdin(), chalkcompute.Stdout(out))
	if err != nil {
		fail(err)
	}
	defer func() { _ = p.Signal(ctx, "KILL"); _, _ = p.Wait() }()
	key := []byte{'x'}
	remote := measure(n*10, func() error {
		if _, err := p.Stdin().Write(key); err != nil {
			return err
		}
		if got := <-out; string(got) != "x" {
			return fmt.Errorf("echo %q", got)
		}
		return nil
	}, true)

	master, tty, err := pty.Open()
	if err != nil {
		fail(err)
	}
	defer master.Close()
	defer tty.Close()
	buf := make([]byte, 16)
	local := measure(n*10, func() error {
		if _, err := master.Write(key); err != nil {
			return err
		}
		if k, err := master.Read(buf); err != nil || string(buf[:k]) != "x" {
			return fmt.Errorf("echo %q %v", buf[:k], err)
		}
		return nil
	}, true)
	fmt.Println("keystroke echo round trip through a terminal")
	fmt.Printf("  %-25s median %9s  p90 %9s  ratio vs local pty %.1fx\n", "sandbox terminal (SDK)", median(remote).Round(time.Microsecond), p90(remote).Round(time.Microsecond), float64(median(remote))/float64(median(local)))
	fmt.Printf("  %-25s median %9s  p90 %9s  ratio vs local pty %.1fx\n", "local pty (floor)", median(local).Round(time.Microsecond), p90(local).Round(time.Microsecond), 1.0)
	fmt.Printf("goal: median <= 5ms (typing feels instant below ~10ms): %s\n\n", verdict(median(remote) <= 5*time.Millisecond))
}
