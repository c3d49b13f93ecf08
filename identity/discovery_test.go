package identity

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

func TestDiscoveryHandler(t *testing.T) {
	env := newEnv(t)
	get := func(t *testing.T, method, path string) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, env.srv.URL+path, nil)
		resp, err := env.srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}

	resp, body := get(t, "GET", DiscoveryPath)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("discovery: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	var doc map[string]any
	if err := json.Unmarshal(body, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"issuer":                                env.iss.URL(),
		"jwks_uri":                              env.iss.URL() + JWKSPath,
		"response_types_supported":              []any{"id_token"},
		"subject_types_supported":               []any{"public"},
		"id_token_signing_alg_values_supported": []any{"RS256"},
	}
	for k, v := range want {
		if got, _ := json.Marshal(doc[k]); string(got) != mustJSON(v) {
			t.Errorf("discovery %s = %s, want %s", k, got, mustJSON(v))
		}
	}
	var claims []string
	for _, c := range doc["claims_supported"].([]any) {
		claims = append(claims, c.(string))
	}
	for _, c := range []string{"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "org_id", "sandbox_id", "image_digest", "network_policy", "created_by"} {
		if !slices.Contains(claims, c) {
			t.Errorf("claims_supported lacks %s", c)
		}
	}

	resp, body = get(t, "GET", JWKSPath)
	if resp.StatusCode != 200 {
		t.Fatalf("jwks: %s", resp.Status)
	}
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 2 {
		t.Fatalf("JWKS has %d keys, want current and next", len(set.Keys))
	}
	for _, k := range set.Keys {
		if k["kty"] != "RSA" || k["alg"] != "RS256" || k["use"] != "sig" || k["kid"] == "" || k["n"] == nil || k["e"] != "AQAB" {
			t.Errorf("JWK %v lacks kty/alg/use/kid/n/e", k)
		}
		for _, private := range []string{"d", "p", "q", "dp", "dq", "qi"} {
			if _, ok := k[private]; ok {
				t.Fatalf("JWKS publishes private parameter %q", private)
			}
		}
	}
	if strings.Contains(string(body), `"d"`) {
		t.Fatal("JWKS body contains a private exponent")
	}

	for _, tt := range []struct {
		method, path string
		status       int
	}{
		{"HEAD", DiscoveryPath, 200},
		{"POST", DiscoveryPath, 405},
		{"PUT", JWKSPath, 405},
		{"GET", "/.well-known/other", 404},
		{"GET", "/", 404},
	} {
		if resp, _ := get(t, tt.method, tt.path); resp.StatusCode != tt.status {
			t.Errorf("%s %s = %d, want %d", tt.method, tt.path, resp.StatusCode, tt.status)
		}
	}
}

// TestDiscoveryIssuerPath: an issuer with a path serves its documents both
// under the path and, behind a prefix-stripping proxy, without it.
func TestDiscoveryIssuerPath(t *testing.T) {
	iss, err := New(context.Background(), Config{Issuer: "https://id.example.com/chalk/", Dir: t.TempDir(), Alg: AlgES256})
	if err != nil {
		t.Fatal(err)
	}
	if iss.URL() != "https://id.example.com/chalk" {
		t.Fatalf("URL() = %q", iss.URL())
	}
	h := iss.DiscoveryHandler()
	for _, path := range []string{"/chalk" + DiscoveryPath, DiscoveryPath} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		var d Discovery
		if err := json.Unmarshal(rec.Body.Bytes(), &d); rec.Code != 200 || err != nil {
			t.Fatalf("GET %s: %d %v", path, rec.Code, err)
		}
		if d.Issuer != "https://id.example.com/chalk" || d.JWKSURI != "https://id.example.com/chalk/.well-known/jwks.json" ||
			!slices.Equal(d.IDTokenSigningAlgValuesSupported, []string{"ES256"}) {
			t.Fatalf("GET %s: %+v", path, d)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/chalk"+JWKSPath, nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"crv": "P-256"`) {
		t.Fatalf("JWKS: %d %s", rec.Code, rec.Body.String())
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
