package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/store"
)

// countingListener counts the bytes the server reads from its connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// stallingBody gives first bytes at once, then blocks until release is
// closed (or ctx ends): a server that reads the body before answering never
// answers.
type stallingBody struct {
	ctx     context.Context
	first   int
	release chan struct{}
}

func (b *stallingBody) Read(p []byte) (int, error) {
	if b.first > 0 {
		n := min(len(p), b.first)
		clear(p[:n])
		b.first -= n
		return n, nil
	}
	select {
	case <-b.release:
	case <-b.ctx.Done():
	}
	return 0, io.ErrUnexpectedEOF
}

type testAPI struct {
	s     *Server
	st    *store.Store
	admin string // admin token of org o1
	other string // member token of org o1
}

func newTestAPI(t *testing.T, cfg Config) *testAPI {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ta := &testAPI{st: st}
	now := time.Now()
	newKey := func(user string, role store.Role) (*store.APIKey, string) {
		secret, prefix, hash := NewKey()
		return &store.APIKey{ID: "key-" + user, Hash: hash, Prefix: prefix, OrgID: "o1", User: user, Name: user,
			Role: role, CreatedBy: user, CreatedAt: now}, secret
	}
	adminKey, adminSecret := newKey("user0", store.RoleAdmin)
	if err := st.CreateOrg(ctx, store.Org{Name: "o1", CreatedAt: now}, "user0", true, adminKey); err != nil {
		t.Fatal(err)
	}
	otherKey, otherSecret := newKey("user1", store.RoleMember)
	if err := st.AddMember(ctx, store.Member{OrgID: "o1", User: "user1", Role: store.RoleMember, CreatedAt: now}, otherKey); err != nil {
		t.Fatal(err)
	}
	ta.admin, ta.other = adminSecret, otherSecret
	cfg.Store = st
	ta.s = New(ctx, cfg)
	return ta
}

func post(t *testing.T, ctx context.Context, url, token string, length int64, body io.Reader) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, body)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = length
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return http.DefaultClient.Do(req)
}

// TestUnauthenticatedBodyNotRead: a 100 MiB WriteFile without a valid token
// is refused with 401 before the server reads its body (issue #14: each was
// read up to 65 MiB before the refusal). The client's body stalls after
// 1 MiB, so a server that reads it first would never answer.
func TestUnauthenticatedBodyNotRead(t *testing.T) {
	ta := newTestAPI(t, Config{})
	var read atomic.Int64
	srv := httptest.NewUnstartedServer(ta.s.Handler())
	srv.Listener = countingListener{srv.Listener, &read}
	srv.Start()
	defer srv.Close()
	for _, tc := range []struct{ name, token string }{{"none", ""}, {"wrong", "chalk_wrong"}, {"malformed jwt", "a.b.c"}} {
		t.Run(tc.name, func(t *testing.T) {
			read.Store(0)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			body := &stallingBody{ctx: ctx, first: 1 << 20, release: make(chan struct{})}
			defer close(body.release)
			resp, err := post(t, ctx, srv.URL+"/chalk.compute.v1.SandboxService/WriteFile", tc.token, 100<<20, body)
			if err != nil {
				t.Fatalf("no answer before the body was sent (server read %d bytes): %v", read.Load(), err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", resp.StatusCode)
			}
			if n := read.Load(); n > 64<<10 {
				t.Fatalf("server read %d bytes of an unauthenticated request", n)
			}
		})
	}
}

// TestInFlightBudget: one caller's body bytes in flight are bounded (429
// resource_exhausted, nothing read); another caller is unaffected; a body
// larger than any message is refused up front.
func TestInFlightBudget(t *testing.T) {
	ta := newTestAPI(t, Config{Limits: Limits{InFlightPerCaller: 1 << 20}})
	entered := make(chan struct{}, 4)
	hold := make(chan struct{})
	h := ta.s.guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-hold
		io.Copy(io.Discard, r.Body)
	}), nil)
	var read atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Listener = countingListener{srv.Listener, &read}
	srv.Start()
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	first := make(chan error, 1)
	go func() {
		resp, err := post(t, ctx, srv.URL+"/x", ta.admin, 800<<10, strings.NewReader(strings.Repeat("x", 800<<10)))
		if err == nil {
			resp.Body.Close()
		}
		first <- err
	}()
	<-entered // the first request holds 800 KiB of the admin's 1 MiB
	before := read.Load()
	stall := &stallingBody{ctx: ctx, release: make(chan struct{})}
	defer close(stall.release)
	resp, err := post(t, ctx, srv.URL+"/x", ta.admin, 800<<10, stall)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || !strings.Contains(string(b), "in flight") {
		t.Fatalf("second request of the same caller: %d %s", resp.StatusCode, b)
	}
	if n := read.Load() - before; n > 8<<10 {
		t.Fatalf("server read %d bytes of a refused request", n)
	}
	// Another caller has its own budget.
	other := make(chan error, 1)
	go func() {
		resp, err := post(t, ctx, srv.URL+"/x", ta.other, 800<<10, strings.NewReader(strings.Repeat("y", 800<<10)))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
		other <- err
	}()
	<-entered
	close(hold)
	for _, ch := range []chan error{first, other} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if n := ta.s.budget.InFlight("chalk:org:o1:user:user0"); n != 0 {
		t.Fatalf("%d bytes still charged after the requests ended", n)
	}
	// Larger than any message: refused whatever the budget.
	resp, err = post(t, ctx, srv.URL+"/x", ta.other, ta.s.maxMessage()+1, &stallingBody{ctx: ctx, release: stall.release})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("oversized body: %d", resp.StatusCode)
	}
}

func whoami(t *testing.T, h http.Handler, token string) int {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/chalk.compute.v1.IdentityService/WhoAmI", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code
}

// TestRevokedTokenRefusedAtOnce: a deleted token is refused by the next
// request (there was a one-minute cache).
func TestRevokedTokenRefusedAtOnce(t *testing.T) {
	ta := newTestAPI(t, Config{})
	h := ta.s.Handler()
	if code := whoami(t, h, ta.other); code != http.StatusOK {
		t.Fatalf("before revocation: %d", code)
	}
	if err := ta.st.RevokeKey(context.Background(), "o1", "key-user1", time.Now()); err != nil {
		t.Fatal(err)
	}
	if code := whoami(t, h, ta.other); code != http.StatusUnauthorized {
		t.Fatalf("after revocation: %d, want 401", code)
	}
	if code := whoami(t, h, ta.admin); code != http.StatusOK {
		t.Fatalf("another token after revocation: %d", code)
	}
}

type fakeWorkload struct{}

func (fakeWorkload) VerifyWorkload(_ context.Context, token string) (*Principal, error) {
	id, ok := strings.CutPrefix(token, "wl.")
	if !ok {
		return nil, errors.New("bad token")
	}
	id, _, _ = strings.Cut(id, ".")
	return &Principal{Kind: "workload", OrgID: "o1", SandboxID: id, Subject: "chalk:org:o1:sbx:" + id}, nil
}

// TestSandboxHandlerBindsWorkloadTokens: through the metadata service's /api,
// a workload token works only from the sandbox it was issued to.
func TestSandboxHandlerBindsWorkloadTokens(t *testing.T) {
	ta := newTestAPI(t, Config{Workload: fakeWorkload{}})
	from := func(id string) http.Handler {
		return ta.s.SandboxHandler(func(*http.Request) (string, bool) { return id, id != "" })
	}
	for _, tc := range []struct {
		name, token, caller string
		want                int
	}{
		{"own sandbox", "wl.sa.x", "sa", http.StatusOK},
		{"copied to another sandbox", "wl.sa.x", "sb", http.StatusUnauthorized},
		{"unknown caller", "wl.sa.x", "", http.StatusUnauthorized},
		{"user token", ta.other, "sb", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code := whoami(t, from(tc.caller), tc.token); code != tc.want {
				t.Fatalf("status %d, want %d", code, tc.want)
			}
		})
	}
	// The API's own listeners are not bound to a sandbox.
	if code := whoami(t, ta.s.Handler(), "wl.sa.x"); code != http.StatusOK {
		t.Fatalf("workload token on the API listener: %d", code)
	}
}

// TestRequireAdmin: /metrics and the like need an admin token.
func TestRequireAdmin(t *testing.T) {
	ta := newTestAPI(t, Config{Workload: fakeWorkload{}})
	h := ta.s.RequireAdmin(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "secret_metric 1\n") }))
	for _, tc := range []struct {
		name, token string
		want        int
	}{{"none", "", 401}, {"wrong", "chalk_x", 401}, {"member", ta.other, 403}, {"workload", "wl.sa.x", 403}, {"admin", ta.admin, 200}} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			w := httptest.NewRecorder()
			h.ServeHTTP(w, req)
			if w.Code != tc.want || (w.Code != 200) == strings.Contains(w.Body.String(), "secret_metric") {
				t.Fatalf("status %d body %q, want %d", w.Code, w.Body.String(), tc.want)
			}
		})
	}
}
