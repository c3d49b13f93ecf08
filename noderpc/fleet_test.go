package noderpc

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// control is a control plane's fleet side for tests: its CA, store and fleet
// listener (TLS as in production).
type control struct {
	ca    *CA
	st    *store.Store
	cert  tls.Certificate
	url   string
	fleet *Fleet
	logs  *bytes.Buffer
	dir   string
	mux   *http.ServeMux // the fleet listener's routes
	db    string         // its PostgreSQL database's URL ("": SQLite)
}

func newControl(t testing.TB) *control {
	t.Helper()
	return newControlDB(t, "")
}

// newControlDB is newControl with its store in database db (a path or a
// PostgreSQL URL; "": a SQLite file in its dir).
func newControlDB(t testing.TB, db string) *control {
	t.Helper()
	dir := t.TempDir()
	ca, err := LoadOrCreateCA(filepath.Join(dir, "fleet"))
	if err != nil {
		t.Fatal(err)
	}
	if db == "" {
		db = filepath.Join(dir, "chalk.db")
	}
	st := openStore(t, db)
	cert, err := ca.ControlCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	logs := &bytes.Buffer{}
	f := &Fleet{Store: st, CA: ca, Log: slog.New(slog.NewTextHandler(logs, nil))}
	mux := http.NewServeMux()
	mux.Handle(f.Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = ControlServerTLS(ca, cert)
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return &control{ca: ca, st: st, cert: cert, url: hs.URL, fleet: f, logs: logs, dir: dir, mux: mux}
}

func (c *control) token(t testing.TB, ttl time.Duration) string {
	t.Helper()
	tok, err := NewJoinToken(context.Background(), c.st, c.ca, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func joinReq(c *control, tok, name string) JoinRequest {
	return JoinRequest{ControlURL: c.url, Token: tok, Name: name, NodeURL: "https://10.0.0.9:7451", CPU: 2, MemoryMB: 4096, Slots: 100}
}

// TestJoin: a node joins once with a token and gets a certificate naming
// its id; the token is single use, expires, is stored hashed and never
// logged; the CA lives in a 0700 directory.
func TestJoin(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	tok := c.token(t, time.Hour)
	dir := t.TempDir()
	id, err := Join(ctx, filepath.Join(dir, "a"), joinReq(c, tok, "a"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(id.ID, "nd-") || NodeIDOf(id.Cert.Leaf) != id.ID {
		t.Errorf("identity %q, certificate names %q", id.ID, NodeIDOf(id.Cert.Leaf))
	}
	n, err := c.st.GetNode(ctx, id.ID)
	if err != nil || n.Name != "a" || n.URL != "https://10.0.0.9:7451" || n.Slots != 100 || n.State != store.NodeReady {
		t.Errorf("node record %+v, %v", n, err)
	}
	// Saved, key private.
	if st, err := os.Stat(filepath.Join(dir, "a", "node.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("node key: %v %v", st.Mode(), err)
	}
	if again, err := LoadNodeIdentity(filepath.Join(dir, "a")); err != nil || again.ID != id.ID {
		t.Errorf("reload: %v", err)
	}
	// Single use.
	if _, err := Join(ctx, filepath.Join(dir, "b"), joinReq(c, tok, "b")); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("second join with one token: %v, want permission denied", err)
	}
	// Expired.
	old := c.token(t, time.Hour)
	clk := useFakeClock(nil, c.fleet)
	clk.Add(2 * time.Hour)
	if _, err := Join(ctx, filepath.Join(dir, "c"), joinReq(c, old, "c")); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("expired token: %v, want permission denied", err)
	}
	c.fleet.SetClock(nil)
	// Never in clear at rest, never in the logs.
	secret := strings.Split(tok, ".")[1]
	db, _ := os.ReadFile(filepath.Join(c.dir, "chalk.db"))
	if bytes.Contains(db, []byte(secret)) {
		t.Error("the join token's secret is in the database")
	}
	if strings.Contains(c.logs.String(), secret) {
		t.Errorf("the join token is in the logs: %s", c.logs.String())
	}
	if !strings.Contains(c.logs.String(), "join refused") {
		t.Errorf("refused joins are not logged: %s", c.logs.String())
	}
	if st, err := os.Stat(filepath.Join(c.dir, "fleet")); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("CA dir mode %v, %v", st.Mode(), err)
	}
	// Garbage is refused without quoting it.
	if _, err := Join(ctx, filepath.Join(dir, "d"), joinReq(c, "hunter2", "d")); !errors.Is(err, errdefs.ErrInvalidArgument) || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("malformed token: %v", err)
	}
}

// TestJoinBounded: the fleet listener reads at most MaxFleetMessage of a
// request before it knows who sends it.
func TestJoinBounded(t *testing.T) {
	c := newControl(t)
	anon := nodev1connect.NewFleetServiceClient(HTTPClient(&tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}), c.url)
	_, err := anon.Join(ctxT(t), connect.NewRequest(&nodev1.JoinRequest{Token: c.token(t, time.Hour), CsrDer: make([]byte, 8<<20)}))
	if !errors.Is(wire(err), errdefs.ErrResourceExhausted) {
		t.Fatalf("an 8 MiB join: %v, want resource exhausted", err)
	}
}

// TestJoinChecksTheControlPlane: a node does not send its token to a
// control plane whose CA is not the one the token names.
func TestJoinChecksTheControlPlane(t *testing.T) {
	real, impostor := newControl(t), newControl(t)
	tok := real.token(t, time.Hour)
	req := joinReq(impostor, tok, "a")
	if _, err := Join(ctxT(t), t.TempDir(), req); err == nil || !strings.Contains(err.Error(), "not the one the join token names") {
		t.Fatalf("join of an impostor: %v", err)
	}
	// The impostor never saw a Join call (the TLS handshake failed first).
	if strings.Contains(impostor.logs.String(), "join") {
		t.Errorf("the impostor got the join: %s", impostor.logs.String())
	}
}

// TestNodeCannotActForAnother: a node's heartbeat must be for itself; a
// call without a node certificate is refused.
func TestNodeCannotActForAnother(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "b"))
	if err != nil {
		t.Fatal(err)
	}
	fa := FleetClient(a, c.url)
	if _, err := fa.Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: a.ID})); err != nil {
		t.Fatalf("own heartbeat: %v", err)
	}
	_, err = fa.Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: b.ID, NodeUrl: "https://evil:1"}))
	if !errors.Is(wire(err), errdefs.ErrPermissionDenied) {
		t.Errorf("heartbeat for another node: %v, want permission denied", err)
	}
	if n, _ := c.st.GetNode(ctx, b.ID); n.URL != "https://10.0.0.9:7451" {
		t.Errorf("node a changed node b's record: %+v", n)
	}
	// No certificate: unauthenticated.
	anon := nodev1connectFleet(c, &tls.Config{InsecureSkipVerify: true})
	if _, err := anon.Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: a.ID})); !errors.Is(wire(err), errdefs.ErrUnauthenticated) {
		t.Errorf("anonymous heartbeat: %v, want unauthenticated", err)
	}
}

// TestNodeAPIIdentity: a node's API answers the control plane only (another
// node's valid certificate is refused), and the control plane refuses a
// node answering for another node's id.
func TestNodeAPIIdentity(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "b"))
	if err != nil {
		t.Fatal(err)
	}
	// Node a serves its API.
	srv := NewServer(newFakeNode(), nil)
	mux := http.NewServeMux()
	mux.Handle(srv.Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = NodeServerTLS(a)
	hs.StartTLS()
	t.Cleanup(hs.Close)

	control := NewClient(HTTPClient(ControlClientTLS(c.ca, c.cert, a.ID)), hs.URL, nil)
	if _, ok := control.Running(ctx, "up"); !ok {
		t.Fatal("the control plane cannot call node a")
	}
	// Node b, with its valid fleet certificate, calls node a: refused.
	bcfg := NodeClientTLS(b)
	bcfg.VerifyConnection = nil // b does not care whom it talks to; a must
	if err := callDestroy(ctx, HTTPClient(bcfg), hs.URL); err == nil {
		t.Error("node b called node a's API")
	}
	// The control plane expecting node b at node a's address: refused.
	wrong := NewClient(HTTPClient(ControlClientTLS(c.ca, c.cert, b.ID)), hs.URL, nil)
	if err := wrong.Destroy(ctx, "x", 1); err == nil || !strings.Contains(err.Error(), "names") {
		t.Errorf("node a answering as node b: %v", err)
	}
}

func callDestroy(ctx context.Context, hc *http.Client, url string) error {
	return NewClient(hc, url, nil).Destroy(ctx, "victim", 1)
}

func nodev1connectFleet(c *control, cfg *tls.Config) nodev1connect.FleetServiceClient {
	cfg.NextProtos = []string{"h2"}
	return nodev1connect.NewFleetServiceClient(HTTPClient(cfg), c.url)
}
