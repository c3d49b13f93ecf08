package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
)

func mcpCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{Use: "mcp", Short: "The MCP gateway: upstream MCP servers sandboxes may use, and its audit log"}
	server := &cobra.Command{Use: "server", Aliases: []string{"servers"}, Short: "Upstream MCP servers"}
	server.AddCommand(mcpAdd(e), mcpList(e), mcpRm(e))
	cmd.AddCommand(server, mcpAudit(e))
	return cmd
}

type mcpServerJSON struct {
	Name             string            `json:"name"`
	URL              string            `json:"url"`
	GatewayURL       string            `json:"gateway_url"`
	HeaderName       string            `json:"header_name"`
	HasCredential    bool              `json:"has_credential"`
	AllowedTools     []string          `json:"allowed_tools"`
	AllowedResources []string          `json:"allowed_resources"`
	AllowedPrompts   []string          `json:"allowed_prompts"`
	SandboxLabels    map[string]string `json:"sandbox_labels"`
	RatePerSecond    float64           `json:"rate_per_second"`
	CreatedAt        time.Time         `json:"created_at"`
	CreatedBy        string            `json:"created_by"`
}

func toMCPJSON(s chalkcompute.MCPServer) mcpServerJSON {
	labels := s.SandboxLabels
	if labels == nil {
		labels = map[string]string{}
	}
	return mcpServerJSON{Name: s.Name, URL: s.URL, GatewayURL: s.GatewayURL, HeaderName: s.HeaderName, HasCredential: s.HasCredential,
		AllowedTools: nonNil(s.AllowedTools), AllowedResources: nonNil(s.AllowedResources), AllowedPrompts: nonNil(s.AllowedPrompts),
		SandboxLabels: labels, RatePerSecond: s.RatePerSecond, CreatedAt: s.CreatedAt, CreatedBy: s.CreatedBy}
}

func mcpAsJSON(s chalkcompute.MCPServer) any { return toMCPJSON(s) }

func allOr(l []string) string {
	if len(l) == 0 {
		return "all"
	}
	return strings.Join(l, ",")
}

func mcpAdd(e *env) *cobra.Command {
	var (
		url, header, credFile string
		tools, res, prompts   []string
		labels                []string
		rate                  float64
	)
	cmd := &cobra.Command{
		Use:   "add NAME --url URL [--credential-file FILE|-] [--header X-Api-Key] [--allow-tool T]... [--sandbox-label k=v]...",
		Short: "Register an upstream MCP server (admin); sandboxes reach it at http://169.254.169.254/mcp/NAME",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if url == "" {
				return fmt.Errorf("--url is required (the upstream's Streamable HTTP endpoint)")
			}
			s := chalkcompute.MCPServer{Name: args[0], URL: url, HeaderName: header, AllowedTools: tools, AllowedResources: res,
				AllowedPrompts: prompts, RatePerSecond: rate}
			if credFile != "" {
				// From a file or stdin, never from a flag: flags end up in shell
				// history and in ps.
				var b []byte
				var err error
				if credFile == "-" {
					b, err = io.ReadAll(e.in)
				} else {
					b, err = os.ReadFile(credFile)
				}
				if err != nil {
					return fmt.Errorf("--credential-file: %w", err)
				}
				s.Credential = strings.TrimRight(string(b), "\r\n")
			}
			if len(labels) > 0 {
				m, err := parseEnv(labels)
				if err != nil {
					return fmt.Errorf("--sandbox-label: %w", err)
				}
				s.SandboxLabels = m
			}
			return call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) (chalkcompute.MCPServer, error) {
				return c.AddMCPServer(ctx, s)
			}, mcpAsJSON, func(out chalkcompute.MCPServer) {
				fmt.Fprintf(e.out, "%s\ninside sandboxes: %s (token audience: the same URL)\n", out.Name, out.GatewayURL)
			})(cmd, args)
		},
	}
	f := cmd.Flags()
	f.StringVar(&url, "url", "", "upstream Streamable HTTP endpoint")
	f.StringVar(&credFile, "credential-file", "", "file holding the upstream credential ('-': stdin); write-only, stored encrypted")
	f.StringVar(&header, "header", "", "header the credential goes in (default: Authorization: Bearer <credential>)")
	f.StringArrayVar(&tools, "allow-tool", nil, "tool sandboxes may list and call (repeatable; none: all; 'prefix*' matches a prefix)")
	f.StringArrayVar(&res, "allow-resource", nil, "resource URI sandboxes may read (repeatable; none: all)")
	f.StringArrayVar(&prompts, "allow-prompt", nil, "prompt sandboxes may get (repeatable; none: all)")
	f.StringArrayVar(&labels, "sandbox-label", nil, "only sandboxes with this label KEY=VALUE may use it (repeatable)")
	f.Float64Var(&rate, "rate", 0, "calls per second per sandbox (0: 50, burst 100)")
	return cmd
}

func mcpList(e *env) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the org's MCP servers (credentials are never shown)",
		Args:    cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]chalkcompute.MCPServer, error) {
			return c.MCPServers(ctx)
		}, func(ss []chalkcompute.MCPServer) any {
			out := make([]mcpServerJSON, 0, len(ss))
			for _, s := range ss {
				out = append(out, toMCPJSON(s))
			}
			return out
		}, func(ss []chalkcompute.MCPServer) {
			rows := make([][]string, 0, len(ss))
			for _, s := range ss {
				rows = append(rows, []string{s.Name, s.URL, fmt.Sprint(s.HasCredential), allOr(s.AllowedTools), s.GatewayURL})
			}
			e.table("NAME\tURL\tCREDENTIAL\tTOOLS\tGATEWAY_URL", rows)
		}),
	}
}

func mcpRm(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Unregister an MCP server (admin)",
		Args:  cobra.ExactArgs(1),
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, args []string) (string, error) {
			return args[0], c.RemoveMCPServer(ctx, args[0])
		}, removed, func(name string) { fmt.Fprintln(e.out, name) }),
	}
}

func mcpAudit(e *env) *cobra.Command {
	var (
		q     chalkcompute.MCPAuditQuery
		since time.Duration
	)
	cmd := &cobra.Command{
		Use:   "audit [--sandbox ID] [--server NAME] [--since 1h] [--limit N]",
		Short: "Show calls through the MCP gateway, newest first (admin)",
		Args:  cobra.NoArgs,
		RunE: call(e, func(ctx context.Context, c *chalkcompute.Client, _ []string) ([]chalkcompute.MCPAuditRecord, error) {
			if since > 0 {
				q.Since = time.Now().Add(-since)
			}
			return c.MCPAudit(ctx, q)
		}, mcpAuditJSON, func(recs []chalkcompute.MCPAuditRecord) {
			rows := make([][]string, 0, len(recs))
			for _, r := range recs {
				rows = append(rows, []string{r.At.Local().Format("15:04:05.000"), r.SandboxID, r.Server, r.Method, r.Tool, r.Decision, fmt.Sprint(r.Status), fmt.Sprintf("%.1fms", r.LatencyMS)})
			}
			e.table("TIME\tSANDBOX\tSERVER\tMETHOD\tTOOL\tDECISION\tSTATUS\tLATENCY", rows)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&q.SandboxID, "sandbox", "", "only this sandbox's calls")
	f.StringVar(&q.Server, "server", "", "only calls to this server")
	f.DurationVar(&since, "since", 0, "only calls this recent")
	f.IntVar(&q.Limit, "limit", 100, "at most this many records (max 10000)")
	return cmd
}

// mcpAuditJSON is the JSON of audit records (snake_case, every field).
func mcpAuditJSON(recs []chalkcompute.MCPAuditRecord) any {
	type rec struct {
		Seq        int64     `json:"seq"`
		At         time.Time `json:"at"`
		SandboxID  string    `json:"sandbox_id"`
		Sub        string    `json:"sub"`
		Server     string    `json:"server"`
		HTTPMethod string    `json:"http_method"`
		Method     string    `json:"method"`
		Tool       string    `json:"tool"`
		ArgsSHA256 string    `json:"args_sha256"`
		Decision   string    `json:"decision"`
		Status     int       `json:"status"`
		LatencyMS  float64   `json:"latency_ms"`
		BytesIn    int64     `json:"bytes_in"`
		BytesOut   int64     `json:"bytes_out"`
	}
	out := make([]rec, 0, len(recs))
	for _, r := range recs {
		out = append(out, rec{r.Seq, r.At, r.SandboxID, r.Subject, r.Server, r.HTTPMethod, r.Method, r.Tool, r.ArgsSHA256, r.Decision, r.Status, r.LatencyMS, r.BytesIn, r.BytesOut})
	}
	return out
}
