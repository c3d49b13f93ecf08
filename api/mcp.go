package api

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// MCPBackend is the node side of the MCP gateway.
type MCPBackend interface {
	// Seal encrypts a credential for the server named by aad (org/name).
	Seal(aad string, plaintext []byte) ([]byte, error)
	// CheckURL refuses upstream URLs the gateway would never dial.
	CheckURL(u string) error
	// GatewayURL is the server's URL inside sandboxes (the token audience).
	GatewayURL(name string) string
	// FlushAudit stores the audit records queued so far.
	FlushAudit(ctx context.Context)
	// Invalidate drops any cached copy of the server (it changed).
	Invalidate(orgID, name string)
}

// Limits of a server registration.
const (
	maxMCPCredential = 8 << 10
	maxMCPAllowlist  = 1000
)

// Headers a credential may not be put in: the transport's own.
var reservedHeaders = map[string]bool{
	"host": true, "content-length": true, "content-type": true, "accept": true, "transfer-encoding": true,
	"connection": true, "te": true, "upgrade": true, "cookie": true, "last-event-id": true,
}

type mcpService struct{ s *Server }

var _ computev1connect.McpServiceHandler = (*mcpService)(nil)

func (s *Server) mcp() (MCPBackend, error) {
	if s.cfg.MCP == nil {
		return nil, fmt.Errorf("the MCP gateway is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	return s.cfg.MCP, nil
}

// mcpFor authenticates the caller (with who: user or admin) and returns the
// backend, for the service's handlers.
func (s *Server) mcpFor(ctx context.Context, who func(context.Context) (*Principal, error)) (*Principal, MCPBackend, error) {
	u, err := who(ctx)
	if err != nil {
		return nil, nil, err
	}
	b, err := s.mcp()
	if err != nil {
		return nil, nil, err
	}
	return u, b, nil
}

func admin(ctx context.Context) (*Principal, error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if !u.Admin {
		return nil, fmt.Errorf("user %s is not an admin; registering MCP servers and reading the audit log need an admin token: %w", u.Subject, errdefs.ErrPermissionDenied)
	}
	return u, nil
}

func validHeaderName(h string) error {
	if h == "" {
		return nil
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return invalid("header_name %q: letters, digits, '-' and '_' only", h)
		}
	}
	l := strings.ToLower(h)
	if reservedHeaders[l] || strings.HasPrefix(l, "mcp-") || strings.HasPrefix(l, "x-forwarded") || l == "forwarded" {
		return invalid("header_name %q: the transport uses that header; pick another (e.g. X-Api-Key) or leave it empty for Authorization: Bearer", h)
	}
	return nil
}

func validAllowlist(field string, list []string) error {
	if len(list) > maxMCPAllowlist {
		return invalid("%s: %d entries, at most %d", field, len(list), maxMCPAllowlist)
	}
	for _, e := range list {
		if strings.TrimSpace(e) == "" || e != strings.TrimSpace(e) || strings.ContainsAny(e, "\r\n\x00") {
			return invalid("%s: entry %q: empty or with surrounding spaces or control characters", field, e)
		}
		if i := strings.IndexByte(e, '*'); i >= 0 && i != len(e)-1 {
			return invalid("%s: entry %q: '*' may only end an entry (a prefix match)", field, e)
		}
	}
	return nil
}

func nilIfEmpty(l []string) []string {
	if len(l) == 0 {
		return nil
	}
	return l
}

func (s *Server) mcpToProto(mb MCPBackend, m *store.MCPServer) *v1.McpServer {
	return &v1.McpServer{
		Name: m.Name, Url: m.URL, HeaderName: m.HeaderName, AllowedTools: m.AllowedTools, AllowedResources: m.AllowedResources,
		AllowedPrompts: m.AllowedPrompts, SandboxLabels: m.SandboxLabels, RatePerSecond: m.RatePerSecond,
		HasCredential: len(m.Credential) > 0, CreatedAt: m.CreatedAt.Format(time.RFC3339Nano), CreatedBy: m.CreatedBy,
		GatewayUrl: mb.GatewayURL(m.Name),
	}
}

func (h *mcpService) AddServer(ctx context.Context, req *connect.Request[v1.McpServer]) (*connect.Response[v1.McpServer], error) {
	u, mb, err := h.s.mcpFor(ctx, admin)
	if err != nil {
		return nil, err
	}
	m := req.Msg
	if !dnsLabel.MatchString(m.Name) {
		return nil, invalid("MCP server name %q: must be a DNS label (a-z, 0-9 and '-', at most 63 characters)", m.Name)
	}
	if err := mb.CheckURL(m.Url); err != nil {
		return nil, err
	}
	if err := validHeaderName(m.HeaderName); err != nil {
		return nil, err
	}
	if len(m.Credential) > maxMCPCredential || strings.ContainsAny(m.Credential, "\r\n\x00") {
		return nil, invalid("credential: at most %d bytes, no line breaks or NUL", maxMCPCredential)
	}
	for field, l := range map[string][]string{"allowed_tools": m.AllowedTools, "allowed_resources": m.AllowedResources, "allowed_prompts": m.AllowedPrompts} {
		if err := validAllowlist(field, l); err != nil {
			return nil, err
		}
	}
	if err := validLabels(m.SandboxLabels); err != nil {
		return nil, fmt.Errorf("sandbox_labels: %w", err)
	}
	if m.RatePerSecond < 0 || m.RatePerSecond > 1e6 || math.IsNaN(m.RatePerSecond) {
		return nil, invalid("rate_per_second %v: want 0 (the default) up to 1e6", m.RatePerSecond)
	}
	rec := &store.MCPServer{
		OrgID: u.OrgID, Name: m.Name, URL: m.Url, HeaderName: m.HeaderName,
		AllowedTools: nilIfEmpty(m.AllowedTools), AllowedResources: nilIfEmpty(m.AllowedResources), AllowedPrompts: nilIfEmpty(m.AllowedPrompts),
		SandboxLabels: m.SandboxLabels, RatePerSecond: m.RatePerSecond, CreatedAt: time.Now().UTC(), CreatedBy: u.Subject,
	}
	if m.Credential != "" {
		if rec.Credential, err = mb.Seal(u.OrgID+"/"+m.Name, []byte(m.Credential)); err != nil {
			return nil, err
		}
	}
	if err := h.s.store.PutMCPServer(ctx, rec); err != nil {
		return nil, err
	}
	mb.Invalidate(u.OrgID, rec.Name)
	return connect.NewResponse(h.s.mcpToProto(mb, rec)), nil
}

func (h *mcpService) ListServers(ctx context.Context, _ *connect.Request[v1.ListMcpServersRequest]) (*connect.Response[v1.ListMcpServersResponse], error) {
	u, mb, err := h.s.mcpFor(ctx, user)
	if err != nil {
		return nil, err
	}
	ms, err := h.s.store.ListMCPServers(ctx, u.OrgID)
	if err != nil {
		return nil, err
	}
	out := &v1.ListMcpServersResponse{}
	for _, m := range ms {
		out.Servers = append(out.Servers, h.s.mcpToProto(mb, m))
	}
	return connect.NewResponse(out), nil
}

func (h *mcpService) RemoveServer(ctx context.Context, req *connect.Request[v1.McpServerName]) (*connect.Response[v1.RemoveMcpServerResponse], error) {
	u, mb, err := h.s.mcpFor(ctx, admin)
	if err != nil {
		return nil, err
	}
	err = h.s.store.DeleteMCPServer(ctx, u.OrgID, req.Msg.Name)
	mb.Invalidate(u.OrgID, req.Msg.Name)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RemoveMcpServerResponse{}), nil
}

func (h *mcpService) Audit(ctx context.Context, req *connect.Request[v1.McpAuditRequest]) (*connect.Response[v1.McpAuditResponse], error) {
	u, mb, err := h.s.mcpFor(ctx, admin)
	if err != nil {
		return nil, err
	}
	mb.FlushAudit(ctx)
	q := store.MCPAuditQuery{OrgID: u.OrgID, SandboxID: req.Msg.SandboxId, Server: req.Msg.Server, Limit: int(req.Msg.Limit)}
	if req.Msg.Limit < 0 || req.Msg.Limit > 10000 {
		return nil, invalid("limit %d: want 1..10000 (0: 100)", req.Msg.Limit)
	}
	if req.Msg.Since != "" {
		if q.Since, err = time.Parse(time.RFC3339Nano, req.Msg.Since); err != nil {
			return nil, invalid("since %q: want RFC 3339", req.Msg.Since)
		}
	}
	recs, err := h.s.store.ListMCPAudit(ctx, q)
	if err != nil {
		return nil, err
	}
	out := &v1.McpAuditResponse{}
	for _, r := range recs {
		out.Records = append(out.Records, &v1.McpAuditRecord{
			Seq: r.Seq, At: r.At.Format(time.RFC3339Nano), SandboxId: r.SandboxID, Sub: r.Subject, Server: r.Server,
			HttpMethod: r.HTTPMethod, Method: r.Method, Tool: r.Tool, ArgsSha256: r.ArgsSHA256, Decision: r.Decision,
			Status: int32(r.Status), LatencyMs: r.LatencyMS, BytesIn: r.BytesIn, BytesOut: r.BytesOut,
		})
	}
	return connect.NewResponse(out), nil
}

func validLabels(l map[string]string) error {
	if len(l) > 64 {
		return invalid("%d labels, at most 64", len(l))
	}
	for k, v := range l {
		if k == "" || len(k) > 63 || strings.TrimFunc(k, func(r rune) bool {
			return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("._/-", r)
		}) != "" {
			return invalid("label key %q: 1-63 of a-z, A-Z, 0-9, '.', '_', '/', '-'", k)
		}
		if len(v) > 256 || strings.ContainsAny(v, "\r\n\x00") {
			return invalid("label %s: value too long or with control characters", k)
		}
	}
	return nil
}
