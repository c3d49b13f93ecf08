package daemon_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

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
	first = createOnFleet(t, c)
	onNode(t, n1, first)
	return control, n1, first
}

// createOnFleet creates a busybox sandbox on the fleet, retrying for up to
// 30 s while the control plane has no node to place it on yet.
func createOnFleet(t *testing.T, c *chalkcompute.Client, opts ...chalkcompute.CreateOption) *chalkcompute.Sandbox {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"), opts...)
		if err == nil {
			return sb
		}
		if time.Now().After(deadline) {
			t.Fatalf("create on the fleet: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // polling the control plane for the node's first heartbeat
	}
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
	putMCPProbe(t, ctx, a, b)

	// The SDK client in a, through both hops (see checkMCPClient).
	checkMCPClient(t, ctx, a, up, gwURL, cred)
	// Nothing of the credential is on the node (it never crosses the fleet channel).
	if out, err := exec.Command("grep", "-rlF", cred, n1.Dir).Output(); len(out) > 0 || err == nil {
		t.Fatalf("the credential is on the node: %s %v", out, err)
	}

	// Refusals and sessions, raw.
	if st, _, body := mcpRaw(t, a, "POST", gwURL, "-", mcpInit); st != "401" || !strings.Contains(body, "missing bearer token") {
		t.Fatalf("no token: %s %s", st, body)
	}
	checkMCPSessions(t, ctx, c, a, b, gwURL)
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

// TestFleetIdentityFiles: a sandbox on a fleet node gets the identity
// files the all-in-one daemon writes (the Chalk API token file named by
// CHALK_API_TOKEN_FILE, the AWS web identity token file and the GCP
// external account file), written by its node with tokens from the control
// plane's issuer: go-oidc verifies them for their audiences, the API token
// works through the node's /api, only root writes them, a restarted node
// process resumes their refresh, and the node removes them when the
// sandbox ends.
func TestFleetIdentityFiles(t *testing.T) {
	// The node restarts below: a node timeout well above its restart.
	control := chalktest.StartControl(t, "--node-timeout", "2m")
	n1 := chalktest.StartFleetNode(t, control, 1)
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)
	const role = "arn:aws:iam::123456789012:role/chalk-sandbox"
	const provider = "projects/123456/locations/global/workloadIdentityPools/chalk-pool/providers/chalk-oidc"
	sb := createOnFleet(t, c, chalkcompute.WithAWSRole(role), chalkcompute.WithGCPWorkloadProvider(provider))
	onNode(t, n1, sb)

	env := mustExec(t, sb, "env")
	for _, want := range []string{"CHALK_API_TOKEN_FILE=/run/chalk/identity/token", "CHALK_API_URL=http://169.254.169.254/api",
		"AWS_WEB_IDENTITY_TOKEN_FILE=/run/chalk/identity/aws-web-identity-token", "AWS_ROLE_ARN=" + role} {
		if !strings.Contains(env, want) {
			t.Errorf("node sandbox env lacks %q:\n%s", want, env)
		}
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", control.Socket)
	}}}
	octx := oidc.ClientContext(ctx, hc)
	p, err := oidc.NewProvider(octx, "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	for file, aud := range map[string]string{"token": "chalk-api", "aws-web-identity-token": "sts.amazonaws.com", "gcp-token": "//iam.googleapis.com/" + provider} {
		tok := mustExec(t, sb, "cat", "/run/chalk/identity/"+file)
		idt, err := p.Verifier(&oidc.Config{ClientID: aud}).Verify(octx, tok)
		if err != nil {
			t.Fatalf("go-oidc verify of %s: %v", file, err)
		}
		var claims map[string]any
		if err := idt.Claims(&claims); err != nil {
			t.Fatal(err)
		}
		if idt.Subject != "chalk:org:default:sbx:"+sb.ID() || claims["image_digest"] != sb.Info.ImageDigest || claims["network_policy"] == "" {
			t.Fatalf("claims of %s: sub=%s %v", file, idt.Subject, claims)
		}
	}
	if out := mustExec(t, sb, "cat", "/run/chalk/identity/gcp-credentials.json"); !strings.Contains(out, `"external_account"`) || !strings.Contains(out, "/run/chalk/identity/gcp-token") {
		t.Errorf("gcp credentials file: %q", out)
	}
	// The files are read-only in the sandbox.
	if res, err := sb.Exec(ctx, []string{"sh", "-c", "echo x > /run/chalk/identity/token"}); err != nil || res.Code == 0 {
		t.Errorf("the token file is writable in the sandbox: %v %+v", err, res)
	}
	// The API token works through the node's /api, as the sandbox.
	if code, out, errOut := apiFromSandbox(ctx, t, sb, "chalk.compute.v1.IdentityService/WhoAmI", "$CHALK_API_TOKEN_FILE"); code != 0 || !strings.Contains(out, sb.ID()) {
		t.Fatalf("/api with the token file: %d %q %q", code, out, errOut)
	}
	dir := filepath.Join(n1.Dir, "identity-files", sb.ID())
	if _, err := os.Stat(filepath.Join(dir, "files", "token")); err != nil {
		t.Fatalf("the node's identity dir: %v", err)
	}
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the node kept the identity dir of an ended sandbox")
		}
		time.Sleep(100 * time.Millisecond) // polling the node's teardown
	}

	sb2 := create(t, c)
	onNode(t, n1, sb2)
	// A restarted node process (kill -9) resumes the refresh: it writes
	// fresh tokens at once, which still verify.
	// (Every token differs: each has its own jti.)
	before := mustExec(t, sb2, "cat", "/run/chalk/identity/token")
	n1.Kill()
	n1.Restart()
	deadline = time.Now().Add(30 * time.Second)
	var after string
	for {
		res, err := sb2.Exec(ctx, []string{"cat", "/run/chalk/identity/token"})
		if err == nil && res.Code == 0 && string(res.Stdout) != before {
			after = string(res.Stdout)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted node did not refresh the token file: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // polling the node's restart and refresh
	}
	if _, err := p.Verifier(&oidc.Config{ClientID: "chalk-api"}).Verify(octx, after); err != nil {
		t.Fatalf("the token after the node's restart: %v", err)
	}
}

// TestFleetIngress: an exposed port of a sandbox on a fleet node is served
// by the control plane's ingress as in the all-in-one daemon (the same
// credential rules, host and path routing, HTTP/2, server-sent events
// event by event, WebSockets, large bodies), the control plane reaching the
// port through the sandbox's node (a NodeService.DialSandbox stream); the
// route ends with the sandbox.
func TestFleetIngress(t *testing.T) {
	control := chalktest.StartControl(t, "--ingress-domain", ingressDomain, "--ingress-tls-self-signed")
	n1 := chalktest.StartFleetNode(t, control, 1)
	c := control.Client()
	ctx := ctxT(t, 4*time.Minute)
	ic := newIngressClients(t, control)
	admin := control.Token()
	sb := createOnFleet(t, c)
	onNode(t, n1, sb)
	startIngressd(t, sb, 8080)
	mustExec(t, sb, "sh", "-c", "mkdir -p /www && echo 'busybox httpd here' > /www/index.html && httpd -p 8081 -h /www")
	priv, err := sb.Expose(ctx, 8080)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := sb.Expose(ctx, 8081, chalkcompute.Public())
	if err != nil {
		t.Fatal(err)
	}

	// Credentials: none, a bad key, a workload token, another org's key.
	for _, u := range []string{priv.Url, priv.PathUrl} {
		if code, _, _ := ic.get(t, u, ""); code != http.StatusUnauthorized {
			t.Fatalf("%s without a token: %d, want 401", u, code)
		}
	}
	if code, _, _ := ic.get(t, priv.Url, "chalk_notakey"); code != http.StatusUnauthorized {
		t.Fatalf("bad key: %d", code)
	}
	wtok, err := c.MintToken(ctx, sb.ID(), "chalk-api", 300)
	if err != nil {
		t.Fatal(err)
	}
	if code, _, _ := ic.get(t, priv.Url, wtok.Token); code == http.StatusOK {
		t.Fatal("a workload token opened a private route")
	}
	org, err := c.CreateOrg(ctx, "other", "olga")
	if err != nil {
		t.Fatal(err)
	}
	if code, _, _ := ic.get(t, priv.Url, org.AdminKey.Secret); code != http.StatusForbidden {
		t.Fatalf("other org's key: %d, want 403", code)
	}

	// An API key, HTTP/2, host and path routing; the key does not reach the sandbox.
	code, proto, body := ic.get(t, priv.Url+"echo?x=1", admin)
	if code != 200 || proto != 2 {
		t.Fatalf("host route: %d HTTP/%d %q", code, proto, body)
	}
	var seen struct {
		URI    string
		Header http.Header
	}
	if err := json.Unmarshal([]byte(body), &seen); err != nil {
		t.Fatal(err)
	}
	if seen.URI != "/echo?x=1" || seen.Header.Get("Authorization") != "" || seen.Header.Get("X-Forwarded-Proto") != "https" {
		t.Fatalf("the sandbox saw %+v", seen)
	}
	if code, _, body := ic.get(t, priv.PathUrl+"echo", admin); code != 200 || !strings.Contains(body, `"uri":"/echo"`) {
		t.Fatalf("path route: %d %q", code, body)
	}
	if code, _, body := ic.get(t, pub.Url, ""); code != 200 || body != "busybox httpd here\n" {
		t.Fatalf("public busybox httpd: %d %q", code, body)
	}
	// A large body arrives whole (flow controlled through the node).
	if code, _, body := ic.get(t, priv.Url+"bytes?n=4194304", admin); code != 200 || len(body) != 4<<20 || strings.Trim(body, "x") != "" {
		t.Fatalf("4 MiB body: %d, %d bytes", code, len(body))
	}

	// Server-sent events, one by one (the server waits for a release).
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(sctx, "GET", priv.Url+"sse", nil)
	req.Header.Set("Authorization", "Bearer "+admin)
	resp, err := ic.h2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(resp.Body)
	for i := 1; i <= 3; i++ {
		line, err := r.ReadString('\n')
		if err != nil || line != fmt.Sprintf("data: event %d\n", i) {
			t.Fatalf("event %d: %q %v", i, line, err)
		}
		_, _ = r.ReadString('\n')
		if code, _, _ := ic.get(t, priv.Url+"release", admin); code != 200 {
			t.Fatalf("release: %d", code)
		}
	}
	resp.Body.Close()

	// WebSockets.
	if _, err := ic.ws(sctx, priv.Url+"ws", ""); err == nil {
		t.Fatal("private WebSocket without credentials opened")
	}
	ws, err := ic.ws(sctx, priv.Url+"ws", admin)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := wsEcho(sctx, ws, fmt.Sprintf("ping %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	ws.CloseNow()

	// The route ends with the sandbox.
	if _, err := sb.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := ic.get(t, pub.Url, ""); code != http.StatusNotFound {
		t.Fatalf("after terminate: %d, want 404", code)
	}
}
