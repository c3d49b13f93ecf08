package chalkcompute

import (
	"context"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// MCPServer is an upstream MCP server registered with the gateway.
// Sandboxes reach it at GatewayURL (http://169.254.169.254/mcp/<name>)
// with their workload identity token for that audience; the gateway adds
// Credential, which is write-only: the API never returns it.
type MCPServer struct {
	Name string
	URL  string // the upstream's Streamable HTTP endpoint
	// HeaderName is the header the credential goes in; "" sends
	// "Authorization: Bearer <Credential>".
	HeaderName string
	Credential string
	// Allowlists; empty allows everything. An entry ending in '*' matches by prefix.
	AllowedTools, AllowedResources, AllowedPrompts []string
	// SandboxLabels restricts the server to sandboxes carrying all of them.
	SandboxLabels map[string]string
	// RatePerSecond is the per-sandbox call rate (0: 50/s, burst 100).
	RatePerSecond float64

	// Output only.
	HasCredential bool
	GatewayURL    string
	CreatedAt     time.Time
	CreatedBy     string
}

// MCPAuditRecord is one call through the gateway.
type MCPAuditRecord struct {
	Seq                        int64
	At                         time.Time
	SandboxID, Subject, Server string
	HTTPMethod, Method, Tool   string
	ArgsSHA256, Decision       string
	Status                     int
	LatencyMS                  float64
	BytesIn, BytesOut          int64
}

// MCPAuditQuery selects audit records (zero values: any).
type MCPAuditQuery struct {
	SandboxID, Server string
	Since             time.Time
	Limit             int // default 100, max 10000
}

func mcpFrom(m *v1.McpServer) MCPServer {
	t, _ := time.Parse(time.RFC3339Nano, m.CreatedAt)
	return MCPServer{
		Name: m.Name, URL: m.Url, HeaderName: m.HeaderName, AllowedTools: m.AllowedTools, AllowedResources: m.AllowedResources,
		AllowedPrompts: m.AllowedPrompts, SandboxLabels: m.SandboxLabels, RatePerSecond: m.RatePerSecond,
		HasCredential: m.HasCredential, GatewayURL: m.GatewayUrl, CreatedAt: t, CreatedBy: m.CreatedBy,
	}
}

// AddMCPServer registers an upstream MCP server (replacing one of the same
// name). It needs an admin token.
func (c *Client) AddMCPServer(ctx context.Context, s MCPServer) (MCPServer, error) {
	resp, err := c.mcp.AddServer(ctx, connect.NewRequest(&v1.McpServer{
		Name: s.Name, Url: s.URL, HeaderName: s.HeaderName, Credential: s.Credential,
		AllowedTools: s.AllowedTools, AllowedResources: s.AllowedResources, AllowedPrompts: s.AllowedPrompts,
		SandboxLabels: s.SandboxLabels, RatePerSecond: s.RatePerSecond,
	}))
	if err != nil {
		return MCPServer{}, err
	}
	return mcpFrom(resp.Msg), nil
}

// MCPServers lists the org's MCP servers (without credentials).
func (c *Client) MCPServers(ctx context.Context) ([]MCPServer, error) {
	resp, err := c.mcp.ListServers(ctx, connect.NewRequest(&v1.ListMcpServersRequest{}))
	if err != nil {
		return nil, err
	}
	var out []MCPServer
	for _, m := range resp.Msg.Servers {
		out = append(out, mcpFrom(m))
	}
	return out, nil
}

// RemoveMCPServer unregisters a server; sandboxes lose access at once.
func (c *Client) RemoveMCPServer(ctx context.Context, name string) error {
	_, err := c.mcp.RemoveServer(ctx, connect.NewRequest(&v1.McpServerName{Name: name}))
	return err
}

// MCPAudit returns gateway calls, newest first (admin).
func (c *Client) MCPAudit(ctx context.Context, q MCPAuditQuery) ([]MCPAuditRecord, error) {
	req := &v1.McpAuditRequest{SandboxId: q.SandboxID, Server: q.Server, Limit: int32(q.Limit)}
	if !q.Since.IsZero() {
		req.Since = q.Since.UTC().Format(time.RFC3339Nano)
	}
	resp, err := c.mcp.Audit(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, err
	}
	var out []MCPAuditRecord
	for _, r := range resp.Msg.Records {
		at, _ := time.Parse(time.RFC3339Nano, r.At)
		out = append(out, MCPAuditRecord{
			Seq: r.Seq, At: at, SandboxID: r.SandboxId, Subject: r.Sub, Server: r.Server, HTTPMethod: r.HttpMethod,
			Method: r.Method, Tool: r.Tool, ArgsSHA256: r.ArgsSha256, Decision: r.Decision, Status: int(r.Status),
			LatencyMS: r.LatencyMs, BytesIn: r.BytesIn, BytesOut: r.BytesOut,
		})
	}
	return out, nil
}
