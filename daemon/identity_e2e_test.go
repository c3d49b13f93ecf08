package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// fetchToken gets a token from inside the sandbox through the metadata service.
func fetchToken(t *testing.T, sb *chalkcompute.Sandbox, audience string) string {
	t.Helper()
	out := mustExec(t, sb, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk",
		"http://169.254.169.254/v1/identity/token?audience="+audience)
	var resp struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil || resp.Token == "" {
		t.Fatalf("token response %q: %v", out, err)
	}
	return resp.Token
}

// TestWorkloadIdentity: a token minted inside a real sandbox through the
// metadata service verifies with go-oidc as a relying party fetching
// discovery and JWKS from chalkd; claims are per sandbox; the sandbox acts as
// itself toward the API and never as its creator.
func TestWorkloadIdentity(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	a := create(t, c)
	b := create(t, c)

	tokA := fetchToken(t, a, "https://vault.example.test")
	tokB := fetchToken(t, b, "https://vault.example.test")
	if tokA == tokB {
		t.Fatal("two sandboxes got the same token")
	}
	// go-oidc, as any relying party would, over HTTP to chalkd (its unix socket).
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", n.Socket)
	}}}
	octx := oidc.ClientContext(ctx, hc)
	provider, err := oidc.NewProvider(octx, "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	verifier := provider.Verifier(&oidc.Config{ClientID: "https://vault.example.test"})
	idt, err := verifier.Verify(octx, tokA)
	if err != nil {
		t.Fatalf("go-oidc verify: %v", err)
	}
	var claims map[string]any
	if err := idt.Claims(&claims); err != nil {
		t.Fatal(err)
	}
	if idt.Subject != "chalk:org:default:sbx:"+a.ID() || claims["sandbox_id"] != a.ID() || claims["image_digest"] == "" || claims["created_by"] == "" {
		t.Fatalf("claims: sub=%s %v", idt.Subject, claims)
	}
	if _, err := provider.Verifier(&oidc.Config{ClientID: "other"}).Verify(octx, tokA); err == nil {
		t.Fatal("wrong audience accepted")
	}
	// Without the header the metadata service refuses.
	res, err := a.Exec(ctx, []string{"wget", "-q", "-O-", "http://169.254.169.254/v1/identity/token?audience=x"})
	if err != nil || res.Code == 0 {
		t.Fatalf("token without Metadata-Flavor: %v %+v", err, res)
	}
	// The chalk CLI inside the sandbox authenticates as the sandbox itself.
	out := mustExec(t, a, "chalk", "whoami", "-o", "json")
	var who map[string]string
	if err := json.Unmarshal([]byte(out), &who); err != nil || who["kind"] != "workload" || who["sandbox_id"] != a.ID() {
		t.Fatalf("whoami in sandbox: %q %v", out, err)
	}
	// It may read itself but not its sibling, and may not create sandboxes.
	if _, _, err := execCode(ctx, a, "chalk", "compute", "sandbox", "get", a.ID()); err != nil {
		t.Fatalf("get self: %v", err)
	}
	if code, stderr, _ := execCode(ctx, a, "chalk", "compute", "sandbox", "get", b.ID()); code == 0 || !strings.Contains(stderr, "may only see itself") {
		t.Fatalf("get sibling: code %d %q", code, stderr)
	}
	if code, stderr, _ := execCode(ctx, a, "chalk", "compute", "sandbox", "create", "--image", "busybox"); code == 0 || !strings.Contains(stderr, "only users") {
		t.Fatalf("create from inside: code %d %q", code, stderr)
	}
	// No delegate credentials: the admin token appears nowhere in the sandbox.
	// The pattern goes in a file so that no command line of ours carries it.
	if err := a.WriteFile(ctx, "/tmp/probe/pattern", []byte(n.Token()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	probe := "grep -rlF -f /tmp/probe/pattern / --exclude-dir=proc --exclude-dir=sys --exclude-dir=probe 2>/dev/null; " +
		"for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do tr '\\0' '\\n' < $f 2>/dev/null; done | grep -cF -f /tmp/probe/pattern || true"
	if out := mustExec(t, a, "sh", "-c", probe); strings.TrimSpace(out) != "0" {
		t.Fatalf("admin token visible in the sandbox: %q", out)
	}
	// A token for the API from sandbox A, used directly: works while A runs,
	// refused once A has ended.
	apiTok := strings.TrimSpace(mustExec(t, a, "sh", "-c", "cat $CHALK_API_TOKEN_FILE"))
	wc, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(apiTok))
	if err != nil {
		t.Fatal(err)
	}
	if w, err := wc.WhoAmI(ctx); err != nil || w.SandboxId != a.ID() {
		t.Fatalf("workload whoami: %v %v", w, err)
	}
	if _, err := wc.Sandbox(ctx, b.ID()); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("A's token used for B: %v", err)
	}
	if _, err := a.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := wc.WhoAmI(ctx); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("token of an ended sandbox: %v", err)
	}
	if _, err := c.MintToken(ctx, a.ID(), "aud", 0); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("mint for an ended sandbox: %v", err)
	}
}

// execCode runs argv and returns its exit code and stderr.
func execCode(ctx context.Context, sb *chalkcompute.Sandbox, argv ...string) (int, string, error) {
	res, err := sb.Exec(ctx, argv)
	if err != nil {
		return -1, "", err
	}
	if res.Code != 0 {
		return res.Code, string(res.Stderr), errors.New(string(res.Stderr))
	}
	return 0, string(res.Stderr), nil
}
