package noderpc

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/metadata"
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

// BenchmarkRelay: an MCP-sized request (a 200-byte JSON body and answer)
// from a node sandbox through its node's relay to the control plane (TLS,
// HTTP/2, the placement check) and, as the peer in the same run, to the
// same handler served directly (what the all-in-one metadata service
// does, without the gateway's own work in either). The difference is what
// a fleet node adds to a gateway call.
func BenchmarkRelay(b *testing.B) {
	c := newControl(b)
	ctx := context.Background()
	a, err := Join(ctx, b.TempDir(), joinReq(c, c.token(b, time.Hour), "a"))
	if err != nil {
		b.Fatal(err)
	}
	answer := []byte(`{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"` + strings.Repeat("x", 140) + `"}]}}`)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(answer)
	})
	c.mux.Handle(RelayPrefix, &Relay{
		Admit:  c.fleet.AdmitCert,
		NodeOf: func(string) string { return a.ID },
		Caller: func(_ context.Context, id string) (metadata.Sandbox, error) {
			return metadata.Sandbox{ID: id, OrgID: "org", Running: true}, nil
		},
		Handler: h,
	})
	rc, err := NewRelayClient(a, c.url, nil)
	if err != nil {
		b.Fatal(err)
	}
	direct := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r.WithContext(metadata.WithCaller(r.Context(), metadata.Sandbox{ID: "sb-a", Running: true})))
	}))
	defer direct.Close()
	relayed := nodeMetadata(b, rc, "sb-a")
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":3}}` + strings.Repeat(" ", 110) + `}`
	var peer float64
	run := func(b *testing.B, base string) {
		defer func() {
			per := float64(b.Elapsed().Nanoseconds()) / float64(b.N)
			if base == direct.URL {
				peer = per
			} else if peer > 0 {
				b.ReportMetric(per/peer, "x-direct")
				b.ReportMetric((per-peer)/1e3, "µs-added/op")
			}
		}()
		for b.Loop() {
			res, err := http.Post(base+"/mcp/tools", "application/json", strings.NewReader(body))
			if err != nil {
				b.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != 200 {
				b.Fatalf("status %d", res.StatusCode)
			}
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, direct.URL) })
	b.Run("relayed", func(b *testing.B) { run(b, relayed) })
}
