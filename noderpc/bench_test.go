package noderpc

import (
	"context"
	"io"
	"testing"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/procapi"
)

// BenchmarkExecRoundTrip: an exec that prints one line, through the node
// API (TLS, HTTP/2, as between chalkd control and chalkd node) and, as the
// peer in the same run, called in process. The difference is the node
// link's cost per exec (the fake process itself costs the same in both).
func BenchmarkExecRoundTrip(b *testing.B) {
	f := newFakeNode()
	f.exec = func(_ *fakeProc, stdout, _ io.Writer) int {
		_, _ = io.WriteString(stdout, "hello\n")
		return 0
	}
	c, _ := serve(b, f)
	var peer float64 // ns per in-process exec, this run
	run := func(b *testing.B, n api.Node) {
		ctx := context.Background()
		defer func() {
			per := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			if n == api.Node(f) {
				peer = per
			} else if peer > 0 {
				b.ReportMetric(per/peer, "x-in-process")
				b.ReportMetric((per-peer)/1e3, "µs-added/op")
			}
		}()
		for b.Loop() {
			p, err := n.Exec(ctx, "sb", procapi.ExecRequest{Argv: []string{"echo"}}, io.Discard, io.Discard)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := p.Wait(); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("in-process", func(b *testing.B) { run(b, f) })
	b.Run("node-api", func(b *testing.B) { run(b, c) })
}
