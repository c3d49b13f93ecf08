package metadata

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
)

func TestTokenRequests(t *testing.T) {
	env := newEnv(t, Config{DisableTokenCache: true})
	a := clientFrom(t, addrA)
	tests := []struct {
		name    string
		method  string
		query   string
		hdr     map[string]string
		status  int
		wantTTL time.Duration // for 200
	}{
		{"ok", "GET", "?audience=api", flavor, 200, identity.DefaultTTL},
		{"ttl", "GET", "?audience=api&ttl=60", flavor, 200, time.Minute},
		{"max ttl", "GET", "?audience=api&ttl=3600", flavor, 200, time.Hour},
		{"no flavor header", "GET", "?audience=api", nil, 403, 0},
		{"wrong flavor", "GET", "?audience=api", map[string]string{FlavorHeader: "Google"}, 403, 0},
		{"X-Forwarded-For", "GET", "?audience=api", map[string]string{FlavorHeader: FlavorValue, "X-Forwarded-For": "127.0.0.3"}, 403, 0},
		{"Forwarded", "GET", "?audience=api", map[string]string{FlavorHeader: FlavorValue, "Forwarded": "for=127.0.0.3"}, 403, 0},
		{"empty X-Forwarded-For", "GET", "?audience=api", map[string]string{FlavorHeader: FlavorValue, "X-Forwarded-For": ""}, 403, 0},
		{"no audience, no default", "GET", "", flavor, 400, 0},
		{"two audiences", "GET", "?audience=a&audience=b", flavor, 400, 0},
		{"comma audiences", "GET", "?audience=a,b", flavor, 400, 0},
		{"unknown parameter", "GET", "?audience=a&sandbox=sbx-b", flavor, 400, 0},
		{"ttl zero", "GET", "?audience=a&ttl=0", flavor, 400, 0},
		{"ttl over an hour", "GET", "?audience=a&ttl=3601", flavor, 400, 0},
		{"ttl not a number", "GET", "?audience=a&ttl=1h", flavor, 400, 0},
		{"POST", "POST", "?audience=api", flavor, 405, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := env.call(t, a, tt.method, TokenPath+tt.query, tt.hdr)
			if r.status != tt.status {
				t.Fatalf("status %d (%s), want %d", r.status, r.body, tt.status)
			}
			if tt.status != 200 {
				if strings.Contains(string(r.body), "eyJ") {
					t.Fatalf("refused response carries a token: %s", r.body)
				}
				return
			}
			var tr TokenResponse
			if err := json.Unmarshal(r.body, &tr); err != nil {
				t.Fatal(err)
			}
			c, err := env.iss.Verify(context.Background(), tr.Token, "api")
			if err != nil {
				t.Fatal(err)
			}
			if c.SandboxID != sandboxA.ID || c.Subject != "chalk:org:org-1:sbx:sbx-a" || c.ImageDigest != sandboxA.ImageDigest ||
				c.NetworkPolicy != sandboxA.NetworkPolicy || c.CreatedBy != sandboxA.CreatedBy {
				t.Fatalf("claims %+v, want sandbox A's", c)
			}
			if got := tr.ExpiresAt.Sub(env.clock.Now()); got != tt.wantTTL || !tr.ExpiresAt.Equal(c.Expiry) {
				t.Fatalf("expires_at %s (in %s), claims exp %s; want in %s", tr.ExpiresAt, got, c.Expiry, tt.wantTTL)
			}
		})
	}
}

// TestCallerIdentifiedByAddress: the source address alone decides who the
// caller is.
func TestCallerIdentifiedByAddress(t *testing.T) {
	env := newEnv(t, Config{DefaultAudience: "api"})
	ctx := context.Background()
	a, b, stranger := clientFrom(t, addrA), clientFrom(t, addrB), clientFrom(t, addrUnknown)

	ta, tb := env.token(t, a, ""), env.token(t, b, "")
	ca, err := env.iss.Verify(ctx, ta.Token, "api")
	if err != nil {
		t.Fatal(err)
	}
	cb, err := env.iss.Verify(ctx, tb.Token, "api")
	if err != nil {
		t.Fatal(err)
	}
	if ca.SandboxID != "sbx-a" || cb.SandboxID != "sbx-b" || ca.Subject == cb.Subject {
		t.Fatalf("A got %q (%s), B got %q (%s)", ca.SandboxID, ca.Subject, cb.SandboxID, cb.Subject)
	}

	for _, path := range []string{TokenPath + "?audience=api", IdentityPath, "/no/such/route"} {
		if r := env.call(t, stranger, "GET", path, flavor); r.status != 403 {
			t.Fatalf("unknown source address: GET %s = %d %s, want 403", path, r.status, r.body)
		}
	}

	// A stopped sandbox gets nothing, even with a stale resolver entry...
	stopped := sandboxB
	stopped.Running = false
	env.resolver.Set(addrB, stopped)
	env.md.Forget(sandboxB.ID)
	if r := env.call(t, b, "GET", TokenPath, flavor); r.status != 403 {
		t.Fatalf("stopped sandbox: %d %s, want 403", r.status, r.body)
	}
	// ...and one the issuer knows has ended cannot mint even if the
	// resolver still says running.
	env.resolver.Set(addrB, sandboxB)
	env.end(sandboxB.ID)
	if r := env.call(t, b, "GET", TokenPath, flavor); r.status != 403 {
		t.Fatalf("ended sandbox: %d %s, want 403", r.status, r.body)
	}
	if _, err := env.iss.Verify(ctx, tb.Token, "api"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("token of an ended sandbox: %v", err)
	}
	// Once the address is released, it is a stranger.
	env.resolver.Delete(addrB)
	if r := env.call(t, b, "GET", IdentityPath, flavor); r.status != 403 {
		t.Fatalf("released address: %d %s, want 403", r.status, r.body)
	}
}

func TestIdentityEndpoint(t *testing.T) {
	env := newEnv(t, Config{})
	a := clientFrom(t, addrA)
	if r := env.call(t, a, "GET", IdentityPath, nil); r.status != 403 {
		t.Fatalf("without the flavor header: %d", r.status)
	}
	r := env.call(t, a, "GET", IdentityPath, flavor)
	if r.status != 200 {
		t.Fatalf("%d %s", r.status, r.body)
	}
	var got IdentityResponse
	if err := json.Unmarshal(r.body, &got); err != nil {
		t.Fatal(err)
	}
	want := IdentityResponse{
		Subject: "chalk:org:org-1:sbx:sbx-a", OrgID: "org-1", SandboxID: "sbx-a", ImageDigest: "sha256:aaaa",
		NetworkPolicy: "sha256:pa", CreatedBy: "user:alice", Issuer: env.iss.URL(),
	}
	if got != want {
		t.Fatalf("identity = %+v, want %+v", got, want)
	}
}

// TestRelyingPartyThroughMetadata: go-oidc, fetching discovery and JWKS
// over HTTP, verifies a token obtained from the metadata service.
func TestRelyingPartyThroughMetadata(t *testing.T) {
	env := newEnv(t, Config{})
	tr := env.token(t, clientFrom(t, addrA), "?audience=sts.amazonaws.com")
	ctx := oidc.ClientContext(context.Background(), env.issSrv.Client())
	p, err := oidc.NewProvider(ctx, env.iss.URL())
	if err != nil {
		t.Fatal(err)
	}
	idt, err := p.VerifierContext(ctx, &oidc.Config{ClientID: "sts.amazonaws.com", Now: env.clock.Now}).Verify(ctx, tr.Token)
	if err != nil {
		t.Fatal(err)
	}
	if idt.Subject != "chalk:org:org-1:sbx:sbx-a" {
		t.Fatalf("sub = %q", idt.Subject)
	}
	// The same token is no good for another audience.
	if _, err := p.VerifierContext(ctx, &oidc.Config{ClientID: "vault", Now: env.clock.Now}).Verify(ctx, tr.Token); err == nil {
		t.Fatal("go-oidc accepted the token for another audience")
	}
}

func TestTokenCache(t *testing.T) {
	env := newEnv(t, Config{})
	a, b := clientFrom(t, addrA), clientFrom(t, addrB)
	t1 := env.token(t, a, "?audience=api")
	if t2 := env.token(t, a, "?audience=api"); t2 != t1 {
		t.Fatal("identical request within a quarter of the lifetime was not served from the cache")
	}
	if t3 := env.token(t, a, "?audience=other"); t3.Token == t1.Token {
		t.Fatal("another audience got the cached token")
	}
	if t4 := env.token(t, a, "?audience=api&ttl=600"); t4.Token == t1.Token {
		t.Fatal("another lifetime got the cached token")
	}
	if tb := env.token(t, b, "?audience=api"); tb.Token == t1.Token {
		t.Fatal("sandbox B got sandbox A's token")
	}
	// A changed identity (e.g. a new network policy) is a new token.
	changed := sandboxA
	changed.NetworkPolicy = "sha256:new"
	env.resolver.Set(addrA, changed)
	t5 := env.token(t, a, "?audience=api")
	if t5.Token == t1.Token {
		t.Fatal("changed network policy got the cached token")
	}
	c, err := env.iss.Verify(context.Background(), t5.Token, "api")
	if err != nil || c.NetworkPolicy != "sha256:new" {
		t.Fatalf("claims %+v, %v", c, err)
	}
	// Past a quarter of its lifetime a token is not handed out again.
	env.clock.Add(identity.DefaultTTL/4 + time.Second)
	t6 := env.token(t, a, "?audience=api")
	if t6.Token == t5.Token {
		t.Fatal("token older than a quarter of its lifetime was reused")
	}
	if left := t6.ExpiresAt.Sub(env.clock.Now()); left < identity.DefaultTTL*3/4 {
		t.Fatalf("served a token with %s left", left)
	}

	// Without the cache every request mints.
	nc := newEnv(t, Config{DisableTokenCache: true})
	ac := clientFrom(t, addrA)
	if nc.token(t, ac, "?audience=api") == nc.token(t, ac, "?audience=api") {
		t.Fatal("DisableTokenCache: identical tokens")
	}
}

func TestTokenCacheBounded(t *testing.T) {
	c := newTokenCache(2)
	now := time.Now()
	for i, aud := range []string{"a", "b", "c"} {
		c.put(cacheKey{sandboxID: "s", audience: aud}, aud, now, now.Add(time.Minute))
		if i < 2 && len(c.m) != i+1 || len(c.m) > 2 {
			t.Fatalf("cache holds %d entries after %d puts (max 2)", len(c.m), i+1)
		}
	}
	// Stale entries make room.
	later := now.Add(time.Minute)
	c.put(cacheKey{sandboxID: "s", audience: "d"}, "d", later, later.Add(time.Minute))
	if tok, _, ok := c.get(cacheKey{sandboxID: "s", audience: "d"}, later); !ok || tok != "d" {
		t.Fatal("fresh entry not cached after the stale ones expired")
	}
	c.forget("s")
	if len(c.m) != 0 {
		t.Fatalf("forget left %d entries", len(c.m))
	}
}

// TestExtraRoutes: routes added later see the identified caller; the
// flavor header can be waived per route, identification cannot.
func TestExtraRoutes(t *testing.T) {
	env := newEnv(t, Config{})
	echo := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sb, ok := CallerFrom(r.Context())
		if !ok {
			t.Error("handler called without a caller")
		}
		w.Write([]byte(sb.ID))
	})
	env.md.Handle("/mcp/", echo, WithoutFlavorHeader())
	env.md.Handle("GET /v1/tunnels", echo)
	a, stranger := clientFrom(t, addrA), clientFrom(t, addrUnknown)
	tests := []struct {
		name   string
		c      *http.Client
		path   string
		hdr    map[string]string
		status int
		body   string
	}{
		{"mcp without flavor", a, "/mcp/tools", nil, 200, "sbx-a"},
		{"mcp from stranger", stranger, "/mcp/tools", nil, 403, ""},
		{"mcp with XFF", a, "/mcp/tools", map[string]string{"X-Forwarded-For": "1.2.3.4"}, 403, ""},
		{"tunnels without flavor", a, "/v1/tunnels", nil, 403, ""},
		{"tunnels", a, "/v1/tunnels", flavor, 200, "sbx-a"},
		{"unknown route", a, "/v2/x", flavor, 404, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := env.call(t, tt.c, "GET", tt.path, tt.hdr)
			if r.status != tt.status || (tt.body != "" && string(r.body) != tt.body) {
				t.Fatalf("GET %s = %d %q, want %d %q", tt.path, r.status, r.body, tt.status, tt.body)
			}
		})
	}
}

func TestNewValidation(t *testing.T) {
	if _, err := New(Config{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("New without issuer and resolver = %v", err)
	}
}

// TestPolicyComputedPerToken: a resolver may leave the network_policy claim
// to PolicyNow, which runs when a token or the identity is asked for (each
// time: the claim follows the policy), and never for other routes; an error
// there refuses the token.
func TestPolicyComputedPerToken(t *testing.T) {
	env := newEnv(t, Config{})
	var mu sync.Mutex // the handlers run on the server's goroutines
	var calls int
	policy, fail := "sha256:p1", false
	set := func(p string, f bool) { mu.Lock(); policy, fail = p, f; mu.Unlock() }
	ran := func() int { mu.Lock(); defer mu.Unlock(); return calls }
	lazy := sandboxA
	lazy.NetworkPolicy = ""
	lazy.PolicyNow = func(context.Context) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if fail {
			return "", errors.New("store unavailable")
		}
		return policy, nil
	}
	env.resolver.Set(addrA, lazy)
	env.md.Handle("/v1/other", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sb, _ := CallerFrom(r.Context())
		writeJSON(w, map[string]string{"id": sb.ID})
	}))
	a := clientFrom(t, addrA)
	if r := env.call(t, a, "GET", "/v1/other", flavor); r.status != 200 || ran() != 0 {
		t.Fatalf("other route: %d %s, PolicyNow ran %d times, want 0", r.status, r.body, ran())
	}
	for _, p := range []string{"sha256:p1", "sha256:p2"} {
		set(p, false)
		c, err := env.iss.Verify(context.Background(), env.token(t, a, "?audience=api").Token, "api")
		if err != nil || c.NetworkPolicy != p {
			t.Fatalf("claims %+v, %v; want network_policy %s", c, err, p)
		}
		var got IdentityResponse
		if r := env.call(t, a, "GET", IdentityPath, flavor); r.status != 200 || json.Unmarshal(r.body, &got) != nil || got.NetworkPolicy != p {
			t.Fatalf("identity %d %s, want network_policy %s", r.status, r.body, p)
		}
	}
	set("sha256:p3", true)
	if r := env.call(t, a, "GET", TokenPath+"?audience=api", flavor); r.status != 500 || strings.Contains(string(r.body), "eyJ") {
		t.Fatalf("PolicyNow failing: %d %s, want 500 without a token", r.status, r.body)
	}
}
