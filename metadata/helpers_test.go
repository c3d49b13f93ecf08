package metadata

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/identity"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
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

// Source addresses of the two test sandboxes and of a stranger; all are on
// the loopback interface, so real TCP connections carry them.
var (
	addrA       = netip.MustParseAddr("127.0.0.2")
	addrB       = netip.MustParseAddr("127.0.0.3")
	addrUnknown = netip.MustParseAddr("127.0.0.9")
)

var (
	sandboxA = Sandbox{ID: "sbx-a", OrgID: "org-1", ImageDigest: "sha256:aaaa", NetworkPolicy: "sha256:pa", CreatedBy: "user:alice", Running: true}
	sandboxB = Sandbox{ID: "sbx-b", OrgID: "org-1", ImageDigest: "sha256:bbbb", NetworkPolicy: "sha256:pb", CreatedBy: "user:bob", Running: true}
)

type testEnv struct {
	iss      *identity.Issuer
	issSrv   *httptest.Server // serves discovery and JWKS at the issuer URL
	clock    *fakeClock
	resolver *StaticResolver
	md       *Server
	mdSrv    *httptest.Server
	mu       sync.Mutex
	ended    map[string]bool
}

func newEnv(t testing.TB, cfg Config) *testEnv {
	t.Helper()
	env := &testEnv{
		clock:    &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)},
		resolver: &StaticResolver{},
		ended:    map[string]bool{},
	}
	env.issSrv = httptest.NewUnstartedServer(nil)
	iss, err := identity.New(context.Background(), identity.Config{
		Issuer: "http://" + env.issSrv.Listener.Addr().String(),
		Dir:    t.TempDir(),
		Now:    env.clock.Now,
		IsActive: func(_ context.Context, id string) bool {
			env.mu.Lock()
			defer env.mu.Unlock()
			return !env.ended[id]
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	env.iss = iss
	env.issSrv.Config.Handler = iss.DiscoveryHandler()
	env.issSrv.Start()
	t.Cleanup(env.issSrv.Close)

	env.resolver.Set(addrA, sandboxA)
	env.resolver.Set(addrB, sandboxB)
	cfg.Issuer, cfg.Resolver = iss, env.resolver
	md, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	env.md = md
	env.mdSrv = httptest.NewServer(md)
	t.Cleanup(env.mdSrv.Close)
	return env
}

func (e *testEnv) end(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ended[id] = true
}

// clientFrom returns an HTTP client whose connections originate from src.
func clientFrom(t testing.TB, src netip.Addr) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
	tr := &http.Transport{DialContext: d.DialContext}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

type response struct {
	status int
	body   []byte
}

// call makes a request to the metadata service from src.
func (e *testEnv) call(t testing.TB, c *http.Client, method, path string, hdr map[string]string) response {
	t.Helper()
	req, err := http.NewRequest(method, e.mdSrv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{resp.StatusCode, b}
}

var flavor = map[string]string{FlavorHeader: FlavorValue}

func (e *testEnv) token(t testing.TB, c *http.Client, query string) TokenResponse {
	t.Helper()
	r := e.call(t, c, "GET", TokenPath+query, flavor)
	if r.status != 200 {
		t.Fatalf("GET %s%s = %d %s", TokenPath, query, r.status, r.body)
	}
	var tr TokenResponse
	if err := json.Unmarshal(r.body, &tr); err != nil {
		t.Fatal(err)
	}
	return tr
}
