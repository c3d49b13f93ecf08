package noderpc

import (
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/registry"
)

// TestRegistryAccess: a fleet member gets, over the mTLS fleet channel, the
// address of the control plane's registry and only the read-only pull
// credential; with them it resolves and pulls over TLS (the registry's
// certificate checked as the control plane's) and cannot write. A caller
// without a node certificate, a node asking for another, and a control plane
// serving no registry get nothing.
func TestRegistryAccess(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(t.TempDir(), "registry")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	img, err := random.Image(512, 2)
	if err != nil {
		t.Fatal(err)
	}
	local, err := reg.LocalRef("chalk.local/fleet:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(local, img, reg.RemoteOptions(ctx)...); err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.ServeTLS(l, c.cert); err != nil {
		t.Fatal(err)
	}
	a, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "b"))
	if err != nil {
		t.Fatal(err)
	}
	fa := FleetClient(a, c.url)

	// No registry served: failed precondition.
	if _, err := fa.RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: a.ID})); !errors.Is(wire(err), errdefs.ErrFailedPrecondition) {
		t.Errorf("registry access with no registry: %v, want failed precondition", err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	c.fleet.Registry = &RegistryAccess{Addr: net.JoinHostPort("", port), Pull: reg.Credentials().Pull}

	res, err := fa.RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: a.ID}))
	if err != nil {
		t.Fatal(err)
	}
	push := reg.Credentials().Push
	if res.Msg.Username != reg.Credentials().Pull.Username || res.Msg.Password != reg.Credentials().Pull.Password ||
		res.Msg.Username == push.Username || res.Msg.Password == push.Password {
		t.Fatalf("registry access handed %q, want only the pull credential", res.Msg.Username)
	}
	rem, err := RemoteRegistry(ctx, fa, a, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rem.Close() })
	if rem.Addr() != l.Addr().String() {
		t.Errorf("remote registry at %s, want the fleet URL's host with the port handed: %s", rem.Addr(), l.Addr())
	}
	ref, h, err := rem.Resolve(ctx, "chalk.local/fleet:v1")
	if err != nil || h != want {
		t.Fatalf("resolve through the control plane's registry: %s, %v; want %s", h, err, want)
	}
	if err := remote.Write(ref.Context().Tag("mine"), img, append(rem.PullOptions(), remote.WithContext(ctx))...); err == nil || !strings.Contains(err.Error(), "DENIED") {
		t.Errorf("a node writing to the control plane's registry: %v, want DENIED", err)
	}

	// Without a node certificate; for another node.
	anon := nodev1connectFleet(c, insecureTLS())
	if _, err := anon.RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: a.ID})); !errors.Is(wire(err), errdefs.ErrUnauthenticated) {
		t.Errorf("registry access without a node certificate: %v, want unauthenticated", err)
	}
	if _, err := fa.RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: b.ID})); !errors.Is(wire(err), errdefs.ErrPermissionDenied) {
		t.Errorf("registry access for another node: %v, want permission denied", err)
	}

	// Another fleet member (node b's valid certificate) posing as the
	// registry: node a refuses it before sending the credential.
	var hits atomic.Int64
	impostor := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	impostor.TLS = NodeServerTLS(b)
	impostor.TLS.ClientAuth = 0
	impostor.StartTLS()
	t.Cleanup(impostor.Close)
	_, iport, _ := net.SplitHostPort(strings.TrimPrefix(impostor.URL, "https://"))
	c.fleet.Registry.Addr = net.JoinHostPort("", iport)
	if bad, err := RemoteRegistry(ctx, fa, a, c.url, nil); err != nil {
		t.Fatal(err)
	} else if _, _, err := bad.Resolve(ctx, "chalk.local/fleet:v1"); err == nil || !strings.Contains(err.Error(), "not the control plane's") {
		t.Errorf("resolve from a node posing as the registry: %v", err)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the impostor got %d requests", n)
	}

	// A plain-HTTP endpoint at the handed address never gets a request.
	var plainHits atomic.Int64
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		plainHits.Add(1)
		w.Header().Set("WWW-Authenticate", `Basic realm="x"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(plain.Close)
	_, pport, _ := net.SplitHostPort(strings.TrimPrefix(plain.URL, "http://"))
	c.fleet.Registry.Addr = net.JoinHostPort("", pport)
	if bad, err := RemoteRegistry(ctx, fa, a, c.url, nil); err != nil {
		t.Fatal(err)
	} else if _, _, err := bad.Resolve(ctx, "chalk.local/fleet:v1"); err == nil {
		t.Error("resolve from a plain-HTTP endpoint succeeded")
	}
	if n := plainHits.Load(); n != 0 {
		t.Errorf("the plain-HTTP endpoint got %d requests", n)
	}
	c.fleet.Registry.Addr = "no-port"
	if _, err := RemoteRegistry(ctx, fa, a, c.url, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a malformed registry address: %v", err)
	}
}

func insecureTLS() *tls.Config { return &tls.Config{InsecureSkipVerify: true} }

// TestRegistryRefusesRemovedNode: the registry listener for nodes admits
// only fleet members: a client without a fleet certificate is refused at
// the handshake even with the pull credential, and a node removed from the
// fleet is refused on its next request (even on a connection it keeps
// open), while another node pulls on.
func TestRegistryRefusesRemovedNode(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(t.TempDir(), "registry")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	img, err := random.Image(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	local, err := reg.LocalRef("chalk.local/fleet:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(local, img, reg.RemoteOptions(ctx)...); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.ServeTLSConfig(l, RegistryServerTLS(c.ca, c.cert), c.fleet.RegistryGate); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	c.fleet.Registry = &RegistryAccess{Addr: net.JoinHostPort("", port), Pull: reg.Credentials().Pull}
	pullerOf := func(name string) (*NodeIdentity, *registry.Registry) {
		id, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), name))
		if err != nil {
			t.Fatal(err)
		}
		rem, err := RemoteRegistry(ctx, FleetClient(id, c.url), id, c.url, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = rem.Close() })
		return id, rem
	}
	a, ra := pullerOf("a")
	_, rb := pullerOf("b")
	for _, r := range []*registry.Registry{ra, rb} {
		if _, _, err := r.Resolve(ctx, "chalk.local/fleet:v1"); err != nil {
			t.Fatalf("a member's pull: %v", err)
		}
	}
	// The pull credential without a fleet certificate.
	noCert := RegistryClientTLS(a)
	noCert.GetClientCertificate = nil
	anon, err := registry.NewRemote(registry.RemoteConfig{Addr: l.Addr().String(), Pull: reg.Credentials().Pull, TLS: noCert})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := anon.Resolve(ctx, "chalk.local/fleet:v1"); err == nil {
		t.Fatal("the pull credential without a fleet certificate pulled")
	}
	// a is removed: its next pull is refused (its connection is still open).
	if err := c.st.RemoveNode(ctx, a.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ra.Resolve(ctx, "chalk.local/fleet:v1"); err == nil || !strings.Contains(err.Error(), "403") {
		t.Fatalf("a removed node's pull: %v, want refused (403)", err)
	}
	if _, _, err := rb.Resolve(ctx, "chalk.local/fleet:v1"); err != nil {
		t.Fatalf("another node's pull after the removal: %v", err)
	}
}

// TestRegistryPullsAfterRenewal: a node's registry client moves to the
// renewed certificate at its next pull (a new connection), so its pulls go
// on past the superseded certificate's deadline, while its old connection
// would be refused then.
func TestRegistryPullsAfterRenewal(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	clk := useFakeClock(nil, c.fleet)
	c.fleet.CertGrace = time.Minute
	reg, err := registry.New(ctx, registry.Config{RootDir: filepath.Join(t.TempDir(), "registry")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close() })
	img, err := random.Image(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	local, err := reg.LocalRef("chalk.local/fleet:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(local, img, reg.RemoteOptions(ctx)...); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.ServeTLSConfig(l, RegistryServerTLS(c.ca, c.cert), c.fleet.RegistryGate); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	c.fleet.Registry = &RegistryAccess{Addr: net.JoinHostPort("", port), Pull: reg.Credentials().Pull}
	id, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	fc := FleetClient(id, c.url)
	rem, err := RemoteRegistry(ctx, fc, id, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rem.Close() })
	if _, _, err := rem.Resolve(ctx, "chalk.local/fleet:v1"); err != nil { // a connection kept alive, old certificate
		t.Fatal(err)
	}
	if err := id.Renew(ctx, fc); err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Minute)
	if _, _, err := rem.Resolve(ctx, "chalk.local/fleet:v1"); err != nil {
		t.Fatalf("a pull after the renewal, past the old certificate's deadline: %v", err)
	}
}
