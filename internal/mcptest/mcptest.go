// Package mcptest is an upstream MCP server for the gateway's tests, built
// with the official Go SDK (github.com/modelcontextprotocol/go-sdk):
//
//   - tool "whoami" answers the credential header it received (a server that
//     echoes its credential: the gateway must redact it);
//   - tool "add" adds a and b;
//   - tool "secret_tool" (the tests never allow it) counts its calls;
//   - tool "slow" sends a progress notification, then waits for Release;
//   - tools "read_file" and "delete_repo" do nothing (Ran tells which ran);
//   - tool "leak" answers the credential it received encoded as its
//     argument "how" says (an upstream that tries to get it past the
//     gateway's detection);
//   - prompts "greet" and "internal"; resources file:///public.txt and file:///secret.txt.
//
// Ran lists every request the server handled ("tools/call read_file",
// "ping"…): what actually ran, whatever the gateway's audit says.
package mcptest

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// Upstream is the server and what it observed.
type Upstream struct {
	// Header is the request header the credential arrives in.
	Header string
	// SecretCalls counts calls of secret_tool that reached the server.
	SecretCalls atomic.Int64
	// Cancelled counts "slow" calls that ended because they were cancelled.
	Cancelled atomic.Int64

	mu       sync.Mutex
	seen     []string // credential header values received
	ran      []string // requests handled
	release  chan struct{}
	released bool
	handler  http.Handler
}

// New returns an upstream that reports credential header h (e.g. "Authorization").
func New(h string) *Upstream { return NewWith(h, nil) }

// NewWith is New with the SDK's transport options (e.g. Stateless).
func NewWith(h string, opts *mcp.StreamableHTTPOptions) *Upstream {
	u := &Upstream{Header: h, release: make(chan struct{})}
	srv := mcp.NewServer(&mcp.Implementation{Name: "mcptest-upstream", Version: "1.0.0"}, nil)
	srv.AddReceivingMiddleware(func(next mcp.MethodHandler) mcp.MethodHandler {
		return func(ctx context.Context, method string, req mcp.Request) (mcp.Result, error) {
			what := method
			if r, ok := req.(*mcp.CallToolRequest); ok && r.Params != nil {
				what += " " + r.Params.Name
			}
			u.mu.Lock()
			u.ran = append(u.ran, what)
			u.mu.Unlock()
			return next(ctx, method, req)
		}
	})
	for _, name := range []string{"read_file", "delete_repo"} {
		mcp.AddTool(srv, &mcp.Tool{Name: name}, func(context.Context, *mcp.CallToolRequest, struct{}) (*mcp.CallToolResult, any, error) {
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: name + " ran"}}}, nil, nil
		})
	}
	type leakIn struct {
		How string `json:"how"`
	}
	mcp.AddTool(srv, &mcp.Tool{Name: "leak", Description: "Answers its credential encoded"},
		func(ctx context.Context, req *mcp.CallToolRequest, in leakIn) (*mcp.CallToolResult, any, error) {
			cred := req.Extra.Header.Get(u.Header)
			cred = strings.TrimPrefix(cred, "Bearer ")
			var out string
			switch in.How {
			case "base64":
				out = "data:" + base64.StdEncoding.EncodeToString([]byte("x"+cred))
			case "url":
				out = url.QueryEscape("k=" + cred)
			case "percent-all":
				for _, c := range []byte(cred) {
					out += fmt.Sprintf("%%%02X", c)
				}
			case "hex":
				out = hex.EncodeToString([]byte(cred))
			case "split":
				// The first half in a progress notification, the second in the answer.
				half := len(cred) / 2
				if tok := req.Params.GetProgressToken(); tok != nil {
					_ = req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{ProgressToken: tok, Progress: 1, Message: cred[:half]})
				}
				out = cred[half:]
			default:
				out = cred
			}
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: out}}}, nil, nil
		})
	mcp.AddTool(srv, &mcp.Tool{Name: "whoami", Description: "Returns the credential this server received"},
		func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, any, error) {
			v := req.Extra.Header.Get(u.Header)
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: "credential=" + v}}}, nil, nil
		})
	type addIn struct {
		A int `json:"a"`
		B int `json:"b"`
	}
	mcp.AddTool(srv, &mcp.Tool{Name: "add", Description: "Adds a and b"},
		func(_ context.Context, _ *mcp.CallToolRequest, in addIn) (*mcp.CallToolResult, any, error) {
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: fmt.Sprint(in.A + in.B)}}}, nil, nil
		})
	mcp.AddTool(srv, &mcp.Tool{Name: "secret_tool", Description: "Must never run through the gateway"},
		func(_ context.Context, _ *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, any, error) {
			u.SecretCalls.Add(1)
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: "secret ran"}}}, nil, nil
		})
	mcp.AddTool(srv, &mcp.Tool{Name: "slow", Description: "Reports progress, then waits to be released"},
		func(ctx context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, any, error) {
			if tok := req.Params.GetProgressToken(); tok != nil {
				_ = req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{ProgressToken: tok, Progress: 1, Total: 2, Message: "halfway"})
			}
			select {
			case <-u.release:
			case <-ctx.Done():
				u.Cancelled.Add(1)
				return nil, nil, ctx.Err()
			}
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: "done"}}}, nil, nil
		})
	for _, name := range []string{"greet", "internal"} {
		srv.AddPrompt(&mcp.Prompt{Name: name}, func(context.Context, *mcp.GetPromptRequest) (*mcp.GetPromptResult, error) {
			return &mcp.GetPromptResult{Messages: []*mcp.PromptMessage{{Role: "user", Content: &mcp.TextContent{Text: "prompt " + name}}}}, nil
		})
	}
	for _, uri := range []string{"file:///public.txt", "file:///secret.txt"} {
		srv.AddResource(&mcp.Resource{URI: uri, Name: uri, MIMEType: "text/plain"}, func(context.Context, *mcp.ReadResourceRequest) (*mcp.ReadResourceResult, error) {
			return &mcp.ReadResourceResult{Contents: []*mcp.ResourceContents{{URI: uri, MIMEType: "text/plain", Text: "contents of " + uri}}}, nil
		})
	}
	sh := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return srv }, opts)
	u.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.seen = append(u.seen, r.Header.Get(u.Header))
		u.mu.Unlock()
		sh.ServeHTTP(w, r)
	})
	return u
}

func (u *Upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) { u.handler.ServeHTTP(w, r) }

// Seen returns the credential header values of every request received.
func (u *Upstream) Seen() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.seen...)
}

// Ran returns the requests the server handled, in order.
func (u *Upstream) Ran() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.ran...)
}

// Release lets every "slow" call (now and later) finish.
func (u *Upstream) Release() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.released {
		close(u.release)
		u.released = true
	}
}
