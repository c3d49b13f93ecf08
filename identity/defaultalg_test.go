package identity

import (
	"context"
	"slices"
	"strings"
	"testing"
)

// TestDefaultAlgES256: without Alg, a new key set is ES256 (current and
// next), discovery says so, and go-oidc verifies its tokens from the
// published discovery document and JWKS.
func TestDefaultAlgES256(t *testing.T) {
	env := newEnv(t, func(c *Config) { c.Alg = "" })
	ctx := context.Background()
	ks := env.iss.keys.Load()
	if ks.current.rec.Alg != AlgES256 || ks.next.rec.Alg != AlgES256 {
		t.Fatalf("default key set: current %s, next %s; want ES256, ES256", ks.current.rec.Alg, ks.next.rec.Alg)
	}
	if d := env.iss.Discovery(); !slices.Equal(d.IDTokenSigningAlgValuesSupported, []string{AlgES256}) {
		t.Fatalf("discovery algs = %v, want [ES256]", d.IDTokenSigningAlgValuesSupported)
	}
	for _, k := range env.iss.JWKS().Keys {
		if k.Algorithm != AlgES256 || !k.IsPublic() {
			t.Fatalf("JWK %s: alg %s public %v", k.KeyID, k.Algorithm, k.IsPublic())
		}
	}
	tok, _, err := env.iss.Mint(ctx, testSubject, "sts.amazonaws.com", 0)
	if err != nil {
		t.Fatal(err)
	}
	if hdr := decodeSegment(t, strings.Split(tok, ".")[0]); hdr["alg"] != AlgES256 {
		t.Fatalf("token alg %v, want ES256", hdr["alg"])
	}
	// go-oidc with the algorithms discovery advertises (what Kubernetes'
	// and Vault's verifiers do), and with ES256 named explicitly.
	for _, algs := range [][]string{nil, {AlgES256}} {
		if _, err := env.rpVerify(ctx, env.relyingParty(t, "sts.amazonaws.com", algs...), tok); err != nil {
			t.Fatalf("go-oidc (algs %v): %v", algs, err)
		}
	}
	if _, err := env.iss.Verify(ctx, tok, "sts.amazonaws.com"); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultAlgKeepsRS256Keys: an issuer whose keys are RS256 (made before
// ES256 was the default) restarted with the default keeps them all: the
// current RS256 key signs on and its tokens verify across the restart,
// the published RS256 next key is not replaced (it was published a whole
// period ahead) and takes over at the next rotation; only the keys made
// from then on are ES256, so the first ES256 key signs at the second
// rotation, having been published for a whole period. Every token minted
// on the way verifies until it expires, with our Verify and with go-oidc.
func TestDefaultAlgKeepsRS256Keys(t *testing.T) {
	env := newEnv(t) // RS256 keys
	ctx := context.Background()
	const aud = "vault"
	before := env.iss.keys.Load()
	tokOld, _, err := env.iss.Mint(ctx, testSubject, aud, 0)
	if err != nil {
		t.Fatal(err)
	}
	iss, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir, Now: env.clock.Now, IsActive: env.active.IsActive})
	if err != nil {
		t.Fatal(err)
	}
	env.iss = iss
	env.srv.Config.Handler = iss.DiscoveryHandler()
	ks := iss.keys.Load()
	if ks.current.rec.KID != before.current.rec.KID || ks.next.rec.KID != before.next.rec.KID || ks.next.rec.Alg != AlgRS256 {
		t.Fatalf("restart with the default changed the keys: current %s->%s, next %s (%s)->%s (%s)",
			before.current.rec.KID, ks.current.rec.KID, before.next.rec.KID, before.next.rec.Alg, ks.next.rec.KID, ks.next.rec.Alg)
	}
	mint := func(want string) string {
		t.Helper()
		tok, _, err := iss.Mint(ctx, testSubject, aud, 0)
		if err != nil {
			t.Fatal(err)
		}
		if hdr := decodeSegment(t, strings.Split(tok, ".")[0]); hdr["alg"] != want {
			t.Fatalf("token alg %v, want %s", hdr["alg"], want)
		}
		return tok
	}
	toks := []string{tokOld, mint(AlgRS256)}

	// First rotation: the RS256 next key signs, an ES256 key is published.
	if err := iss.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	ks = iss.keys.Load()
	if ks.current.rec.KID != before.next.rec.KID || ks.next.rec.Alg != AlgES256 {
		t.Fatalf("after the first rotation: current %s (want %s), next %s (want ES256)", ks.current.rec.KID, before.next.rec.KID, ks.next.rec.Alg)
	}
	esKID := ks.next.rec.KID
	toks = append(toks, mint(AlgRS256))
	// Second rotation: the ES256 key, published a rotation ago, signs.
	if err := iss.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if ks = iss.keys.Load(); ks.current.rec.KID != esKID || ks.next.rec.Alg != AlgES256 {
		t.Fatalf("after the second rotation: current %s (want %s), next %s", ks.current.rec.KID, esKID, ks.next.rec.Alg)
	}
	toks = append(toks, mint(AlgES256))
	if d := iss.Discovery(); !slices.Equal(d.IDTokenSigningAlgValuesSupported, []string{AlgES256, AlgRS256}) {
		t.Fatalf("discovery algs = %v, want ES256 and the retired keys' RS256", d.IDTokenSigningAlgValuesSupported)
	}
	rp := env.relyingParty(t, aud)
	for i, tok := range toks {
		if _, err := iss.Verify(ctx, tok, aud); err != nil {
			t.Fatalf("token %d: %v", i, err)
		}
		if _, err := env.rpVerify(ctx, rp, tok); err != nil {
			t.Fatalf("token %d, go-oidc: %v", i, err)
		}
	}
}
