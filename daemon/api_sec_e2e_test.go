package daemon_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// claimsOf decodes a JWT's payload (the tests check claims, not signatures:
// identity_e2e_test.go verifies those with go-oidc).
func claimsOf(t *testing.T, tok string) map[string]any {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %q", tok)
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// apiFromSandbox calls an RPC through the sandbox's metadata /api route with
// the token in the sandbox file tokFile ("" for none), as an attacker in the
// sandbox would, and returns the exit code, stdout and stderr of wget.
func apiFromSandbox(ctx context.Context, t *testing.T, sb *chalkcompute.Sandbox, rpc, tokFile string) (int, string, string) {
	t.Helper()
	auth := ""
	if tokFile != "" {
		auth = `--header "Authorization: Bearer $(cat ` + tokFile + `)"`
	}
	script := `wget -q -O- --header 'Content-Type: application/json' ` + auth + ` --post-data '{}' http://169.254.169.254/api/` + rpc
	res, err := sb.Exec(ctx, []string{"sh", "-c", script})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	return res.Code, string(res.Stdout), string(res.Stderr)
}

// TestAPISecurity is issue #14, attacked from inside real sandboxes and from
// the host (one node for every part: they are independent).
func TestAPISecurity(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 4*time.Minute)
	a := create(t, c)
	b := create(t, c)

	// 1. A 100 MiB WriteFile without a token, through the metadata /api:
	// the headers alone are sent, the body never is; the answer is 401 at
	// once. (Before, chalkd read up to 65 MiB of each body and only then
	// refused: waiting for this body, it never answered 401.)
	t.Run("body not read before authentication", func(t *testing.T) {
		script := `printf 'POST /api/chalk.compute.v1.SandboxService/WriteFile HTTP/1.1\r\nHost: 169.254.169.254\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n' | nc 169.254.169.254 80 | head -1`
		out := mustExec(t, a, "sh", "-c", script)
		if !strings.HasPrefix(out, "HTTP/1.1 401") {
			t.Fatalf("status line %q, want 401 before any body byte", out)
		}
	})

	// 2. A sandbox opening 70 keep-alive connections to its metadata
	// service gets 64 (metadata.Limits.ConnsPerSandbox); the others are
	// refused at accept. Meanwhile another sandbox is served.
	t.Run("connections per sandbox", func(t *testing.T) {
		hog := create(t, c) // its connections stay open until it ends
		const script = `mkfifo /tmp/lines /tmp/hold
exec 3<>/tmp/lines 4<>/tmp/hold
i=0
while [ $i -lt 70 ]; do
  i=$((i+1))
  ( (printf 'GET /v1/identity HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata-Flavor: chalk\r\n\r\n'; cat /tmp/hold) |
    nc 169.254.169.254 80 | { IFS= read -r l; echo "x$l" >&3; cat >/dev/null; } ) &
done
ok=0; refused=0; i=0
while [ $i -lt 70 ]; do
  i=$((i+1)); IFS= read -r l <&3
  case "$l" in *" 200 "*) ok=$((ok+1));; *) refused=$((refused+1));; esac
done
echo "ok=$ok refused=$refused"
cat /tmp/hold`
		pr, pw := io.Pipe()
		proc, err := hog.Start(ctx, []string{"sh", "-c", script}, chalkcompute.Stdout(pw))
		if err != nil {
			t.Fatal(err)
		}
		defer proc.Signal(ctx, "KILL")
		line := make(chan string, 1)
		go func() {
			l, _ := bufio.NewReader(pr).ReadString('\n')
			line <- strings.TrimSpace(l)
		}()
		select {
		case l := <-line:
			if l != "ok=64 refused=6" {
				t.Fatalf("70 connections from one sandbox: %q, want 64 served", l)
			}
		case <-ctx.Done():
			t.Fatal("no tally from the sandbox")
		}
		// The hog's 64 connections are open: B is served, the hog is not.
		if out := mustExec(t, b, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, b.ID()) {
			t.Fatalf("B while the hog holds its cap: %q", out)
		}
		if res, err := hog.Exec(ctx, []string{"wget", "-q", "-O-", "-T", "5", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"}); err != nil || res.Code == 0 {
			t.Fatalf("a 65th connection of the hog was served: %v %+v", err, res)
		}
	})

	// 4. A's chalk-api token, copied into B, is refused through B's
	// metadata /api; B's own token and A's from A work.
	t.Run("workload token bound to its sandbox", func(t *testing.T) {
		tokA := strings.TrimSpace(mustExec(t, a, "sh", "-c", "cat $CHALK_API_TOKEN_FILE"))
		if err := b.WriteFile(ctx, "/tmp/stolen", []byte(tokA), 0o600); err != nil {
			t.Fatal(err)
		}
		const whoami = "chalk.compute.v1.IdentityService/WhoAmI"
		if code, out, errOut := apiFromSandbox(ctx, t, b, whoami, "/tmp/stolen"); code == 0 || !strings.Contains(errOut, "401") {
			t.Fatalf("A's token from B: exit %d %q %q", code, out, errOut)
		}
		if code, out, errOut := apiFromSandbox(ctx, t, b, whoami, "$CHALK_API_TOKEN_FILE"); code != 0 || !strings.Contains(out, b.ID()) {
			t.Fatalf("B's own token: exit %d %q %q", code, out, errOut)
		}
		if code, out, errOut := apiFromSandbox(ctx, t, a, whoami, "$CHALK_API_TOKEN_FILE"); code != 0 || !strings.Contains(out, a.ID()) {
			t.Fatalf("A's own token: exit %d %q %q", code, out, errOut)
		}
	})

	// 3. /metrics needs the admin token on the API listeners and is not
	// reachable from sandboxes at all.
	t.Run("metrics", func(t *testing.T) {
		hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", n.Socket)
		}}}
		for _, tc := range []struct {
			token string
			want  int
		}{{"", 401}, {"chalk_wrong", 401}, {n.Token(), 200}} {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://chalkd/metrics", nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("/metrics with token %.8q: %d, want %d", tc.token, resp.StatusCode, tc.want)
			}
		}
		for _, script := range []string{
			"wget -q -O- --header 'Metadata-Flavor: chalk' http://169.254.169.254/metrics",
			"wget -q -O- http://169.254.169.254/api/metrics",
			`wget -q -O- --header "Authorization: Bearer $(cat $CHALK_API_TOKEN_FILE)" http://169.254.169.254/api/metrics`,
		} {
			res, err := a.Exec(ctx, []string{"sh", "-c", script})
			if err != nil {
				t.Fatal(err)
			}
			if res.Code == 0 || strings.Contains(string(res.Stdout), "go_goroutines") {
				t.Fatalf("%s from a sandbox: exit %d %q", script, res.Code, res.Stdout)
			}
		}
	})

	// 5. A deleted token is refused by the next request, on the API socket
	// and through the metadata /api.
	t.Run("revocation at once", func(t *testing.T) {
		key, err := c.CreateKey(ctx, "revokee")
		if err != nil {
			t.Fatal(err)
		}
		secret := key.Secret
		uc, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(secret))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := uc.WhoAmI(ctx); err != nil {
			t.Fatalf("before revocation: %v", err)
		}
		if err := a.WriteFile(ctx, "/tmp/usertok", []byte(secret), 0o600); err != nil {
			t.Fatal(err)
		}
		const whoami = "chalk.compute.v1.IdentityService/WhoAmI"
		if code, _, errOut := apiFromSandbox(ctx, t, a, whoami, "/tmp/usertok"); code != 0 {
			t.Fatalf("user token through the metadata /api before revocation: %q", errOut)
		}
		if _, err := c.RevokeKey(ctx, key.Id); err != nil {
			t.Fatal(err)
		}
		if _, err := uc.WhoAmI(ctx); !errors.Is(err, errdefs.ErrUnauthenticated) {
			t.Fatalf("deleted token on the API socket: %v", err)
		}
		if code, _, errOut := apiFromSandbox(ctx, t, a, whoami, "/tmp/usertok"); code == 0 || !strings.Contains(errOut, "401") {
			t.Fatalf("deleted token through the metadata /api: %q", errOut)
		}
	})

	// 6. The network_policy claim is the hash of the policies bound now:
	// updating a bound policy changes it in the next token, by every path.
	t.Run("network_policy claim follows the policy", func(t *testing.T) {
		if _, err := c.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "sec-claim", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"one.example.com"}}); err != nil {
			t.Fatal(err)
		}
		p := create(t, c, chalkcompute.WithNetworkPolicyNames("sec-claim"))
		claim := func() (fromMetadata, fromAPI, identityDoc string) {
			t.Helper()
			fromMetadata, _ = claimsOf(t, fetchToken(t, p, "https://sec.example.test"))["network_policy"].(string)
			m, err := c.MintToken(ctx, p.ID(), "https://sec.example.test", 0)
			if err != nil {
				t.Fatal(err)
			}
			fromAPI, _ = claimsOf(t, m.Token)["network_policy"].(string)
			var doc map[string]string
			out := mustExec(t, p, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity")
			if err := json.Unmarshal([]byte(out), &doc); err != nil {
				t.Fatal(err)
			}
			return fromMetadata, fromAPI, doc["network_policy"]
		}
		m1, a1, d1 := claim()
		if !strings.HasPrefix(m1, "sha256:") || a1 != m1 || d1 != m1 {
			t.Fatalf("claims before the update: metadata %q, API %q, /v1/identity %q", m1, a1, d1)
		}
		if _, err := c.UpdatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "sec-claim", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"one.example.com", "two.example.com"}}); err != nil {
			t.Fatal(err)
		}
		m2, a2, d2 := claim()
		if m2 == m1 || !strings.HasPrefix(m2, "sha256:") || a2 != m2 || d2 != m2 {
			t.Fatalf("claims after the update: metadata %q, API %q, /v1/identity %q (before: %q)", m2, a2, d2, m1)
		}
		// Unrestricted egress is a hash too (docs/IDENTITY.md), not "allow-all".
		if free, _ := claimsOf(t, fetchToken(t, a, "https://sec.example.test"))["network_policy"].(string); !strings.HasPrefix(free, "sha256:") || free == m1 {
			t.Fatalf("claim of a sandbox without policy: %q", free)
		}
	})
}
