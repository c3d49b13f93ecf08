package mcpgw

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/mcptest"
	"github.com/chalkcompute/chalkcompute/store"
)

// These tests run the official MCP Go SDK on both sides of the gateway
// in-process; identity is a stand-in here (tokens "tok:<sandbox>:<aud>").
// daemon/mcp_e2e_test.go runs the client in a real sandbox with real tokens.

const secret = "sk-live-upstream-credential-0123456789"

type fixture struct {
	up      *mcptest.Upstream
	gw      *Gateway
	srv     *httptest.Server
	servers map[string]*Upstream
	mu      sync.Mutex
	audit   []store.MCPAudit
}

func newFixture(t testing.TB, header string) *fixture {
	return newFixtureWith(t, header, nil)
}

func newFixtureWith(t testing.TB, header string, opts *mcp.StreamableHTTPOptions) *fixture {
	t.Helper()
	f := &fixture{up: mcptest.NewWith(header, opts), servers: map[string]*Upstream{}}
	upSrv := httptest.NewServer(f.up)
	t.Cleanup(upSrv.Close)
	f.servers["tools"] = &Upstream{Name: "tools", URL: upSrv.URL, HeaderName: header, Credential: secret,
		Tools: []string{"whoami", "add", "slow"}, Prompts: []string{"greet"}, Resources: []string{"file:///public*"}}
	var err error
	f.gw, err = New(Config{
		Upstream: func(_ context.Context, org, name string) (*Upstream, error) {
			if s, ok := f.servers[name]; ok && org == "org1" {
				return s, nil
			}
			return nil, fmt.Errorf("no server %s: %w", name, errdefs.ErrNotFound)
		},
		Verify: func(_ context.Context, token, aud string) (Claims, error) {
			parts := strings.SplitN(token, ":", 3)
			if len(parts) != 3 || parts[0] != "tok" {
				return Claims{}, errors.New("token rejected: malformed")
			}
			if parts[2] != aud {
				return Claims{}, fmt.Errorf("token rejected: audience %q, want %q", parts[2], aud)
			}
			return Claims{Subject: "chalk:org:org1:sbx:" + parts[1], SandboxID: parts[1]}, nil
		},
		Caller: func(r *http.Request) (Caller, bool) {
			id := r.Header.Get("X-Test-Sandbox")
			return Caller{SandboxID: id, OrgID: "org1", Labels: map[string]string{"team": id}}, id != ""
		},
		Audit: func(a store.MCPAudit) {
			f.mu.Lock()
			f.audit = append(f.audit, a)
			f.mu.Unlock()
		},
		// httptest servers listen on loopback, which the gateway never dials otherwise.
		AllowAddrs: []netip.AddrPort{netip.MustParseAddrPort(strings.TrimPrefix(upSrv.URL, "http://"))},
	})
	if err != nil {
		t.Fatal(err)
	}
	f.srv = httptest.NewServer(http.StripPrefix("", f.gw))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fixture) url(server string) string { return f.srv.URL + "/mcp/" + server }

// as is an HTTP client that a sandbox would use: its own bearer token.
type as struct {
	sandbox, token string
	extra          http.Header
}

func (a as) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("X-Test-Sandbox", a.sandbox)
	if a.token != "" {
		r.Header.Set("Authorization", "Bearer "+a.token)
	}
	for k, v := range a.extra {
		r.Header[k] = v
	}
	return http.DefaultTransport.RoundTrip(r)
}

func tok(sandbox, aud string) string { return "tok:" + sandbox + ":" + aud }

func (f *fixture) connect(t testing.TB, sandbox, server string, opts *mcp.ClientOptions) *mcp.ClientSession {
	t.Helper()
	c := mcp.NewClient(&mcp.Implementation{Name: "sandbox-client", Version: "1"}, opts)
	hc := &http.Client{Transport: as{sandbox: sandbox, token: tok(sandbox, "http://169.254.169.254/mcp/"+server)}}
	s, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: f.url(server), HTTPClient: hc}, nil)
	if err != nil {
		t.Fatalf("connect through the gateway: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func text(r *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range r.Content {
		if t, ok := c.(*mcp.TextContent); ok {
			b.WriteString(t.Text)
		}
	}
	return b.String()
}

func TestToolsThroughGateway(t *testing.T) {
	for _, header := range []string{"Authorization", "X-Api-Key"} {
		t.Run(header, func(t *testing.T) {
			f := newFixture(t, header)
			ctx := context.Background()
			s := f.connect(t, "sb-a", "tools", nil)
			lt, err := s.ListTools(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, tl := range lt.Tools {
				names = append(names, tl.Name)
			}
			slices.Sort(names)
			if !slices.Equal(names, []string{"add", "slow", "whoami"}) {
				t.Fatalf("tools/list through the gateway: %v (secret_tool must be filtered out)", names)
			}
			res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "add", Arguments: map[string]any{"a": 2, "b": 3}})
			if err != nil || text(res) != "5" {
				t.Fatalf("add: %v %+v", err, res)
			}
			// The upstream got the real credential; an answer echoing it is
			// refused (TestCredentialEchoes has the encodings).
			res, err = s.CallTool(ctx, &mcp.CallToolParams{Name: "whoami"})
			if err == nil || !strings.Contains(err.Error(), "held the server's credential") || strings.Contains(err.Error(), secret) {
				t.Fatalf("whoami through the gateway: %v %+v", err, res)
			}
			want := secret
			if header == "Authorization" {
				want = "Bearer " + secret
			}
			for _, v := range f.up.Seen() {
				if v != want {
					t.Fatalf("upstream received credential %q, want %q", v, want)
				}
			}
			// A tool outside the allowlist is refused, not merely hidden.
			_, err = s.CallTool(ctx, &mcp.CallToolParams{Name: "secret_tool"})
			if err == nil || !strings.Contains(err.Error(), `tool "secret_tool" is not allowed`) {
				t.Fatalf("secret_tool: %v", err)
			}
			if n := f.up.SecretCalls.Load(); n != 0 {
				t.Fatalf("secret_tool ran %d times upstream", n)
			}
			// The audit has the calls with their decisions (a handler records
			// after its answer: waitAudit).
			f.waitAudit(t, func(recs []store.MCPAudit) bool {
				var sawDenied, sawAdd bool
				for _, a := range recs {
					if a.Method == "tools/call" && a.Tool == "secret_tool" && strings.HasPrefix(a.Decision, "denied") && a.SandboxID == "sb-a" {
						sawDenied = true
					}
					if a.Method == "tools/call" && a.Tool == "add" && a.Decision == "allowed" && len(a.ArgsSHA256) == 64 && a.Subject == "chalk:org:org1:sbx:sb-a" {
						sawAdd = true
					}
				}
				return sawDenied && sawAdd
			})
		})
	}
}

// TestStatelessUpstream: a stateless upstream (no sessions; JSON answers)
// works through the gateway, with the same enforcement.
func TestStatelessUpstream(t *testing.T) {
	f := newFixtureWith(t, "Authorization", &mcp.StreamableHTTPOptions{Stateless: true, JSONResponse: true})
	ctx := context.Background()
	s := f.connect(t, "sb-a", "tools", nil)
	res, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "add", Arguments: map[string]any{"a": 20, "b": 22}})
	if err != nil || text(res) != "42" {
		t.Fatalf("add: %v %+v", err, res)
	}
	lt, err := s.ListTools(ctx, nil)
	if err != nil || len(lt.Tools) != 3 {
		t.Fatalf("tools/list (JSON answer): %+v %v", lt, err)
	}
	if _, err := s.CallTool(ctx, &mcp.CallToolParams{Name: "secret_tool"}); err == nil {
		t.Fatal("secret_tool allowed")
	}
	f.gw.mu.Lock()
	n := len(f.gw.sessions)
	f.gw.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d gateway sessions for a stateless upstream", n)
	}
}

func TestPromptsAndResources(t *testing.T) {
	f := newFixture(t, "Authorization")
	ctx := context.Background()
	s := f.connect(t, "sb-a", "tools", nil)
	if _, err := s.GetPrompt(ctx, &mcp.GetPromptParams{Name: "greet"}); err != nil {
		t.Fatalf("allowed prompt: %v", err)
	}
	if _, err := s.GetPrompt(ctx, &mcp.GetPromptParams{Name: "internal"}); err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("denied prompt: %v", err)
	}
	lp, err := s.ListPrompts(ctx, nil)
	if err != nil || len(lp.Prompts) != 1 || lp.Prompts[0].Name != "greet" {
		t.Fatalf("prompts/list: %+v %v", lp, err)
	}
	if r, err := s.ReadResource(ctx, &mcp.ReadResourceParams{URI: "file:///public.txt"}); err != nil || r.Contents[0].Text != "contents of file:///public.txt" {
		t.Fatalf("allowed resource: %+v %v", r, err)
	}
	if _, err := s.ReadResource(ctx, &mcp.ReadResourceParams{URI: "file:///secret.txt"}); err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("denied resource: %v", err)
	}
	lr, err := s.ListResources(ctx, nil)
	if err != nil || len(lr.Resources) != 1 || lr.Resources[0].URI != "file:///public.txt" {
		t.Fatalf("resources/list: %+v %v", lr, err)
	}
}

// TestSSEIsIncremental: a progress notification reaches the client while
// the tool is still running (the gateway does not buffer the stream).
func TestSSEIsIncremental(t *testing.T) {
	f := newFixture(t, "Authorization")
	progressed := make(chan string, 1)
	s := f.connect(t, "sb-a", "tools", &mcp.ClientOptions{ProgressNotificationHandler: func(_ context.Context, r *mcp.ProgressNotificationClientRequest) {
		select {
		case progressed <- r.Params.Message:
		default:
		}
	}})
	done := make(chan error, 1)
	go func() {
		p := &mcp.CallToolParams{Name: "slow"}
		p.SetProgressToken("p1")
		res, err := s.CallTool(context.Background(), p)
		if err == nil && text(res) != "done" {
			err = fmt.Errorf("slow: %q", text(res))
		}
		done <- err
	}()
	select {
	case m := <-progressed:
		if m != "halfway" {
			t.Fatalf("progress %q", m)
		}
	case err := <-done:
		t.Fatalf("the call ended before its progress arrived: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no progress notification while the tool runs: the stream is buffered")
	}
	f.up.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// post sends one raw request through the gateway as sandbox sb.
func (f *fixture) post(t *testing.T, sb, token, body string, hdr http.Header) (int, http.Header, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, f.url("tools"), strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Transport: as{sandbox: sb, token: token}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

const initBody = `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`

func TestRefusals(t *testing.T) {
	f := newFixture(t, "Authorization")
	aud := "http://169.254.169.254/mcp/tools"
	call := `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"secret_tool","arguments":{}}}`
	for _, tc := range []struct {
		name, sb, token, body string
		hdr                   http.Header
		status                int
		want                  string
	}{
		{"no token", "sb-a", "", initBody, nil, 401, "missing bearer token"},
		{"wrong audience", "sb-a", tok("sb-a", "https://elsewhere.example"), initBody, nil, 401, "audience"},
		{"another sandbox's token", "sb-a", tok("sb-b", aud), initBody, nil, 403, "belongs to sandbox sb-b"},
		{"method header disagrees", "sb-a", tok("sb-a", aud), call, http.Header{"Mcp-Method": {"tools/list"}}, 400, "disagrees"},
		{"name header disagrees", "sb-a", tok("sb-a", aud), call, http.Header{"Mcp-Method": {"tools/call"}, "Mcp-Name": {"=?base64?" + "YWRk" + "?="}}, 400, `Mcp-Name \"add\" disagrees`},
		{"made-up session", "sb-a", tok("sb-a", aud), `{"jsonrpc":"2.0","method":"notifications/initialized"}`, http.Header{"Mcp-Session-Id": {"forged"}}, 404, "unknown MCP session"},
		{"not JSON-RPC", "sb-a", tok("sb-a", aud), `{"hello":1}`, nil, 400, "unknown member"},
		{"no jsonrpc", "sb-a", tok("sb-a", aud), `{"id":1,"method":"ping"}`, nil, 400, "jsonrpc"},
		{"too large", "sb-a", tok("sb-a", aud), `{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"` + strings.Repeat("a", DefaultMaxRequest) + `"}}`, nil, 413, "over"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, hdr, body := f.post(t, tc.sb, tc.token, tc.body, tc.hdr)
			if status != tc.status || !strings.Contains(body, tc.want) {
				t.Fatalf("%d %q, want %d containing %q", status, body, tc.status, tc.want)
			}
			if status == 401 && hdr.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
		})
	}
	// A batch with one denied call runs nothing.
	batch := `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":1}}},` + call + `]`
	status, _, body := f.post(t, "sb-a", tok("sb-a", aud), batch, nil)
	if status != 200 || !strings.Contains(body, `"id":7`) || !strings.Contains(body, "batch refused") || !strings.Contains(body, "-32001") {
		t.Fatalf("batch: %d %s", status, body)
	}
	if f.up.SecretCalls.Load() != 0 {
		t.Fatal("secret_tool ran")
	}
}

// TestSessionsAreBoundToTheSandbox: the session id the gateway issues is
// not upstream's, and another sandbox cannot use it.
func TestSessionsAreBoundToTheSandbox(t *testing.T) {
	f := newFixture(t, "Authorization")
	aud := "http://169.254.169.254/mcp/tools"
	status, hdr, body := f.post(t, "sb-a", tok("sb-a", aud), initBody, nil)
	id := hdr.Get("Mcp-Session-Id")
	if status != 200 || id == "" {
		t.Fatalf("initialize: %d %s", status, body)
	}
	f.gw.mu.Lock()
	up := f.gw.sessions[id].upstreamID
	f.gw.mu.Unlock()
	if up == "" || up == id {
		t.Fatalf("gateway session %q vs upstream %q", id, up)
	}
	ping := `{"jsonrpc":"2.0","id":2,"method":"ping"}`
	if status, _, body := f.post(t, "sb-b", tok("sb-b", aud), ping, http.Header{"Mcp-Session-Id": {id}}); status != 404 {
		t.Fatalf("sb-b with sb-a's session: %d %s", status, body)
	}
	if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), ping, http.Header{"Mcp-Session-Id": {up}}); status != 404 {
		t.Fatalf("the upstream session id used directly: %d %s", status, body)
	}
	if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), ping, http.Header{"Mcp-Session-Id": {id}, "Mcp-Protocol-Version": {"2025-06-18"}}); status != 200 || !strings.Contains(body, `"id":2`) {
		t.Fatalf("sb-a's own session: %d %s", status, body)
	}
	f.gw.Forget("sb-a")
	if status, _, _ := f.post(t, "sb-a", tok("sb-a", aud), ping, http.Header{"Mcp-Session-Id": {id}}); status != 404 {
		t.Fatalf("session of an ended sandbox: %d", status)
	}
}

func TestUpstreamAddresses(t *testing.T) {
	for _, bad := range []string{"http://169.254.169.254/mcp", "http://127.0.0.1:8080/x", "http://[::1]/", "http://[fe80::1]/x", "ftp://example.com/", "http://user:pw@example.com/", "http://10.213.0.1/x"} {
		if err := CheckURL(bad, []netip.Prefix{netip.MustParsePrefix("10.213.0.0/16")}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("CheckURL(%q) = %v", bad, err)
		}
	}
	if err := CheckURL("https://mcp.example.com/v1", nil); err != nil {
		t.Fatal(err)
	}
	// An upstream that redirects to the metadata address is refused.
	redir := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://169.254.169.254/latest/meta-data/", http.StatusTemporaryRedirect)
	}))
	defer redir.Close()
	f := newFixture(t, "Authorization")
	f.servers["evil"] = &Upstream{Name: "evil", URL: redir.URL, Credential: secret}
	req, _ := http.NewRequest(http.MethodPost, f.url("evil"), strings.NewReader(initBody))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/evil")}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(b), "link-local, metadata") || strings.Contains(string(b), secret) {
		t.Fatalf("redirect to metadata: %d %s", resp.StatusCode, b)
	}
}

func TestRateLimitAndLabels(t *testing.T) {
	f := newFixture(t, "Authorization")
	f.servers["tools"].Rate = 1 // burst 2
	aud := "http://169.254.169.254/mcp/tools"
	ping := `{"jsonrpc":"2.0","id":2,"method":"ping"}`
	codes := []int{}
	for range 3 {
		s, _, _ := f.post(t, "sb-a", tok("sb-a", aud), ping, nil)
		codes = append(codes, s)
	}
	if codes[2] != http.StatusTooManyRequests {
		t.Fatalf("rate limit: %v", codes)
	}
	// Another sandbox has its own bucket.
	if s, _, _ := f.post(t, "sb-b", tok("sb-b", aud), ping, nil); s == http.StatusTooManyRequests {
		t.Fatal("sb-b limited by sb-a's calls")
	}
	f.servers["teamonly"] = &Upstream{Name: "teamonly", URL: f.servers["tools"].URL, Labels: map[string]string{"team": "sb-x"}}
	req, _ := http.NewRequest(http.MethodPost, f.url("teamonly"), strings.NewReader(ping))
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/teamonly")}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("sandbox without the label: %d", resp.StatusCode)
	}
}

func TestSealer(t *testing.T) {
	path := t.TempDir() + "/mcp.key"
	s, err := OpenSealer(path)
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := s.Seal("org1/tools", []byte(secret))
	if err != nil || strings.Contains(string(sealed), secret) {
		t.Fatalf("seal: %v", err)
	}
	s2, err := OpenSealer(path) // the same key from disk
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Open("org1/tools", sealed); err != nil || string(got) != secret {
		t.Fatalf("open: %q %v", got, err)
	}
	if _, err := s2.Open("org1/other", sealed); err == nil {
		t.Fatal("a credential opened for another server")
	}
}

// A verified token is cached (Verify runs once per token), but nothing
// else is: the sandbox's end (the caller check, every request), a changed
// allowlist or label rule (the Upstream, every request) and Forget take
// effect on the next request with the same cached token.
func TestVerifiedTokenCacheKeepsRevocation(t *testing.T) {
	f := newFixture(t, "Authorization")
	var verifies atomic.Int32
	verify := f.gw.cfg.Verify
	f.gw.cfg.Verify = func(ctx context.Context, token, aud string) (Claims, error) {
		verifies.Add(1)
		cl, err := verify(ctx, token, aud)
		cl.Expiry = time.Now().Add(time.Hour)
		return cl, err
	}
	var ended atomic.Bool
	caller := f.gw.cfg.Caller
	f.gw.cfg.Caller = func(r *http.Request) (Caller, bool) {
		c, ok := caller(r)
		return c, ok && !ended.Load()
	}
	aud := "http://169.254.169.254/mcp/tools"
	ping := `{"jsonrpc":"2.0","id":2,"method":"ping"}`
	call := `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}`
	for range 3 {
		if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), ping, nil); status != 200 {
			t.Fatalf("ping: %d %s", status, body)
		}
	}
	if n := verifies.Load(); n != 1 {
		t.Fatalf("Verify ran %d times for one token, want 1 (cached)", n)
	}
	// The allowlist changes: the next call is refused.
	f.servers["tools"].Tools = []string{"whoami"}
	if _, _, body := f.post(t, "sb-a", tok("sb-a", aud), call, nil); !strings.Contains(body, "-32001") {
		t.Fatalf("tools/call after its tool left the allowlist: %s", body)
	}
	// A label rule: refused.
	f.servers["tools"].Labels = map[string]string{"team": "other"}
	if status, _, _ := f.post(t, "sb-a", tok("sb-a", aud), ping, nil); status != http.StatusForbidden {
		t.Fatalf("after a label rule the sandbox lacks: %d", status)
	}
	f.servers["tools"].Labels = nil
	// The sandbox ends: refused, cached token or not.
	ended.Store(true)
	if status, _, _ := f.post(t, "sb-a", tok("sb-a", aud), ping, nil); status != http.StatusForbidden {
		t.Fatalf("ended sandbox with a cached token: %d", status)
	}
	ended.Store(false)
	// Forget drops its tokens: verified again.
	f.gw.Forget("sb-a")
	if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), ping, nil); status != 200 || verifies.Load() != 2 {
		t.Fatalf("after Forget: %d %s, %d verifications, want 2", status, body, verifies.Load())
	}
}
