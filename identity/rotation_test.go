package identity

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestRelyingPartyGoOIDC: go-oidc fetches discovery and JWKS over HTTP and
// verifies tokens of both algorithms.
func TestRelyingPartyGoOIDC(t *testing.T) {
	for _, alg := range []string{AlgRS256, AlgES256} {
		t.Run(alg, func(t *testing.T) {
			env := newEnv(t, func(c *Config) { c.Alg = alg })
			ctx := context.Background()
			tok, _, err := env.iss.Mint(ctx, testSubject, "vault", 0)
			if err != nil {
				t.Fatal(err)
			}
			rp := env.relyingParty(t, "vault")
			idt, err := env.rpVerify(ctx, rp, tok)
			if err != nil {
				t.Fatalf("go-oidc: %v", err)
			}
			var extra struct {
				OrgID         string `json:"org_id"`
				SandboxID     string `json:"sandbox_id"`
				ImageDigest   string `json:"image_digest"`
				NetworkPolicy string `json:"network_policy"`
				CreatedBy     string `json:"created_by"`
			}
			if err := idt.Claims(&extra); err != nil {
				t.Fatal(err)
			}
			if idt.Issuer != env.iss.URL() || idt.Subject != "chalk:org:org-a:sbx:sbx-1" || !slices.Equal(idt.Audience, []string{"vault"}) ||
				extra.SandboxID != "sbx-1" || extra.OrgID != "org-a" || extra.ImageDigest != testSubject.ImageDigest ||
				extra.NetworkPolicy != testSubject.NetworkPolicy || extra.CreatedBy != "user:alice" {
				t.Fatalf("go-oidc claims: %+v %+v", idt, extra)
			}
			if _, err := env.iss.Verify(ctx, tok, "vault"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRotation walks a key through its life: published before it signs,
// signing, retired but verifying until its last token expired, unpublished.
// A relying party that cached the JWKS before the rotation keeps working.
func TestRotation(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	const aud = "sts.amazonaws.com"
	rp := env.relyingParty(t, aud)
	ks0 := env.iss.keys.Load()
	oldKID, nextKID := ks0.current.rec.KID, ks0.next.rec.KID
	if got := kids(env.iss); !slices.Contains(got, nextKID) {
		t.Fatalf("next key %s is not published before it signs: %v", nextKID, got)
	}
	// Warm the relying party's key cache with the pre-rotation JWKS.
	oldTok, _, err := env.iss.Mint(ctx, testSubject, aud, MaxTTL)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.rpVerify(ctx, rp, oldTok); err != nil {
		t.Fatal(err)
	}
	// The next key cannot sign tokens that Verify accepts before it is
	// promoted.
	if _, ok := ks0.verify[nextKID]; ok {
		t.Fatal("next key is accepted by Verify before it signs")
	}

	env.clock.Add(10 * time.Minute)
	// The last token the old key signs, with the longest lifetime.
	lastOldTok, _, err := env.iss.Mint(ctx, testSubject, aud, MaxTTL)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.iss.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	retiredAt := env.clock.Now()
	newTok, _, err := env.iss.Mint(ctx, testSubject, aud, 0)
	if err != nil {
		t.Fatal(err)
	}
	if kid := env.iss.keys.Load().current.rec.KID; kid != nextKID {
		t.Fatalf("after rotation the signing key is %s, want the pre-published %s", kid, nextKID)
	}
	if !strings.HasPrefix(newTok, env.iss.keys.Load().current.header+".") {
		t.Fatal("new token is not signed by the new key")
	}
	newNext := env.iss.keys.Load().next.rec.KID
	if got := kids(env.iss); !slices.Equal(got, []string{nextKID, newNext, oldKID}) {
		t.Fatalf("JWKS after rotation = %v, want [current %s, next %s, retired %s]", got, nextKID, newNext, oldKID)
	}
	for _, tok := range []string{oldTok, newTok} {
		if _, err := env.iss.Verify(ctx, tok, aud); err != nil {
			t.Fatalf("Verify after rotation: %v", err)
		}
		if _, err := env.rpVerify(ctx, rp, tok); err != nil {
			t.Fatalf("go-oidc with a pre-rotation key cache: %v", err)
		}
	}

	// The retired key stays while tokens it signed can still be valid (it
	// signed until retiredAt, tokens live MaxTTL, verifiers allow Leeway)...
	env.clock.Add(MaxTTL + Leeway - time.Second)
	if err := env.iss.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(kids(env.iss), oldKID) {
		t.Fatal("retired key unpublished while a token it signed is within its lifetime + leeway")
	}
	if _, err := env.iss.Verify(ctx, lastOldTok, aud); err != nil {
		t.Fatalf("the old key's last token, expired but within leeway: %v", err)
	}
	// ...and goes once every token it signed has expired.
	env.clock.Add(2 * time.Second)
	if err := env.iss.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if got := kids(env.iss); slices.Contains(got, oldKID) || len(got) != 2 {
		t.Fatalf("JWKS %v still holds the retired key %s after its tokens expired", got, oldKID)
	}
	if _, err := env.iss.Verify(ctx, lastOldTok, aud); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("token of an unpublished key: %v", err)
	}
	if !retiredAt.Add(MaxTTL + Leeway).Before(env.clock.Now()) {
		t.Fatal("test bug: clock not past the retired key's last expiry")
	}
}

// TestScheduledRotation: Maintain rotates on schedule, and Run drives it.
func TestScheduledRotation(t *testing.T) {
	env := newEnv(t, func(c *Config) { c.RotateEvery = time.Hour })
	ctx := context.Background()
	k0 := env.iss.keys.Load().current.rec.KID
	env.clock.Add(time.Hour - time.Second)
	if err := env.iss.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if env.iss.keys.Load().current.rec.KID != k0 {
		t.Fatal("rotated before the period elapsed")
	}
	env.clock.Add(time.Second)
	if err := env.iss.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	k1 := env.iss.keys.Load().current.rec.KID
	if k1 == k0 {
		t.Fatal("did not rotate after the period")
	}

	// Run applies the same schedule on its own.
	env.iss.tick = 5 * time.Millisecond
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- env.iss.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	env.clock.Add(time.Hour)
	deadline := time.Now().Add(10 * time.Second)
	for env.iss.keys.Load().current.rec.KID == k1 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not rotate within 10s")
		}
		time.Sleep(5 * time.Millisecond) // polling an external condition with a deadline
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v, want context.Canceled", err)
	}
	done <- nil // for the cleanup

	// A restart after a long outage rotates at once.
	env.clock.Add(3 * time.Hour)
	again, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir, Now: env.clock.Now, RotateEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !again.keys.Load().current.rec.Activated.Equal(env.clock.Now()) {
		t.Fatal("restart after an overdue rotation did not rotate")
	}
}

// TestRotationDuringVerification verifies tokens from many goroutines
// while keys rotate: a token stays valid across any number of rotations
// within its lifetime.
func TestRotationDuringVerification(t *testing.T) {
	env := newEnv(t, func(c *Config) { c.Alg = AlgES256 }) // cheap key generation
	ctx := context.Background()
	const aud = "api"
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 16)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				tok, _, err := env.iss.Mint(ctx, testSubject, aud, 0)
				if err == nil {
					_, err = env.iss.Verify(ctx, tok, aud)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var toks []string
	for r := 0; r < 20; r++ {
		tok, _, err := env.iss.Mint(ctx, testSubject, aud, 0)
		if err != nil {
			t.Fatal(err)
		}
		toks = append(toks, tok)
		if err := env.iss.Rotate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("verification failed during rotation: %v", err)
	}
	for i, tok := range toks {
		if _, err := env.iss.Verify(ctx, tok, aud); err != nil {
			t.Fatalf("token %d (20 rotations ago at most): %v", i, err)
		}
	}
	if got := len(env.iss.JWKS().Keys); got != 22 {
		t.Fatalf("JWKS holds %d keys, want current + next + 20 retired", got)
	}
	// Once the clock passes every token's lifetime, all retired keys go.
	env.clock.Add(MaxTTL + Leeway + time.Second)
	if err := env.iss.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if got := len(env.iss.JWKS().Keys); got != 2 {
		t.Fatalf("JWKS holds %d keys after expiry, want 2", got)
	}
	if _, err := env.iss.Verify(ctx, toks[0], aud); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("expired token of an unpublished key: %v", err)
	}
}

// TestAlgChange: switching Alg keeps the current key signing until the
// next rotation, which then signs with the new algorithm.
func TestAlgChange(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	tokRSA, _, err := env.iss.Mint(ctx, testSubject, "api", 0)
	if err != nil {
		t.Fatal(err)
	}
	es, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir, Now: env.clock.Now, Alg: AlgES256})
	if err != nil {
		t.Fatal(err)
	}
	ks := es.keys.Load()
	if ks.current.rec.Alg != AlgRS256 || ks.next.rec.Alg != AlgES256 {
		t.Fatalf("after switching to ES256: current %s, next %s; want RS256, ES256", ks.current.rec.Alg, ks.next.rec.Alg)
	}
	if d := es.Discovery(); !slices.Equal(d.IDTokenSigningAlgValuesSupported, []string{AlgRS256, AlgES256}) {
		t.Fatalf("discovery algs = %v", d.IDTokenSigningAlgValuesSupported)
	}
	if err := es.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	tokES, _, err := es.Mint(ctx, testSubject, "api", 0)
	if err != nil {
		t.Fatal(err)
	}
	if hdr := decodeSegment(t, strings.Split(tokES, ".")[0]); hdr["alg"] != AlgES256 {
		t.Fatalf("token after rotation has alg %v, want ES256", hdr["alg"])
	}
	for _, tok := range []string{tokRSA, tokES} {
		if _, err := es.Verify(ctx, tok, "api"); err != nil {
			t.Fatal(err)
		}
	}
}

// TestReplicasShareKeys: two issuers on one key directory (control-plane
// replicas): after the leader rotates, the follower's Run reloads the keys,
// so it publishes the same JWKS and verifies the leader's new tokens, and
// its own tokens verify on the leader. A follower never rotates.
func TestReplicasShareKeys(t *testing.T) {
	var aLeads atomic.Bool
	aLeads.Store(true)
	env := newEnv(t, func(c *Config) { c.Leading = aLeads.Load })
	ctx := context.Background()
	follower, err := New(ctx, Config{Issuer: env.iss.URL(), Dir: env.dir, Now: env.clock.Now, IsActive: env.active.IsActive,
		Leading: func() bool { return false }, RotateEvery: MinRotateEvery})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = follower.Run(runCtx) }()
	if err := env.iss.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	want := strings.Join(kids(env.iss), ",")
	deadline := time.Now().Add(30 * time.Second)
	for strings.Join(kids(follower), ",") != want {
		if time.Now().After(deadline) {
			t.Fatalf("the follower publishes %v after the leader rotated, want %s", kids(follower), want)
		}
		time.Sleep(10 * time.Millisecond) // polling the follower's Run
	}
	tok, _, err := env.iss.Mint(ctx, testSubject, "vault", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := follower.Verify(ctx, tok, "vault"); err != nil {
		t.Fatalf("the follower refuses the leader's token after a rotation: %v", err)
	}
	ftok, _, err := follower.Mint(ctx, testSubject, "vault", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := env.iss.Verify(ctx, ftok, "vault"); err != nil {
		t.Fatalf("the leader refuses the follower's token: %v", err)
	}
	// Long past its rotation time, the follower still does not rotate.
	env.clock.Add(10 * MinRotateEvery)
	before := strings.Join(kids(follower), ",")
	if err := follower.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(kids(follower), ","); got != before {
		t.Fatalf("keys changed without the leader: %s -> %s", before, got)
	}
}
