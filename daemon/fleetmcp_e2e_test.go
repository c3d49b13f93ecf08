package daemon_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/internal/mcptest"
)

// startFleetWithInternet starts a control plane whose uplink is inet (the
// MCP upstreams are dialled by the control plane, which alone holds their
// credentials) and node 1, and waits until a sandbox can be placed.
func startFleetWithInternet(t *testing.T, inet *chalktest.FakeInternet) (control, n1 *chalktest.Node, first *chalkcompute.Sandbox) {
	t.Helper()
	control = chalktest.StartOpts(t, chalktest.Options{Mode: "control", Internet: inet, Args: []string{"--fleet-listen", ":7450"}})
	n1 = chalktest.StartFleetNode(t, control, 1)
	c := control.Client()
	deadline := time.Now().Add(30 * time.Second)
	for {
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
		if err == nil {
			first = sb
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("create on the fleet: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // polling the control plane for the node's first heartbeat
	}
	onNode(t, n1, first)
	return control, n1, first
}

func onNode(t *testing.T, n *chalktest.Node, sb *chalkcompute.Sandbox) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(n.Dir, "sandboxes", sb.ID())); err != nil {
		t.Fatalf("sandbox %s is not on the node: %v", sb.ID(), err)
	}
}

// TestFleetMCPGateway: the official MCP Go SDK's client, in a sandbox on a
// fleet node, uses an upstream (the official SDK's server, reached by the
// control plane) through http://169.254.169.254/mcp/<server> on its node
// as on one machine: the node relays to the control plane, which holds the
// credential; an allowed tool works, one outside the allowlist is refused
// and audited, progress streams through as it happens, the credential is
// never in the sandbox, sessions stay with their sandbox, and /api
// reaches the control plane's API as the sandbox itself.
func TestFleetMCPGateway(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	up := mcptest.New("Authorization")
	inet.Serve("198.51.100.30", up)
	control, n1, a := startFleetWithInternet(t, inet)
	c := control.Client()
	ctx := ctxT(t, 5*time.Minute)
	const cred = "sk-fleet-upstream-credential-9e107d9d372bb6826bd81d3542a419d6"
	srv, err := c.AddMCPServer(ctx, chalkcompute.MCPServer{Name: "tools", URL: "http://198.51.100.30/", Credential: cred, AllowedTools: []string{"add", "whoami", "slow"}})
	if err != nil {
		t.Fatal(err)
	}
	gwURL := "http://169.254.169.254/mcp/tools"
	if srv.GatewayURL != gwURL {
		t.Fatalf("registered: %+v", srv)
	}
	b := create(t, c)
	onNode(t, n1, b)
	probe, err := os.ReadFile(testdataBin(t, "mcpprobe"))
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if err := sb.WriteFile(ctx, "/bin/mcpprobe", probe, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	// The SDK client in a: the slow tool's progress arrives while the tool
	// still runs (released only once the client printed it), through both
	// hops.
	var out outputWatch
	progressed := out.until("progress: halfway")
	p, err := a.Start(ctx, []string{"mcpprobe", "sdk", gwURL}, chalkcompute.Stdout(&out), chalkcompute.Stderr(&out))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-progressed:
	case <-ctx.Done():
		t.Fatalf("no progress through the node's gateway while the tool ran: %q", out.String())
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
	if env := mustExec(t, a, "sh", "-c", "env; cat /proc/self/environ; true"); strings.Contains(env, cred) {
		t.Fatal("the credential is in the sandbox's environment")
	}
	// Nothing of the credential is on the node (it never crosses the fleet channel).
	if out, err := exec.Command("grep", "-rlF", cred, n1.Dir).Output(); len(out) > 0 || err == nil {
		t.Fatalf("the credential is on the node: %s %v", out, err)
	}

	// Refusals and sessions, raw.
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "-", mcpInit); st != "401" || !strings.Contains(body, "missing bearer token") {
		t.Fatalf("no token: %s %s", st, body)
	}
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
	if st, _, body := mcpRaw(t, a, "POST", "http://metadata.chalk.internal/mcp/tools", "meta:"+gwURL, mcpInit); st != "200" {
		t.Fatalf("by DNS name: %s %s", st, body)
	}

	// The control plane's audit has a's calls with their decisions.
	outJSON, stderr, code := control.CLI("compute", "mcp", "audit", "--sandbox", a.ID(), "--limit", "500", "-o", "json")
	if code != 0 {
		t.Fatalf("mcp audit: %d %s", code, stderr)
	}
	var recs []struct {
		SandboxID, Sub, Server, Method, Tool, Decision string
		Status                                         int
	}
	if err := json.Unmarshal([]byte(strings.ReplaceAll(outJSON, "sandbox_id", "SandboxID")), &recs); err != nil {
		t.Fatal(err)
	}
	var denied, allowed bool
	for _, r := range recs {
		if r.SandboxID != a.ID() {
			t.Fatalf("audit filtered by sandbox has %+v", r)
		}
		switch {
		case r.Method == "tools/call" && r.Tool == "secret_tool" && strings.HasPrefix(r.Decision, "denied"):
			denied = true
		case r.Method == "tools/call" && r.Tool == "add" && r.Decision == "allowed" && r.Status == 200 && strings.HasSuffix(r.Sub, ":sbx:"+a.ID()):
			allowed = true
		}
	}
	if !denied || !allowed {
		t.Fatalf("audit (denied %v, allowed %v):\n%s", denied, allowed, outJSON)
	}
	if strings.Contains(outJSON, cred) {
		t.Fatal("the audit log holds the credential")
	}

	// /api: the control plane's API, as the sandbox itself (its own
	// workload token, bound to it), never with another sandbox's token.
	const whoami = "chalk.compute.v1.IdentityService/WhoAmI"
	tokA := fetchToken(t, a, "chalk-api")
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if err := sb.WriteFile(ctx, "/tmp/tok", []byte(tokA), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if code, out, errOut := apiFromSandbox(ctx, t, a, whoami, "/tmp/tok"); code != 0 || !strings.Contains(out, a.ID()) {
		t.Fatalf("/api from the node sandbox: %d %q %q", code, out, errOut)
	}
	if code, out, errOut := apiFromSandbox(ctx, t, b, whoami, "/tmp/tok"); code == 0 || !strings.Contains(errOut, "401") {
		t.Fatalf("a's API token from b: %d %q %q", code, out, errOut)
	}
	// The control plane's log names the sandbox's relays (its node's
	// identification), and the node has served them.
	if strings.Contains(control.Log(), "relay for a sandbox not on the node refused") {
		t.Fatalf("a relay of the node was refused:\n%s", control.Log())
	}
}
