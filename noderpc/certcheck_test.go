package noderpc

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/store"
)

// copyIdentity is a copy of node identity id as it is on disk now (in a
// directory of its own): the old key and certificate someone kept.
func copyIdentity(t *testing.T, id *NodeIdentity) *NodeIdentity {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"node.key", "node.crt", "ca.crt", "node-id"} {
		b, err := os.ReadFile(filepath.Join(id.dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cp, err := LoadNodeIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	return cp
}

func leafOf(t *testing.T, id *NodeIdentity) *x509.Certificate {
	t.Helper()
	c := id.current()
	if c.Leaf != nil {
		return c.Leaf
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

// gateReq is a request on the registry listener presenting leaf.
func gateReq(leaf *x509.Certificate) *http.Request {
	r := httptest.NewRequest("GET", "https://registry/v2/", nil)
	r.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}}
	return r
}

// serveNodeAPI serves a fake node's API with id's certificate (as it is
// now), counting the connections made to it.
func serveNodeAPI(t *testing.T, id *NodeIdentity) (url string, conns *atomic.Int32) {
	t.Helper()
	conns = &atomic.Int32{}
	mux := http.NewServeMux()
	mux.Handle(NewServer(newFakeNode(), nil).Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = NodeServerTLS(id)
	hs.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return hs.URL, conns
}

// dialNode makes a TLS connection to the node API at url as the router
// would (nodeTLS): nil if the node's certificate is accepted.
func dialNode(r *Router, id, url string) error {
	conn, err := tls.Dial("tcp", strings.TrimPrefix(url, "https://"), r.nodeTLS(id))
	if err == nil {
		conn.Close()
	}
	return err
}

// TestSupersededCertificate: after a renewal, the old certificate (a copy
// of the old key kept by someone) is accepted at every gate until the
// grace's deadline and refused after it, naming the node and the renewal:
// the fleet service (heartbeats), the registry gate, the relay, the
// control plane's connections to the node API; the current certificate is
// accepted throughout, also by the fleet client the node renewed with (it
// moved to a new connection); renewing from the old certificate past the
// deadline is refused; a store error refuses (fail safe).
func TestSupersededCertificate(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	clk := useFakeClock(nil, c.fleet)
	c.fleet.CertGrace = time.Minute
	n := addNode(t, c, "a", 4, 4096, 10)
	old := copyIdentity(t, n.id)
	oldLeaf := leafOf(t, old)
	oldURL, _ := serveNodeAPI(t, old) // a node API serving with the old certificate
	r := newRouter(t, c)
	r.SetClock(clk.Now)
	c.mux.Handle(RelayPrefix, &Relay{
		Admit:  c.fleet.AdmitCert,
		NodeOf: func(string) string { return n.id.ID },
		Caller: func(_ context.Context, id string) (metadata.Sandbox, error) {
			return metadata.Sandbox{ID: id, OrgID: "org", Running: true}, nil
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }),
	})
	relay := func(id *NodeIdentity) int {
		t.Helper()
		res, err := HTTPClient(NodeClientTLS(id)).Get(c.url + RelayPrefix + "sb-1/api/x")
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	heartbeat := func(fc interface {
		Heartbeat(context.Context, *connect.Request[nodev1.HeartbeatRequest]) (*connect.Response[nodev1.HeartbeatResponse], error)
	}) error {
		_, err := fc.Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: n.id.ID, NodeUrl: n.url}))
		return wire(err)
	}
	fc := FleetClient(n.id, c.url)
	if err := heartbeat(fc); err != nil { // a connection kept alive with the old certificate
		t.Fatal(err)
	}
	if err := n.id.Renew(ctx, fc); err != nil {
		t.Fatal(err)
	}
	newLeaf := leafOf(t, n.id)
	if serialOf(newLeaf) == serialOf(oldLeaf) {
		t.Fatal("the renewal kept the serial")
	}

	// Within the grace: both accepted everywhere.
	clk.Add(59 * time.Second)
	for name, id := range map[string]*NodeIdentity{"old": old, "new": n.id} {
		if err := heartbeat(FleetClient(id, c.url)); err != nil {
			t.Errorf("%s certificate within the grace: heartbeat: %v", name, err)
		}
		if err := c.fleet.RegistryGate(gateReq(leafOf(t, id))); err != nil {
			t.Errorf("%s certificate within the grace: registry: %v", name, err)
		}
		if code := relay(id); code != http.StatusNoContent {
			t.Errorf("%s certificate within the grace: relay: %d", name, code)
		}
	}
	if err := dialNode(r, n.id.ID, oldURL); err != nil {
		t.Errorf("the node API with the old certificate within the grace: %v", err)
	}

	// Past the deadline: the old one refused everywhere, the new one not.
	clk.Add(time.Second)
	err := heartbeat(FleetClient(old, c.url))
	if !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), n.id.ID) || !strings.Contains(err.Error(), "superseded by a renewal") {
		t.Errorf("heartbeat with the old certificate past the deadline: %v, want permission denied naming the node and the renewal", err)
	}
	if err := c.fleet.RegistryGate(gateReq(oldLeaf)); !errors.Is(err, errdefs.ErrPermissionDenied) || !strings.Contains(err.Error(), "superseded") {
		t.Errorf("registry with the old certificate past the deadline: %v, want permission denied", err)
	}
	if code := relay(old); code != http.StatusForbidden {
		t.Errorf("relay with the old certificate past the deadline: %d, want 403", code)
	}
	if err := dialNode(r, n.id.ID, oldURL); err == nil || !strings.Contains(err.Error(), "superseded") {
		t.Errorf("the node API with the old certificate past the deadline: %v, want refused as superseded", err)
	}
	if err := old.Renew(ctx, FleetClient(old, c.url)); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("renewal with the old certificate past the deadline: %v, want permission denied", err)
	}
	// The node's own client renewed on its kept-alive connection and
	// moved: its next call presents the new certificate.
	if err := heartbeat(fc); err != nil {
		t.Errorf("the node's fleet client after its renewal: %v", err)
	}
	if err := heartbeat(FleetClient(n.id, c.url)); err != nil {
		t.Errorf("the new certificate: heartbeat: %v", err)
	}
	if err := c.fleet.RegistryGate(gateReq(newLeaf)); err != nil {
		t.Errorf("the new certificate: registry: %v", err)
	}
	if code := relay(n.id); code != http.StatusNoContent {
		t.Errorf("the new certificate: relay: %d", code)
	}
	if err := dialNode(r, n.id.ID, n.url); err != nil {
		t.Errorf("the node API with the new certificate: %v", err)
	}

	// A store that cannot answer refuses (fail safe).
	c.st.Close()
	if err := heartbeat(FleetClient(n.id, c.url)); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("heartbeat while the store fails: %v, want unavailable", err)
	}
	if err := c.fleet.RegistryGate(gateReq(newLeaf)); err == nil {
		t.Error("registry while the store fails: admitted")
	}
	if code := relay(n.id); code != http.StatusForbidden {
		t.Errorf("relay while the store fails: %d, want 403", code)
	}
	if err := dialNode(r, n.id.ID, n.url); err == nil {
		t.Error("the node API while the store fails: accepted")
	}
}

// TestRenewAnswerLost: a node whose renewal answer was lost still holds
// only its old certificate; it renews again with it within the grace and
// gets a certificate that works, while the one issued in between (never
// received) is accepted no more and the old one's deadline does not move.
func TestRenewAnswerLost(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	clk := useFakeClock(nil, c.fleet)
	c.fleet.CertGrace = time.Minute
	n := addNode(t, c, "a", 4, 4096, 10)
	lost := copyIdentity(t, n.id)
	if err := n.id.Renew(ctx, FleetClient(n.id, c.url)); err != nil { // the answer n.id got is the one "lost"
		t.Fatal(err)
	}
	clk.Add(30 * time.Second)
	if err := lost.Renew(ctx, FleetClient(lost, c.url)); err != nil {
		t.Fatalf("renewal again from the superseded certificate within the grace: %v", err)
	}
	hb := func(id *NodeIdentity) error {
		_, err := FleetClient(id, c.url).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: id.ID, NodeUrl: n.url}))
		return wire(err)
	}
	if err := hb(lost); err != nil {
		t.Fatalf("the certificate of the second renewal: %v", err)
	}
	if err := hb(n.id); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("the certificate issued in between: %v, want permission denied", err)
	}
	rec, err := c.st.GetNode(ctx, n.id.ID)
	if err != nil || rec.CertSerial != serialOf(leafOf(t, lost)) || !rec.SupersededUntil.Equal(clk.Now().Add(-30*time.Second).Add(time.Minute)) {
		t.Fatalf("record after the second renewal: %+v %v", rec, err)
	}
}

// TestSupersededRequestsEnd: a request admitted with the node's current
// certificate that a renewal then supersedes ends at the deadline, its
// cause saying so: seen at the node's next admission with its new
// certificate, or, with no request of the node here after the renewal (it
// went to another replica), by the sweep.
func TestSupersededRequestsEnd(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	c.fleet.CertGrace = 200 * time.Millisecond
	n := addNode(t, c, "a", 4, 4096, 10)
	for _, next := range []string{"heartbeat", "sweep"} {
		held, cancel, err := c.fleet.AdmitCert(ctx, leafOf(t, n.id))
		if err != nil {
			t.Fatal(err)
		}
		defer cancel()
		url := c.url
		if next == "sweep" {
			// Renewed through another replica on the same store: nothing
			// of the node comes here after.
			fleet2 := &Fleet{Store: c.st, CA: c.ca, CertGrace: c.fleet.CertGrace}
			mux := http.NewServeMux()
			mux.Handle(fleet2.Handler())
			hs := httptest.NewUnstartedServer(mux)
			hs.EnableHTTP2 = true
			hs.TLS = ControlServerTLS(c.ca, c.cert)
			hs.StartTLS()
			defer hs.Close()
			url = hs.URL
		}
		if err := n.id.Renew(ctx, FleetClient(n.id, url)); err != nil {
			t.Fatal(err)
		}
		if held.Err() != nil {
			t.Fatalf("%s: a request with the superseded certificate ended before its deadline", next)
		}
		if next == "heartbeat" {
			n.heartbeat(t, c) // the node's next request, with its new certificate
		}
		select {
		case <-held.Done():
		case <-ctx.Done():
			t.Fatalf("%s: a request with the superseded certificate runs past its deadline", next)
		}
		if !errors.Is(context.Cause(held), errSuperseded) {
			t.Fatalf("%s: it ended with %v, want %v", next, context.Cause(held), errSuperseded)
		}
	}
}

// TestRouterRedialsRenewedNode: once the router sees a node's renewal in
// the store, its next call to the node goes over a new connection (made
// and verified with the certificate the node presents now), and at the
// deadline again.
func TestRouterRedialsRenewedNode(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	c.fleet.CertGrace = 500 * time.Millisecond
	n := addNode(t, c, "a", 4, 4096, 10)
	url, conns := serveNodeAPI(t, n.id)
	if _, err := c.st.UpdateNode(ctx, n.id.ID, func(rec *store.Node) error { rec.URL = url; return nil }); err != nil {
		t.Fatal(err)
	}
	r := newRouter(t, c)
	call := func() {
		t.Helper()
		if _, ok := r.Running(ctx, "up"); !ok {
			t.Fatal("the router cannot call the node")
		}
	}
	call()
	call()
	if got := conns.Load(); got != 1 {
		t.Fatalf("%d connections for two calls, want one kept alive", got)
	}
	if err := n.id.Renew(ctx, FleetClient(n.id, c.url)); err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	call()
	if got := conns.Load(); got != 2 {
		t.Fatalf("%d connections after the renewal, want a new one", got)
	}
	for conns.Load() < 3 {
		call()
		if ctx.Err() != nil {
			t.Fatal("no new connection after the superseded certificate's deadline")
		}
		time.Sleep(20 * time.Millisecond) // polling for the deadline's re-dial
	}
}

// TestRelayClientAfterRenewal: a node's relay client moves to the renewed
// certificate at its next request (a new connection), so relayed calls go
// on past the superseded certificate's deadline.
func TestRelayClientAfterRenewal(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	clk := useFakeClock(nil, c.fleet)
	c.fleet.CertGrace = time.Minute
	n := addNode(t, c, "a", 4, 4096, 10)
	c.mux.Handle(RelayPrefix, &Relay{
		Admit:  c.fleet.AdmitCert,
		NodeOf: func(string) string { return n.id.ID },
		Caller: func(_ context.Context, id string) (metadata.Sandbox, error) {
			return metadata.Sandbox{ID: id, OrgID: "org", Running: true}, nil
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }),
	})
	rc, err := NewRelayClient(n.id, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	relay := func() int {
		w := httptest.NewRecorder()
		r := httptest.NewRequestWithContext(metadata.WithCaller(ctx, metadata.Sandbox{ID: "sb-1", Running: true}), "GET", "http://metadata/api/x", nil)
		rc.ServeHTTP(w, r)
		return w.Code
	}
	if code := relay(); code != http.StatusNoContent { // a connection kept alive, old certificate
		t.Fatalf("relay: %d", code)
	}
	if err := n.id.Renew(ctx, FleetClient(n.id, c.url)); err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Minute)
	if code := relay(); code != http.StatusNoContent {
		t.Fatalf("relay after the renewal, past the old certificate's deadline: %d", code)
	}
}
