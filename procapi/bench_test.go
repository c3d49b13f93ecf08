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

// BenchmarkForkExecTrue is the floor under BenchmarkExecTrue: starting and
// reaping /bin/true directly.
func BenchmarkForkExecTrue(b *testing.B) {
	r := StartReaper()
	for b.Loop() {
		p, ch, err := r.Start("/bin/true", []string{"true"}, &os.ProcAttr{})
		if err != nil {
			b.Fatal(err)
		}
		p.Release()
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
