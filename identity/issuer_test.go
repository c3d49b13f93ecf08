package identity

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestValidateIssuerURL(t *testing.T) {
	tests := []struct {
		in   string
		want string // "" means rejected
	}{
		{"https://id.example.com", "https://id.example.com"},
		{"https://id.example.com/", "https://id.example.com"},
		{"https://id.example.com/chalk", "https://id.example.com/chalk"},
		{"https://id.example.com:8443/chalk/", "https://id.example.com:8443/chalk"},
		{"http://127.0.0.1:8080", "http://127.0.0.1:8080"},
		{"http://localhost:8080", "http://localhost:8080"},
		{"http://[::1]:8080", "http://[::1]:8080"},
		{"http://id.example.com", ""},
		{"http://10.0.0.1", ""},
		{"https://id.example.com?x=1", ""},
		{"https://id.example.com?", ""},
		{"https://id.example.com#frag", ""},
		{"https://id.example.com#", ""},
		{"https://user:pw@id.example.com", ""},
		{"ftp://id.example.com", ""},
		{"id.example.com", ""},
		{"https://", ""},
		{"", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ValidateIssuerURL(tt.in)
			if tt.want == "" {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("ValidateIssuerURL(%q) = %q, %v; want ErrInvalidArgument", tt.in, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ValidateIssuerURL(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestSubjectFor(t *testing.T) {
	long := strings.Repeat("a", MaxIDLen)
	tests := []struct {
		org, sbx string
		want     string
	}{
		{"org-1", "sbx-1", "chalk:org:org-1:sbx:sbx-1"},
		{"O_r.g", "0123456789abcdef", "chalk:org:O_r.g:sbx:0123456789abcdef"},
		{long, long, "chalk:org:" + long + ":sbx:" + long},
		{long + "a", "sbx", ""},
		{"org", long + "a", ""},
		{"", "sbx", ""},
		{"org", "", ""},
		{"org:x", "sbx", ""},
		{"org", "sbx:sbx:y", ""},
		{"org", "sbx/1", ""},
		{"org", "sbx 1", ""},
		{"örg", "sbx", ""},
	}
	for _, tt := range tests {
		t.Run(tt.org+"/"+tt.sbx, func(t *testing.T) {
			got := SubjectFor(tt.org, tt.sbx)
			if got != tt.want {
				t.Fatalf("SubjectFor(%q, %q) = %q, want %q", tt.org, tt.sbx, got, tt.want)
			}
			if len(got) > MaxSubjectLen {
				t.Fatalf("subject is %d bytes, max %d", len(got), MaxSubjectLen)
			}
			if got == "" {
				if err := CheckIDs(tt.org, tt.sbx); !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("CheckIDs = %v, want ErrInvalidArgument", err)
				}
				return
			}
			org, sbx, err := ParseSubject(got)
			if err != nil || org != tt.org || sbx != tt.sbx {
				t.Fatalf("ParseSubject(%q) = %q, %q, %v", got, org, sbx, err)
			}
		})
	}
	if _, _, err := ParseSubject("chalk:org:a:sbx:b:sbx:c"); err == nil {
		t.Fatal("ParseSubject accepted a subject with two sandbox parts")
	}
}

// decodeSegment returns the JSON object in a token segment.
func decodeSegment(t *testing.T, seg string) map[string]any {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestMintAndVerify(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	now := env.clock.Now()
	tok, exp, err := env.iss.Mint(ctx, testSubject, "sts.amazonaws.com", 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Add(DefaultTTL); !exp.Equal(want) {
		t.Fatalf("exp = %s, want %s (default lifetime)", exp, want)
	}
	parts := strings.Split(tok, ".")
	hdr := decodeSegment(t, parts[0])
	kid := env.iss.keys.Load().current.rec.KID
	if hdr["alg"] != "RS256" || hdr["kid"] != kid || hdr["typ"] != "JWT" || len(hdr) != 3 {
		t.Fatalf("header = %v, want exactly alg RS256, kid %s, typ JWT", hdr, kid)
	}
	if parts[0] != env.iss.keys.Load().current.header {
		t.Fatalf("minted header %q differs from the precomputed %q (fast path would miss)", parts[0], env.iss.keys.Load().current.header)
	}
	payload := decodeSegment(t, parts[1])
	want := map[string]any{
		"iss": env.iss.URL(), "sub": "chalk:org:org-a:sbx:sbx-1", "aud": "sts.amazonaws.com",
		"exp": float64(now.Add(DefaultTTL).Unix()), "iat": float64(now.Unix()), "nbf": float64(now.Unix()),
		"org_id": "org-a", "sandbox_id": "sbx-1", "image_digest": testSubject.ImageDigest,
		"network_policy": testSubject.NetworkPolicy, "created_by": "user:alice",
	}
	for k, v := range want {
		if payload[k] != v {
			t.Errorf("claim %s = %v, want %v", k, payload[k], v)
		}
	}
	if jti, _ := payload["jti"].(string); len(jti) < 16 {
		t.Errorf("jti = %q, want a random id", jti)
	}
	if len(payload) != len(want)+1 {
		t.Errorf("payload has %d claims, want %d: %v", len(payload), len(want)+1, payload)
	}

	c, err := env.iss.Verify(ctx, tok, "sts.amazonaws.com")
	if err != nil {
		t.Fatal(err)
	}
	wantC := Claims{
		Issuer: env.iss.URL(), Subject: "chalk:org:org-a:sbx:sbx-1", Audience: "sts.amazonaws.com",
		Expiry: now.Add(DefaultTTL), IssuedAt: now, NotBefore: now, ID: payload["jti"].(string),
		OrgID: "org-a", SandboxID: "sbx-1", ImageDigest: testSubject.ImageDigest,
		NetworkPolicy: testSubject.NetworkPolicy, CreatedBy: "user:alice",
	}
	if c.Expiry.Equal(wantC.Expiry) && c.IssuedAt.Equal(wantC.IssuedAt) && c.NotBefore.Equal(wantC.NotBefore) {
		c.Expiry, c.IssuedAt, c.NotBefore = wantC.Expiry, wantC.IssuedAt, wantC.NotBefore
	}
	if *c != wantC {
		t.Fatalf("Verify claims = %+v\nwant %+v", *c, wantC)
	}

	// Two tokens for the same subject differ (jti), and two sandboxes get
	// different subjects.
	tok2, _, err := env.iss.Mint(ctx, testSubject, "sts.amazonaws.com", 0)
	if err != nil || tok2 == tok {
		t.Fatalf("second mint: %v (identical: %v)", err, tok2 == tok)
	}
	other := testSubject
	other.SandboxID = "sbx-2"
	tokB, _, err := env.iss.Mint(ctx, other, "sts.amazonaws.com", 0)
	if err != nil {
		t.Fatal(err)
	}
	cB, err := env.iss.Verify(ctx, tokB, "sts.amazonaws.com")
	if err != nil || cB.Subject == c.Subject || cB.SandboxID != "sbx-2" {
		t.Fatalf("sandbox B verified as %+v, %v", cB, err)
	}
	// Sandbox A's token presented as B (or as A in another org) is refused.
	for _, tt := range []struct {
		org, sbx string
		ok       bool
	}{
		{"org-a", "sbx-1", true},
		{"org-a", "sbx-2", false},
		{"org-b", "sbx-1", false},
	} {
		err := c.CheckSandbox(tt.org, tt.sbx)
		if tt.ok != (err == nil) || (err != nil && !errors.Is(err, errdefs.ErrPermissionDenied)) {
			t.Fatalf("A's claims CheckSandbox(%s, %s) = %v", tt.org, tt.sbx, err)
		}
	}
	if err := (*Claims)(nil).CheckSandbox("org-a", "sbx-1"); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("nil claims: %v", err)
	}
}

func TestMintArguments(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	long := strings.Repeat("x", 257)
	tests := []struct {
		name    string
		mutate  func(*Subject)
		aud     string
		ttl     time.Duration
		wantErr error
		wantTTL time.Duration
	}{
		{name: "default ttl", aud: "a", wantTTL: DefaultTTL},
		{name: "max ttl", aud: "a", ttl: MaxTTL, wantTTL: MaxTTL},
		{name: "one second", aud: "a", ttl: time.Second, wantTTL: time.Second},
		{name: "over max ttl", aud: "a", ttl: MaxTTL + time.Second, wantErr: errdefs.ErrInvalidArgument},
		{name: "negative ttl", aud: "a", ttl: -time.Minute, wantErr: errdefs.ErrInvalidArgument},
		{name: "sub-second ttl", aud: "a", ttl: time.Millisecond, wantErr: errdefs.ErrInvalidArgument},
		{name: "no audience", aud: "", wantErr: errdefs.ErrInvalidArgument},
		{name: "two audiences", aud: "a,b", wantErr: errdefs.ErrInvalidArgument},
		{name: "audience with space", aud: "a b", wantErr: errdefs.ErrInvalidArgument},
		{name: "audience too long", aud: strings.Repeat("a", 513), wantErr: errdefs.ErrInvalidArgument},
		{name: "url audience", aud: "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x", wantTTL: DefaultTTL},
		{name: "bad org", mutate: func(s *Subject) { s.OrgID = "a:b" }, aud: "a", wantErr: errdefs.ErrInvalidArgument},
		{name: "no sandbox", mutate: func(s *Subject) { s.SandboxID = "" }, aud: "a", wantErr: errdefs.ErrInvalidArgument},
		{name: "huge created_by", mutate: func(s *Subject) { s.CreatedBy = long }, aud: "a", wantErr: errdefs.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := testSubject
			if tt.mutate != nil {
				tt.mutate(&s)
			}
			tok, exp, err := env.iss.Mint(ctx, s, tt.aud, tt.ttl)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || tok != "" {
					t.Fatalf("Mint = %q, %v; want %v", tok, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := exp.Sub(env.clock.Now()); got != tt.wantTTL {
				t.Fatalf("lifetime %s, want %s", got, tt.wantTTL)
			}
			if _, err := env.iss.Verify(ctx, tok, tt.aud); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestEndedSandbox(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	tok, _, err := env.iss.Mint(ctx, testSubject, "api", 0)
	if err != nil {
		t.Fatal(err)
	}
	env.active.End(testSubject.SandboxID)
	if _, err := env.iss.Verify(ctx, tok, "api"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("Verify of an ended sandbox's token = %v, want ErrUnauthenticated", err)
	}
	if _, _, err := env.iss.Mint(ctx, testSubject, "api", 0); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Mint for an ended sandbox = %v, want ErrFailedPrecondition", err)
	}
	other := testSubject
	other.SandboxID = "sbx-still-running"
	if _, _, err := env.iss.Mint(ctx, other, "api", 0); err != nil {
		t.Fatalf("Mint for a running sandbox: %v", err)
	}
}

func TestKeysPersisted(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	st, err := os.Stat(filepath.Join(env.dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600", st.Mode().Perm())
	}
	if st, err := os.Stat(env.dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("key dir mode %v (%v), want 0700", st.Mode().Perm(), err)
	}
	tok, _, err := env.iss.Mint(ctx, testSubject, "api", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.iss.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	before := kids(env.iss)
	// The retired key's private half is gone from disk; the others keep it.
	raw, err := os.ReadFile(filepath.Join(env.dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Keys []struct {
			Retired string         `json:"retired"`
			JWK     map[string]any `json:"jwk"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil || len(doc.Keys) != 3 {
		t.Fatalf("key file: %d keys, %v", len(doc.Keys), err)
	}
	for _, k := range doc.Keys {
		if _, private := k.JWK["d"]; private != (k.Retired == "") {
			t.Fatalf("key %v (retired %q): private exponent present = %v", k.JWK["kid"], k.Retired, private)
		}
	}

	// Loosen the mode: a restart restores 0600.
	if err := os.Chmod(filepath.Join(env.dir, KeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	again, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir, Now: env.clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	if got := kids(again); strings.Join(got, ",") != strings.Join(before, ",") {
		t.Fatalf("after restart JWKS kids = %v, want %v", got, before)
	}
	if _, err := again.Verify(ctx, tok, "api"); err != nil {
		t.Fatalf("token minted before restart (by the now retired key): %v", err)
	}
	if again.keys.Load().current.rec.KID != env.iss.keys.Load().current.rec.KID {
		t.Fatal("restart changed the current key")
	}
	if st, _ := os.Stat(filepath.Join(env.dir, KeyFile)); st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode after restart %v, want 0600", st.Mode().Perm())
	}
	// No temp files are left behind.
	ents, _ := os.ReadDir(env.dir)
	if len(ents) != 1 {
		t.Fatalf("key dir holds %d entries, want only %s", len(ents), KeyFile)
	}

	// A corrupt key file is an error, not a silent new identity.
	if err := os.WriteFile(filepath.Join(env.dir, KeyFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("New with a corrupt key file = %v, want ErrInvalidArgument", err)
	}
}

func kids(i *Issuer) []string {
	var out []string
	for _, k := range i.JWKS().Keys {
		out = append(out, k.KeyID)
	}
	return out
}

func TestConfigValidation(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		cfg  Config
	}{
		{"no issuer", Config{Dir: dir}},
		{"http issuer", Config{Issuer: "http://id.example.com", Dir: dir}},
		{"no dir", Config{Issuer: "https://id.example.com"}},
		{"bad alg", Config{Issuer: "https://id.example.com", Dir: dir, Alg: "HS256"}},
		{"alg none", Config{Issuer: "https://id.example.com", Dir: dir, Alg: "none"}},
		{"rotation too fast", Config{Issuer: "https://id.example.com", Dir: dir, RotateEvery: time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(context.Background(), tt.cfg); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("New = %v, want ErrInvalidArgument", err)
			}
		})
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("invalid configs wrote %d files", len(ents))
	}
}
