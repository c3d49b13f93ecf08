package registry

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/testca"
)

// TestRemotePullOverTLS: a registry serving HTTPS is written by chalkd's
// own client and read over the network with the pull credential and the CA
// (RemotePullOptions); another CA, no credential or the pull credential for
// a write are refused.
func TestRemotePullOverTLS(t *testing.T) {
	ca := testca.New(t)
	certFile, keyFile := ca.ServerFiles(t, net.ParseIP("127.0.0.1"))
	r := newTestRegistry(t, Config{TLSCertFile: certFile, TLSKeyFile: keyFile})
	img := randomImage(t)
	d := push(t, r, "chalk.local/tls:v1", img) // chalkd's own client, over TLS
	if _, h, err := r.Resolve(t.Context(), "chalk.local/tls:v1"); err != nil || h != d {
		t.Fatalf("Resolve over TLS: %s, %v", h, err)
	}

	// As a fleet node: by address, the pull credential and the CA.
	ref, err := name.NewDigest(r.Addr() + "/chalk.local/tls@" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	opts, err := RemotePullOptions(r.Credentials().Pull, ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	got, err := remote.Image(ref, append(opts, remote.WithContext(t.Context()))...)
	if err != nil {
		t.Fatalf("pull over TLS with the pull credential: %v", err)
	}
	if err := validate.Image(got); err != nil {
		t.Errorf("image pulled over TLS: %v", err)
	}
	if err := remote.Tag(ref.Context().Tag("moved"), got, append(opts, remote.WithContext(t.Context()))...); err == nil || !strings.Contains(err.Error(), "DENIED") {
		t.Errorf("write with the pull credential over TLS: %v, want DENIED", err)
	}

	other, _ := RemotePullOptions(r.Credentials().Pull, testca.New(t).PEM)
	if _, err := remote.Image(ref, append(other, remote.WithContext(t.Context()))...); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("pull trusting another CA: %v, want a certificate error", err)
	}
	wrong, _ := RemotePullOptions(Credential{"chalk-pull", "guess"}, ca.PEM)
	if _, err := remote.Image(ref, append(wrong, remote.WithContext(t.Context()))...); err == nil || !strings.Contains(err.Error(), "UNAUTHORIZED") {
		t.Errorf("pull with a wrong credential: %v, want UNAUTHORIZED", err)
	}
	if _, err := RemotePullOptions(Credential{}, ca.PEM); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("RemotePullOptions without a credential: %v", err)
	}
	if _, err := RemotePullOptions(r.Credentials().Pull, []byte("not PEM")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("RemotePullOptions with a malformed CA: %v", err)
	}
	if _, err := New(t.Context(), Config{RootDir: t.TempDir(), TLSCertFile: certFile}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("New with a certificate but no key: %v", err)
	}
}

// TestRemotePullNeverPlainHTTP: at a private or loopback address,
// go-containerregistry would fall back to plain HTTP when HTTPS fails (what
// an attacker on the path can arrange), sending the credential in clear
// text. RemotePullOptions refuses: a plain-HTTP endpoint asking for basic
// auth never gets a request.
func TestRemotePullNeverPlainHTTP(t *testing.T) {
	var requests, withAuth atomic.Int64
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if r.Header.Get("Authorization") != "" {
			withAuth.Add(1)
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="attacker"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(plain.Close)
	ref, err := name.ParseReference(strings.TrimPrefix(plain.URL, "http://") + "/chalk.local/x:v1")
	if err != nil {
		t.Fatal(err)
	}
	opts, err := RemotePullOptions(Credential{"chalk-pull", "secret"}, testca.New(t).PEM)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := remote.Image(ref, append(opts, remote.WithContext(t.Context()))...); err == nil {
		t.Fatal("pull from a plain-HTTP endpoint succeeded")
	}
	if n, a := requests.Load(), withAuth.Load(); n != 0 || a != 0 {
		t.Errorf("the plain-HTTP endpoint got %d requests (%d with the credential)", n, a)
	}
}
