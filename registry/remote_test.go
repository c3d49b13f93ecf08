package registry

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/testca"
)

// TestRemoteRegistry: an embedded registry served on a second TLS listener
// (ServeTLS, a fleet's control plane) is resolved and pulled through a
// client-mode Registry (NewRemote, a fleet node) with only the pull
// credential: same layout, reads work, writes are denied, listing and
// deleting are refused, and the embedded registry's own loopback listener
// keeps working.
func TestRemoteRegistry(t *testing.T) {
	ca := testca.New(t)
	certFile, keyFile := ca.ServerFiles(t, net.ParseIP("127.0.0.1"))
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(t, Config{})
	d := push(t, r, "chalk.local/fleet:v1", randomImage(t))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.ServeTLS(l, cert); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.PEM)
	rem, err := NewRemote(RemoteConfig{Addr: l.Addr().String(), Pull: r.Credentials().Pull, TLS: &tls.Config{RootCAs: pool}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rem.Close() })
	ref, h, err := rem.Resolve(t.Context(), "chalk.local/fleet:v1")
	if err != nil || h != d {
		t.Fatalf("Resolve through the remote: %v %s, %v; want %s", ref, h, err, d)
	}
	if ref.Context().RegistryStr() != l.Addr().String() {
		t.Errorf("resolved to %s, want the TLS listener %s", ref, l.Addr())
	}
	img, err := remote.Image(ref, append(rem.PullOptions(), remote.WithContext(t.Context()))...)
	if err != nil {
		t.Fatalf("pull with the remote's options: %v", err)
	}
	if err := remote.Tag(ref.Context().Tag("moved"), img, append(rem.PullOptions(), remote.WithContext(t.Context()))...); err == nil || !strings.Contains(err.Error(), "DENIED") {
		t.Errorf("write through the remote: %v, want DENIED", err)
	}
	if _, _, err := rem.Resolve(t.Context(), "chalk.local/absent:v1"); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "control plane") {
		t.Errorf("Resolve of an absent image: %v, want not found in the control plane's registry", err)
	}
	if _, err := rem.List(t.Context()); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("List on a remote: %v, want failed precondition", err)
	}
	if err := rem.Delete(t.Context(), "chalk.local/fleet:v1"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Delete on a remote: %v, want failed precondition", err)
	}
	if err := rem.ServeTLS(l, cert); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("ServeTLS on a remote: %v", err)
	}
	if _, h2, err := r.Resolve(t.Context(), "chalk.local/fleet:v1"); err != nil || h2 != d {
		t.Errorf("the loopback listener after ServeTLS: %s, %v", h2, err)
	}

	// Another CA, a wrong credential, no TLS configuration: refused.
	other := x509.NewCertPool()
	other.AppendCertsFromPEM(testca.New(t).PEM)
	bad, _ := NewRemote(RemoteConfig{Addr: l.Addr().String(), Pull: r.Credentials().Pull, TLS: &tls.Config{RootCAs: other}})
	if _, _, err := bad.Resolve(t.Context(), "chalk.local/fleet:v1"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Resolve trusting another CA: %v", err)
	}
	wrong, _ := NewRemote(RemoteConfig{Addr: l.Addr().String(), Pull: Credential{"chalk-pull", "guess"}, TLS: &tls.Config{RootCAs: pool}})
	if _, _, err := wrong.Resolve(t.Context(), "chalk.local/fleet:v1"); err == nil || !strings.Contains(err.Error(), "UNAUTHORIZED") {
		t.Errorf("Resolve with a wrong credential: %v", err)
	}
	if _, err := NewRemote(RemoteConfig{Addr: l.Addr().String(), Pull: r.Credentials().Pull}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("NewRemote without TLS: %v", err)
	}
	if _, err := NewRemote(RemoteConfig{Addr: l.Addr().String(), TLS: &tls.Config{RootCAs: pool}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("NewRemote without a credential: %v", err)
	}
}

// TestRemoteRegistryNeverPlainHTTP: a remote registry at a plain-HTTP
// endpoint (a private address, where go-containerregistry would fall back to
// HTTP) never sends it a request, let alone the credential.
func TestRemoteRegistryNeverPlainHTTP(t *testing.T) {
	var requests atomic.Int64
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.Header().Set("WWW-Authenticate", `Basic realm="attacker"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(plain.Close)
	rem, err := NewRemote(RemoteConfig{Addr: strings.TrimPrefix(plain.URL, "http://"), Pull: Credential{"chalk-pull", "secret"}, TLS: &tls.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := rem.Resolve(t.Context(), "chalk.local/x:v1"); err == nil {
		t.Fatal("resolve against a plain-HTTP endpoint succeeded")
	}
	if n := requests.Load(); n != 0 {
		t.Errorf("the plain-HTTP endpoint got %d requests", n)
	}
}
