package daemon

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/ingress"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestIngressSetup: the signing key is made once (0600) and kept; a given
// certificate serves HTTPS with URLs from the domain and the listener's port.
func TestIngressSetup(t *testing.T) {
	dir := t.TempDir()
	k1, err := loadOrMakeKey(filepath.Join(dir, "ingress.key"))
	if err != nil {
		t.Fatal(err)
	}
	k2, err := loadOrMakeKey(filepath.Join(dir, "ingress.key"))
	if err != nil || !bytes.Equal(k1, k2) || len(k1) != 32 {
		t.Fatalf("key not kept: %x %x %v", k1, k2, err)
	}
	if st, err := os.Stat(filepath.Join(dir, "ingress.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st.Mode(), err)
	}
	// A certificate "given" by the operator (made here by selfSigned).
	if _, err := selfSigned(filepath.Join(dir, "given"), "apps.example.test"); err != nil {
		t.Fatal(err)
	}
	cfg := &Config{DataDir: dir, Ingress: IngressConfig{
		Listen: "127.0.0.1:0", Domain: "apps.example.test",
		TLSCert: filepath.Join(dir, "given", "cert.pem"), TLSKey: filepath.Join(dir, "given", "key.pem"),
	}}
	if err := cfg.defaults(); err != nil {
		t.Fatal(err)
	}
	n, err := newIngress(cfg, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	if n.tls == nil || len(n.tls.Certificates) != 1 {
		t.Fatal("given certificate not loaded")
	}
	host, path := n.URLs("sb-00ff", 8080)
	_, port, _ := net.SplitHostPort(n.ln.Addr().String())
	if host != "https://8080-sb-00ff.apps.example.test:"+port+"/" || path != "https://apps.example.test:"+port+"/s/sb-00ff/8080/" {
		t.Fatalf("URLs %q %q", host, path)
	}
	cfg.Ingress.TLSKey = filepath.Join(dir, "missing.pem")
	if _, err := newIngress(cfg, nil, nil, nil); err == nil {
		t.Fatal("a missing key file was accepted")
	}
}

// fakeWorkload accepts the token "work.load.token" as sandbox sb-1's.
type fakeWorkload struct{}

func (fakeWorkload) VerifyWorkload(_ context.Context, tok string) (*api.Principal, error) {
	if tok != "work.load.token" {
		return nil, errors.New("bad token")
	}
	return &api.Principal{Kind: "workload", OrgID: "org-a", SandboxID: "sb-1"}, nil
}

// TestIngressAuthWithoutTheAPI: the ingress checks keys with the
// authenticator alone (built before the API server): a key gives its org,
// at once refused once revoked; workload tokens and made-up keys open
// nothing.
func TestIngressAuthWithoutTheAPI(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	keys := map[string]*store.APIKey{}
	secrets := map[string]string{}
	for _, org := range []string{"org-a", "org-b"} {
		secret, prefix, hash := api.NewKey()
		k := &store.APIKey{ID: "key-" + org, Hash: hash, Prefix: prefix, OrgID: org, User: "ada", Name: "k", Role: store.RoleMember, CreatedBy: "ada", CreatedAt: time.Now()}
		if err := st.CreateOrg(ctx, store.Org{Name: org, CreatedAt: time.Now()}, "ada", false, k); err != nil {
			t.Fatal(err)
		}
		keys[org], secrets[org] = k, secret
	}
	check := ingressAuth(api.NewAuthenticator(st, fakeWorkload{}))
	for org, secret := range secrets {
		if got, err := check(ctx, "Bearer "+secret); err != nil || got != org {
			t.Fatalf("key of %s: %q %v", org, got, err)
		}
	}
	if _, err := check(ctx, "Bearer work.load.token"); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("a valid workload token: %v, want PermissionDenied", err)
	}
	if _, err := check(ctx, "Bearer other.work.load"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("an invalid workload token: %v", err)
	}
	if _, err := check(ctx, "Bearer chalk_madeup"); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("a made-up key: %v", err)
	}
	if err := st.RevokeKey(ctx, "org-a", keys["org-a"].ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := check(ctx, "Bearer "+secrets["org-a"]); !errors.Is(err, errdefs.ErrUnauthenticated) {
		t.Fatalf("a revoked key: %v", err)
	}
}

// TestExposuresKeptForReadoption: with a lost grace (a control plane), the
// exposures of a sandbox recorded lost within it are kept by the prune (at
// a start, and the leader's every 30 s) and by its Ended hook, so a
// re-adoption serves them again; those of a sandbox lost longer ago, ended
// otherwise, or gone are deleted, and a running one's are returned to
// route. lostFinal deletes a kept one. Without a grace a loss keeps
// nothing.
func TestExposuresKeptForReadoption(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now().UTC()
	mk := func(id, state, reason string, ended time.Time) {
		t.Helper()
		sb := &store.Sandbox{ID: id, OrgID: "o", State: store.StateRunning, Slot: 1, Node: "n1", Pid: 7, IP: "10.0.0.2", CreatedAt: now}
		if err := st.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
		if state != store.StateRunning {
			sb.State, sb.EndReason, sb.EndedAt = state, reason, ended
			if ok, err := st.EndSandbox(ctx, sb); err != nil || !ok {
				t.Fatal(ok, err)
			}
		}
		if err := st.PutExposure(ctx, &store.Exposure{SandboxID: id, Port: 8080, OrgID: "o"}); err != nil {
			t.Fatal(err)
		}
	}
	mk("running", store.StateRunning, "", time.Time{})
	mk("lost", store.StateStopped, "lost", now)
	mk("lost-long-ago", store.StateStopped, "lost", now.Add(-time.Hour))
	mk("exited", store.StateStopped, "exited", now)
	if err := st.PutExposure(ctx, &store.Exposure{SandboxID: "no-record", Port: 1, OrgID: "o"}); err != nil {
		t.Fatal(err)
	}
	n := &ingressNode{store: st, lostGrace: 5 * time.Minute}
	routes, err := n.prune(ctx, func(id string) bool { return id == "running" })
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 1 {
		t.Fatalf("routes: %v, want the running sandbox's", routes)
	}
	for e, addr := range routes {
		if e.SandboxID != "running" || addr.String() != "10.0.0.2" {
			t.Fatalf("route %+v at %v", e, addr)
		}
	}
	has := func(id string) bool {
		es, err := st.ListExposures(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		return len(es) > 0
	}
	for id, want := range map[string]bool{"running": true, "lost": true, "lost-long-ago": false, "exited": false, "no-record": false} {
		if has(id) != want {
			t.Errorf("exposures of %s kept: %v, want %v", id, !want, want)
		}
	}
	if n.srv, err = ingress.New(ingress.Config{BaseURL: "http://127.0.0.1:7449", Key: make([]byte, 32),
		Authenticate: func(context.Context, string) (string, error) { return "", errdefs.ErrPermissionDenied }}); err != nil {
		t.Fatal(err)
	}
	// The Ended hook keeps a lost sandbox's, deletes another's.
	n.ended(ctx, &store.Sandbox{ID: "lost", State: store.StateStopped, EndReason: "lost"})
	n.ended(ctx, &store.Sandbox{ID: "running", State: store.StateStopped, EndReason: "exited"})
	if !has("lost") || has("running") {
		t.Errorf("after the Ended hook: lost's kept %v (want true), running's kept %v (want false)", has("lost"), has("running"))
	}
	// lostFinal (the node answered without it) deletes them.
	n.lostFinal(ctx, "lost")
	if has("lost") {
		t.Error("exposures of a sandbox whose loss is final kept")
	}
	// Without a grace, a lost sandbox's exposures go at the prune.
	mk("lost-2", store.StateStopped, "lost", now)
	n.lostGrace = 0
	if _, err := n.prune(ctx, func(string) bool { return false }); err != nil {
		t.Fatal(err)
	}
	if has("lost-2") {
		t.Error("exposures of a lost sandbox kept without a grace")
	}
}

// TestPruneKeepsUnreadable: an exposure whose sandbox record cannot be
// read (a store error, not a missing record) is kept and reported, not
// deleted: the leader's prune runs every 30 s, and a failing store must not
// cut every exposed URL. A missing record still deletes.
func TestPruneKeepsUnreadable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "chalk.db")
	st, err := store.Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sb := &store.Sandbox{ID: "unreadable", OrgID: "o", State: store.StateRunning, Slot: 1, Node: "n1", Pid: 7, IP: "10.0.0.2", CreatedAt: time.Now()}
	if err := st.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"unreadable", "no-record"} {
		if err := st.PutExposure(ctx, &store.Exposure{SandboxID: id, Port: 8080, OrgID: "o"}); err != nil {
			t.Fatal(err)
		}
	}
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `UPDATE sandboxes SET doc = '{' WHERE id = 'unreadable'`); err != nil {
		t.Fatal(err)
	}
	n := &ingressNode{store: st, lostGrace: 5 * time.Minute}
	routes, err := n.prune(ctx, func(string) bool { return false })
	if err == nil || len(routes) != 0 {
		t.Fatalf("prune: routes %v, err %v; want no route and the read error", routes, err)
	}
	for id, want := range map[string]int{"unreadable": 1, "no-record": 0} {
		if es, err := st.ListExposures(ctx, id); err != nil || len(es) != want {
			t.Errorf("exposures of %s: %d %v, want %d", id, len(es), err, want)
		}
	}
}
