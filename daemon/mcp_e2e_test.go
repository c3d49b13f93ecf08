package daemon_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/internal/mcptest"
)

const mcpInit = `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`

// mcpRaw runs one raw gateway request from inside sb; it returns the
// status, the session header and the body.
func mcpRaw(t *testing.T, sb *chalkcompute.Sandbox, method, url, token, body string, headers ...string) (string, string, string) {
	t.Helper()
	out := mustExec(t, sb, append([]string{"mcpprobe", "raw", method, url, token, body}, headers...)...)
	status, rest, _ := strings.Cut(out, "\n")
	session, body, _ := strings.Cut(rest, "\n")
	return strings.TrimPrefix(status, "status: "), strings.TrimPrefix(session, "session: "), body
}

// expiredToken is a token of sb for audience, signed with the node's real
// key but expired ten minutes ago.
func expiredToken(t *testing.T, n *chalktest.Node, c *chalkcompute.Client, sb *chalkcompute.Sandbox, audience string) string {
	t.Helper()
	fresh, err := c.MintToken(ctxT(t, time.Minute), sb.ID(), audience, 300)
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(fresh.Token, ".")
	hdr, _ := base64.RawURLEncoding.DecodeString(parts[0])
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var h struct{ Kid, Alg string }
	var claims map[string]any
	if json.Unmarshal(hdr, &h) != nil || json.Unmarshal(payload, &claims) != nil {
		t.Fatalf("token %q", fresh.Token)
	}
	b, err := os.ReadFile(filepath.Join(n.Dir, "identity", "signing-keys.json"))
	if err != nil {
		t.Fatal(err)
	}
	var keys struct {
		Keys []struct {
			Kid string          `json:"kid"`
			JWK json.RawMessage `json:"jwk"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(b, &keys); err != nil {
		t.Fatal(err)
	}
	var jwk jose.JSONWebKey
	for _, k := range keys.Keys {
		if k.Kid == h.Kid {
			if err := jwk.UnmarshalJSON(k.JWK); err != nil {
				t.Fatal(err)
			}
		}
	}
	if jwk.Key == nil {
		t.Fatalf("no signing key %s", h.Kid)
	}
	now := time.Now().Unix()
	claims["iat"], claims["nbf"], claims["exp"] = now-1200, now-1200, now-600
	// Signed as chalkd signs (ES256 by default, RS256 for older key sets).
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(h.Alg), Key: jwk}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := json.Marshal(claims)
	jws, err := signer.Sign(p)
	if err != nil {
		t.Fatal(err)
	}
	s, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestMCPGateway: the official MCP Go SDK's client, run inside a sandbox,
// uses an upstream (the official SDK's server, in the fake internet) through
// the gateway with its workload identity: tools are filtered and enforced,
// the upstream gets the credential and the sandbox never sees it, progress
// streams through as it happens; bad tokens, foreign sessions, disagreeing
// headers and redirects to the metadata address are refused; every call is
// audited.
func TestMCPGateway(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	up := mcptest.New("Authorization")
	inet.Serve("198.51.100.30", up)
	inet.Serve("198.51.100.31", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://169.254.169.254/v1/identity", http.StatusTemporaryRedirect)
	}))
	n := chalktest.StartWith(t, inet)
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	const cred = "sk-e2e-upstream-credential-d41d8cd98f00b204"
	srv, err := c.AddMCPServer(ctx, chalkcompute.MCPServer{Name: "tools", URL: "http://198.51.100.30/", Credential: cred, AllowedTools: []string{"add", "whoami", "slow"}})
	if err != nil {
		t.Fatal(err)
	}
	gwURL := "http://169.254.169.254/mcp/tools"
	if !srv.HasCredential || srv.GatewayURL != gwURL || srv.Credential != "" {
		t.Fatalf("registered: %+v", srv)
	}
	if _, err := c.AddMCPServer(ctx, chalkcompute.MCPServer{Name: "evil", URL: "http://198.51.100.31/", Credential: cred}); err != nil {
		t.Fatal(err)
	}
	// Bad registrations name the problem.
	for _, bad := range []chalkcompute.MCPServer{
		{Name: "meta", URL: "http://169.254.169.254/latest"},
		{Name: "hdr", URL: "http://198.51.100.30/", HeaderName: "Host", Credential: "x"},
		{Name: "Bad_Name", URL: "http://198.51.100.30/"},
		{Name: "glob", URL: "http://198.51.100.30/", AllowedTools: []string{"a*b"}},
	} {
		if _, err := c.AddMCPServer(ctx, bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("register %+v: %v, want InvalidArgument", bad, err)
		}
	}
	// No API returns the credential.
	if out, stderr, code := n.CLI("compute", "mcp", "server", "ls", "-o", "json"); code != 0 || strings.Contains(out, cred) || !strings.Contains(out, `"has_credential": true`) {
		t.Fatalf("mcp server ls: %d %q %q", code, out, stderr)
	}

	a := create(t, c)
	b := create(t, c)
	putMCPProbe(t, ctx, a, b)

	// The SDK client in a (see checkMCPClient).
	checkMCPClient(t, ctx, a, up, gwURL, cred)

	// Refusals.
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "-", mcpInit); st != "401" || !strings.Contains(body, "missing bearer token") {
		t.Fatalf("no token: %s %s", st, body)
	}
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "meta:https://other.example/mcp", mcpInit); st != "401" || !strings.Contains(body, "audience") {
		t.Fatalf("wrong audience: %s %s", st, body)
	}
	if st, _, body := mcpRaw(t, a, "POST", gwURL, expiredToken(t, n, c, a, gwURL), mcpInit); st != "401" || !strings.Contains(body, "expired") {
		t.Fatalf("expired token: %s %s", st, body)
	}
	checkMCPSessions(t, ctx, c, a, b, gwURL)
	call := `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"secret_tool","arguments":{}}}`
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "meta:"+gwURL, call, "Mcp-Method=tools/list"); st != "400" || !strings.Contains(body, "disagrees") {
		t.Fatalf("header/body method mismatch: %s %s", st, body)
	}
	evil := "http://169.254.169.254/mcp/evil"
	if st, _, body := mcpRaw(t, a, "POST", evil, "meta:"+evil, mcpInit); st != "502" || !strings.Contains(body, "link-local") || strings.Contains(body, cred) {
		t.Fatalf("upstream redirecting to the metadata address: %s %s", st, body)
	}
	// The gateway's DNS name works under the same audience.
	if st, _, body := mcpRaw(t, a, "POST", "http://metadata.chalk.internal/mcp/tools", "meta:"+gwURL, mcpInit); st != "200" {
		t.Fatalf("by DNS name: %s %s", st, body)
	}

	// The audit log has a's calls with their decisions.
	outJSON, stderr, code := n.CLI("compute", "mcp", "audit", "--sandbox", a.ID(), "--limit", "500", "-o", "json")
	if code != 0 {
		t.Fatalf("mcp audit: %d %s", code, stderr)
	}
	var recs []struct {
		SandboxID, Sub, Server, Method, Tool, Decision string
		ArgsSHA256                                     string `json:"args_sha256"`
		Status                                         int
	}
	if err := json.Unmarshal([]byte(strings.ReplaceAll(outJSON, "sandbox_id", "SandboxID")), &recs); err != nil {
		t.Fatal(err)
	}
	var denied, allowed, redirect bool
	for _, r := range recs {
		if r.SandboxID != a.ID() {
			t.Fatalf("audit filtered by sandbox has %+v", r)
		}
		switch {
		case r.Method == "tools/call" && r.Tool == "secret_tool" && strings.HasPrefix(r.Decision, "denied"):
			denied = true
		case r.Method == "tools/call" && r.Tool == "add" && r.Decision == "allowed" && len(r.ArgsSHA256) == 64 && r.Status == 200 && strings.HasSuffix(r.Sub, ":sbx:"+a.ID()):
			allowed = true
		case r.Server == "evil" && r.Status == 502:
			redirect = true
		}
	}
	if !denied || !allowed || !redirect {
		t.Fatalf("audit (denied %v, allowed %v, redirect %v):\n%s", denied, allowed, redirect, outJSON)
	}
	if strings.Contains(outJSON, cred) {
		t.Fatal("the audit log holds the credential")
	}
	// Unregistering cuts access at once.
	if err := c.RemoveMCPServer(ctx, "tools"); err != nil {
		t.Fatal(err)
	}
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "meta:"+gwURL, mcpInit); st != "404" {
		t.Fatalf("after removal: %s %s", st, body)
	}
}

// putMCPProbe copies the mcpprobe test binary (an MCP client built on the
// official Go SDK) to /bin/mcpprobe in each sandbox.
func putMCPProbe(t *testing.T, ctx context.Context, sbs ...*chalkcompute.Sandbox) {
	t.Helper()
	probe, err := os.ReadFile(testdataBin(t, "mcpprobe"))
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range sbs {
		if err := sb.WriteFile(ctx, "/bin/mcpprobe", probe, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// checkMCPClient runs the official SDK's client in sb against the gateway
// at gwURL, in front of up (registered with credential cred, allowing
// add, whoami and slow): the slow tool's progress arrives while the tool
// still runs (up releases it only once the client printed it), the allowed
// tools work, secret_tool is refused without reaching up, an answer
// holding the credential is refused, up receives the credential on every
// call, and neither the client's output nor sb's environment holds it.
func checkMCPClient(t *testing.T, ctx context.Context, sb *chalkcompute.Sandbox, up *mcptest.Upstream, gwURL, cred string) {
	t.Helper()
	var out outputWatch
	progressed := out.until("progress: halfway")
	p, err := sb.Start(ctx, []string{"mcpprobe", "sdk", gwURL}, chalkcompute.Stdout(&out), chalkcompute.Stderr(&out))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-progressed:
	case <-ctx.Done():
		t.Fatalf("no progress through the gateway while the tool ran: %q", out.String())
	}
	up.Release()
	if st, err := p.Wait(); err != nil || st.Code != 0 {
		t.Fatalf("mcpprobe sdk: %v %+v\n%s", err, st, out.String())
	}
	got := out.String()
	for _, want := range []string{"tools: add,slow,whoami\n", "add: 5\n", "whoami: error:", "held the server's credential", `secret_tool: error:`, `tool "secret_tool" is not allowed`, "slow: done\n"} {
		if !strings.Contains(got, want) {
			t.Fatalf("sandbox client output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, cred) {
		t.Fatalf("the sandbox saw the credential:\n%s", got)
	}
	if n := up.SecretCalls.Load(); n != 0 {
		t.Fatalf("secret_tool ran upstream %d times", n)
	}
	for _, v := range up.Seen() {
		if v != "Bearer "+cred {
			t.Fatalf("upstream received Authorization %q", v)
		}
	}
	if env := mustExec(t, sb, "sh", "-c", "env; cat /proc/self/environ; true"); strings.Contains(env, cred) {
		t.Fatal("the credential is in the sandbox's environment")
	}
}

// checkMCPSessions checks, with raw requests from sandboxes a and b to the
// gateway at gwURL, that b's token is refused from a, and that a session a
// opened is a's alone (unknown to b).
func checkMCPSessions(t *testing.T, ctx context.Context, c *chalkcompute.Client, a, b *chalkcompute.Sandbox, gwURL string) {
	t.Helper()
	bTok, err := c.MintToken(ctx, b.ID(), gwURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, body := mcpRaw(t, a, "POST", gwURL, bTok.Token, mcpInit); st != "403" || !strings.Contains(body, "belongs to sandbox "+b.ID()) {
		t.Fatalf("b's token from a: %s %s", st, body)
	}
	st, session, body := mcpRaw(t, a, "POST", gwURL, "meta:"+gwURL, mcpInit)
	if st != "200" || session == "" {
		t.Fatalf("initialize from a: %s %q %s", st, session, body)
	}
	ping := `{"jsonrpc":"2.0","id":2,"method":"ping"}`
	if st, _, body := mcpRaw(t, b, "POST", gwURL, "meta:"+gwURL, ping, "Mcp-Session-Id="+session, "Mcp-Protocol-Version=2025-06-18"); st != "404" {
		t.Fatalf("a's session used by b: %s %s", st, body)
	}
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "meta:"+gwURL, ping, "Mcp-Session-Id="+session, "Mcp-Protocol-Version=2025-06-18"); st != "200" || !strings.Contains(body, `"id":2`) {
		t.Fatalf("a's own session: %s %s", st, body)
	}
}
