package mcpgw

import (
	"context"
	"net/http"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// BenchmarkToolsCall times a tools/call of the official SDK's client
// through the gateway beside the same call straight to the upstream (the
// official SDK's server), in one run: compare the two sub-benchmarks'
// ns/op. chalkbench's MCP rows measure the same from inside a sandbox.
func BenchmarkToolsCall(b *testing.B) {
	f := newFixture(b, "")
	f.servers["tools"].Rate = 1e9
	args := &mcp.CallToolParams{Name: "add", Arguments: map[string]any{"a": 1, "b": 2}}
	run := func(b *testing.B, s *mcp.ClientSession) {
		ctx := context.Background()
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
			if _, err := s.CallTool(ctx, args); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("direct", func(b *testing.B) {
		c := mcp.NewClient(&mcp.Implementation{Name: "bench", Version: "1"}, nil)
		s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: f.servers["tools"].URL, HTTPClient: &http.Client{Transport: upstreamAuth{}}, DisableStandaloneSSE: true}, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		run(b, s)
	})
	b.Run("gateway", func(b *testing.B) {
		run(b, f.connect(b, "sb1", "tools", nil))
	})
}

// upstreamAuth sends the upstream's credential (the direct path).
type upstreamAuth struct{}

func (upstreamAuth) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+secret)
	return http.DefaultTransport.RoundTrip(r)
}
