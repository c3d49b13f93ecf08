package procapi

import (
	"context"
	"io"
	"os"
	"testing"
)

// BenchmarkExecTrue is the round trip of an exec of `true` through the API:
// dial, start, exit status. Compare with BenchmarkForkExecTrue, the cost of
// fork/exec/reap alone on the same machine; the target is ≤ 2 ms.
func BenchmarkExecTrue(b *testing.B) {
	c := serve(b, ServerOptions{})
	ctx := context.Background()
	for b.Loop() {
		p, err := c.Exec(ctx, ExecRequest{Argv: []string{"/bin/true"}}, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
	}
}

// BenchmarkExecTruePooled is BenchmarkExecTrue on a pooled client: the
// execs share one connection (no dial, no accept).
func BenchmarkExecTruePooled(b *testing.B) {
	c := serve(b, ServerOptions{}).Pooled(2)
	defer c.Close()
	ctx := context.Background()
	for b.Loop() {
		p, err := c.Exec(ctx, ExecRequest{Argv: []string{"/bin/true"}}, nil, nil)
		if err != nil {
			b.Fatal(err)
		}
		if st, err := p.Wait(); err != nil || st.Code != 0 {
			b.Fatal(st, err)
		}
	}
}

// BenchmarkForkExecTrue is the floor under BenchmarkExecTrue: starting and
// reaping /bin/true directly.
func BenchmarkForkExecTrue(b *testing.B) {
	r := StartReaper()
	for b.Loop() {
		_, ch, err := r.Start("/bin/true", []string{"true"}, &os.ProcAttr{})
		if err != nil {
			b.Fatal(err)
		}
		if ws := <-ch; ws.ExitStatus() != 0 {
			b.Fatal(ws)
		}
	}
}

// BenchmarkPing is the protocol's fixed cost: a connection and two frames.
func BenchmarkPing(b *testing.B) {
	c := serve(b, ServerOptions{})
	ctx := context.Background()
	for b.Loop() {
		if err := c.Ping(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOutput measures streaming throughput (reported as MB/s).
func BenchmarkOutput(b *testing.B) {
	c := serve(b, ServerOptions{})
	ctx := context.Background()
	const size = 64 << 20
	b.SetBytes(size)
	for b.Loop() {
		p, err := c.Exec(ctx, ExecRequest{Argv: []string{"head", "-c", "67108864", "/dev/zero"}}, io.Discard, nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Wait(); err != nil {
			b.Fatal(err)
		}
	}
}

// chanWriter hands every output chunk to a channel.
type chanWriter chan []byte

func (w chanWriter) Write(b []byte) (int, error) {
	w <- append([]byte(nil), b...)
	return len(b), nil
}

// BenchmarkPTYEcho is a keystroke's echo round trip through a terminal of
// an exec: the byte goes to init in a stdin frame, into the terminal, whose
// line discipline echoes it, and back in an output frame. Compare with
// BenchmarkLocalPTYEcho, the same echo on a terminal of this process: the
// physical limit.
func BenchmarkPTYEcho(b *testing.B) {
	c := serve(b, ServerOptions{})
	ctx := context.Background()
	out := make(chanWriter, 16)
	p, err := c.Exec(ctx, ExecRequest{Argv: []string{"cat"}, Stdin: true, PTY: &PTY{}}, out, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { p.Signal(9); p.Wait() }()
	key := []byte{'x'}
	for b.Loop() {
		if _, err := p.Stdin().Write(key); err != nil {
			b.Fatal(err)
		}
		if got := <-out; len(got) != 1 || got[0] != 'x' {
			b.Fatalf("echo %q", got)
		}
	}
}

// BenchmarkLocalPTYEcho is the floor under BenchmarkPTYEcho: a byte written
// to a terminal's master and its echo read back, in this process.
func BenchmarkLocalPTYEcho(b *testing.B) {
	master, tty, err := openPTY()
	if err != nil {
		b.Fatal(err)
	}
	defer master.Close()
	defer tty.Close()
	key, buf := []byte{'x'}, make([]byte, 16)
	for b.Loop() {
		if _, err := master.Write(key); err != nil {
			b.Fatal(err)
		}
		if n, err := master.Read(buf); err != nil || n != 1 || buf[0] != 'x' {
			b.Fatalf("echo %q %v", buf[:n], err)
		}
	}
}
