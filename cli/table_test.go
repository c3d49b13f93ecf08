package cli

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
)

// hostileAudit serves MCP audit records whose tool names a sandbox wrote.
type hostileAudit struct {
	computev1connect.UnimplementedMcpServiceHandler
	tool string
}

func (h hostileAudit) Audit(context.Context, *connect.Request[v1.McpAuditRequest]) (*connect.Response[v1.McpAuditResponse], error) {
	return connect.NewResponse(&v1.McpAuditResponse{Records: []*v1.McpAuditRecord{{
		Seq: 1, At: time.Now().UTC().Format(time.RFC3339Nano), SandboxId: "sbx-1", Server: "gh",
		Method: "tools/call", Tool: h.tool, Decision: "allowed", Status: 200,
	}}}), nil
}

// TestTableEscapesSandboxStrings: `chalk compute mcp audit` prints tool
// names a sandbox chose (any JSON string); what a terminal would act on (an
// OSC title, a BEL, CSI sequences, a bidi override, a C1 CSI) or
// what breaks the columns (tab, newline) is printed escaped, so a sandbox
// cannot write to its admin's terminal. Text mode only: -o json quotes it.
func TestTableEscapesSandboxStrings(t *testing.T) {
	tool := "\x1b]0;owned\x07read\tfile\n\x1b[2J\u202eevil\u009b\\ok é"
	mux := http.NewServeMux()
	mux.Handle(computev1connect.NewMcpServiceHandler(hostileAudit{tool: tool}))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	var out, errOut bytes.Buffer
	root := newRoot(strings.NewReader(""), &out, &errOut)
	root.SetArgs([]string{"compute", "mcp", "audit", "--api-url", srv.URL, "--token", "chalk_test"})
	if err := root.Execute(); err != nil {
		t.Fatalf("mcp audit: %v (%s)", err, errOut.String())
	}
	got := out.String()
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines, want a header and one row:\n%s", len(lines), got)
	}
	for _, r := range got {
		if r != '\n' && (r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == '\u202e' || r == '\ufffd') {
			t.Fatalf("control character %U reached the terminal:\n%q", r, got)
		}
	}
	want := `\x1b]0;owned\x07read\x09file\x0a\x1b[2J\u202eevil\u009b\ok é`
	if !strings.Contains(lines[1], want) {
		t.Fatalf("row %q, want the tool as %q", lines[1], want)
	}
}
