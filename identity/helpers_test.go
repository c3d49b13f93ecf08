package identity

import (
	"context"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
)

// fakeClock is a settable clock for Config.Now.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// activeSet is a Config.IsActive backed by a set of ended sandboxes.
type activeSet struct {
	mu    sync.Mutex
	ended map[string]bool
}

func (a *activeSet) IsActive(_ context.Context, id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return !a.ended[id]
}

func (a *activeSet) End(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ended == nil {
		a.ended = make(map[string]bool)
	}
	a.ended[id] = true
}

// testEnv is an Issuer served over HTTP at its own issuer URL
// (http://127.0.0.1:port), with a fake clock.
type testEnv struct {
	iss    *Issuer
	clock  *fakeClock
	active *activeSet
	srv    *httptest.Server
	dir    string
}

type envOpt func(*Config)

func newEnv(t testing.TB, opts ...envOpt) *testEnv {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	env := &testEnv{clock: newFakeClock(), active: &activeSet{}, srv: srv, dir: t.TempDir()}
	cfg := Config{
		Issuer:   "http://" + srv.Listener.Addr().String(),
		Dir:      env.dir,
		Now:      env.clock.Now,
		IsActive: env.active.IsActive,
		// These tests were written for RS256 keys, the default before
		// ES256 (TestDefaultAlg* test the default).
		Alg: AlgRS256,
	}
	for _, o := range opts {
		o(&cfg)
	}
	iss, err := New(context.Background(), cfg)
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	env.iss = iss
	srv.Config.Handler = iss.DiscoveryHandler()
	srv.Start()
	t.Cleanup(srv.Close)
	return env
}

// relyingParty returns a go-oidc verifier for audience that fetched the
// discovery document and keys over HTTP, with its clock tied to the env's.
func (e *testEnv) relyingParty(t testing.TB, audience string, algs ...string) *oidc.IDTokenVerifier {
	t.Helper()
	ctx := oidc.ClientContext(context.Background(), e.srv.Client())
	p, err := oidc.NewProvider(ctx, e.iss.URL())
	if err != nil {
		t.Fatalf("go-oidc discovery: %v", err)
	}
	return p.VerifierContext(ctx, &oidc.Config{ClientID: audience, Now: e.clock.Now, SupportedSigningAlgs: algs})
}

func (e *testEnv) rpVerify(ctx context.Context, v *oidc.IDTokenVerifier, tok string) (*oidc.IDToken, error) {
	return v.Verify(oidc.ClientContext(ctx, e.srv.Client()), tok)
}

var testSubject = Subject{
	OrgID:         "org-a",
	SandboxID:     "sbx-1",
	ImageDigest:   "sha256:1111111111111111111111111111111111111111111111111111111111111111",
	NetworkPolicy: "sha256:2222222222222222222222222222222222222222222222222222222222222222",
	CreatedBy:     "user:alice",
}
