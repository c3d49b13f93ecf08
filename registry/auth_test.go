package registry

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// rawRequest sends method path to r with cred (nil: none) and returns the response.
func rawRequest(t *testing.T, r *Registry, method, path string, cred *Credential) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, "http://"+r.Addr()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cred != nil {
		req.SetBasicAuth(cred.Username, cred.Password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// TestAuthRequired: without a credential, or with a wrong one, every
// endpoint answers 401 with a Basic challenge; the pull credential reads and
// may not write; the push credential does both.
func TestAuthRequired(t *testing.T) {
	r := newTestRegistry(t, Config{})
	ctx := t.Context()
	orig := randomImage(t)
	origDigest := push(t, r, "busybox", orig)
	local, _ := r.LocalRef("busybox")
	creds := r.Credentials()
	manifest := "/v2/docker.io/library/busybox/manifests/latest"

	wrong := []struct {
		name string
		cred *Credential
	}{
		{"anonymous", nil},
		{"wrong password", &Credential{creds.Push.Username, creds.Push.Password + "x"}},
		{"pull password for push user", &Credential{creds.Push.Username, creds.Pull.Password}},
		{"empty", &Credential{}},
	}
	for _, w := range wrong {
		t.Run(w.name, func(t *testing.T) {
			for _, m := range []struct{ method, path string }{
				{http.MethodGet, "/v2/"},
				{http.MethodGet, "/v2/_catalog"},
				{http.MethodHead, manifest},
				{http.MethodGet, manifest},
				{http.MethodGet, "/v2/docker.io/library/busybox/blobs/" + origDigest.String()},
				{http.MethodPut, manifest},
				{http.MethodDelete, manifest},
				{http.MethodDelete, "/v2/docker.io/library/busybox/manifests/" + origDigest.String()},
				{http.MethodPost, "/v2/docker.io/library/busybox/blobs/uploads/"},
			} {
				resp := rawRequest(t, r, m.method, m.path, w.cred)
				if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
					t.Errorf("%s %s: %d (WWW-Authenticate %q), want 401 with a Basic challenge",
						m.method, m.path, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
				}
			}
			// An OCI client with these credentials (anonymous: none) can
			// neither read, overwrite nor delete.
			auth := authn.Anonymous
			if w.cred != nil {
				auth = w.cred.Authenticator()
			}
			opt := []remote.Option{remote.WithContext(ctx), remote.WithAuth(auth)}
			if _, err := remote.Get(local, opt...); !errdefs.Is(classify(err), errdefs.ErrUnauthenticated) {
				t.Errorf("read: %v, want unauthenticated", err)
			}
			if err := remote.Write(local, randomImage(t), opt...); !errdefs.Is(classify(err), errdefs.ErrUnauthenticated) {
				t.Errorf("overwrite: %v, want unauthenticated", err)
			}
			if err := remote.Delete(local.Context().Digest(origDigest.String()), opt...); !errdefs.Is(classify(err), errdefs.ErrUnauthenticated) {
				t.Errorf("delete: %v, want unauthenticated", err)
			}
		})
	}

	t.Run("pull credential", func(t *testing.T) {
		opt := []remote.Option{remote.WithContext(ctx), remote.WithAuth(creds.Pull.Authenticator())}
		if d, err := remote.Get(local, opt...); err != nil || d.Digest != origDigest {
			t.Errorf("read: %v, %v; want %s", d, err, origDigest)
		}
		other, _ := r.LocalRef("other:v1")
		if err := remote.Write(other, randomImage(t), opt...); !errdefs.Is(classify(err), errdefs.ErrPermissionDenied) {
			t.Errorf("push: %v, want permission denied", err)
		}
		if err := remote.Delete(local, opt...); !errdefs.Is(classify(err), errdefs.ErrPermissionDenied) {
			t.Errorf("delete: %v, want permission denied", err)
		}
	})

	// Nothing above changed what busybox is.
	if _, h, err := r.Resolve(ctx, "busybox"); err != nil || h != origDigest {
		t.Fatalf("busybox after the attempts = %s, %v; want %s", h, err, origDigest)
	}

	t.Run("push credential", func(t *testing.T) {
		opt := []remote.Option{remote.WithContext(ctx), remote.WithAuth(creds.Push.Authenticator())}
		other, _ := r.LocalRef("other:v1")
		if err := remote.Write(other, randomImage(t), opt...); err != nil {
			t.Errorf("push: %v", err)
		}
		if err := remote.Delete(other, opt...); err != nil {
			t.Errorf("delete: %v", err)
		}
	})
}

// TestTagsImmutable: a tag, once written, is not moved by a put of another
// manifest (image or index); the same manifest again is fine; delete then put
// replaces it.
func TestTagsImmutable(t *testing.T) {
	r := newTestRegistry(t, Config{})
	ctx := t.Context()
	a, b := randomImage(t), randomImage(t)
	aDigest := push(t, r, "chalk.local/build:k1", a)
	local, _ := r.LocalRef("chalk.local/build:k1")
	opts := r.RemoteOptions(ctx)

	if err := remote.Write(local, b, opts...); !errors.Is(classify(err), errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "immutable") {
		t.Errorf("overwrite with another image: %v, want already exists (immutable)", err)
	}
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: b})
	if err := remote.WriteIndex(local, idx, opts...); !errors.Is(classify(err), errdefs.ErrAlreadyExists) {
		t.Errorf("overwrite with an index: %v, want already exists", err)
	}
	// Raw manifest put of b's bytes, as a client that does not check first would.
	raw, _ := b.RawManifest()
	mt, _ := b.MediaType()
	if err := remote.Put(local, rawManifest{raw, mt}, opts...); !errors.Is(classify(err), errdefs.ErrAlreadyExists) {
		t.Errorf("raw put: %v, want already exists", err)
	}
	// Unclean paths: the registry redirects them rather than putting.
	creds := r.Credentials()
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"/v2/chalk.local/build/manifests/k1/", "/v2//chalk.local/build/manifests/k1", "/v2/chalk.local/./build/manifests/k1"} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, "http://"+r.Addr()+p, bytes.NewReader(raw))
		req.Header.Set("Content-Type", string(mt))
		req.SetBasicAuth(creds.Push.Username, creds.Push.Password)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode < 300 || resp.StatusCode == http.StatusNotModified {
			t.Errorf("PUT %s of another manifest: %d", p, resp.StatusCode)
		}
	}
	if _, h, err := r.Resolve(ctx, "chalk.local/build:k1"); err != nil || h != aDigest {
		t.Fatalf("tag after overwrite attempts = %s, %v; want %s", h, err, aDigest)
	}
	raw, _ = a.RawManifest()
	mt, _ = a.MediaType()
	if err := remote.Put(local, rawManifest{raw, mt}, opts...); err != nil {
		t.Errorf("putting the same manifest again: %v", err)
	}

	if err := r.Delete(ctx, "chalk.local/build:k1"); err != nil {
		t.Fatal(err)
	}
	bDigest := push(t, r, "chalk.local/build:k1", b)
	if _, h, err := r.Resolve(ctx, "chalk.local/build:k1"); err != nil || h != bDigest {
		t.Errorf("after delete and push = %s, %v; want %s", h, err, bDigest)
	}

	// Concurrent puts of different images to a new tag: one wins, the
	// others are refused, and the tag names the winner.
	fresh, _ := r.LocalRef("chalk.local/build:k2")
	imgs := make([]v1.Image, 4)
	errs := make([]error, len(imgs))
	var wg sync.WaitGroup
	for i := range imgs {
		imgs[i] = randomImage(t)
		wg.Go(func() { errs[i] = remote.Write(fresh, imgs[i], r.RemoteOptions(ctx)...) })
	}
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil && won >= 0:
			t.Errorf("puts %d and %d of different images to a new tag both succeeded", won, i)
		case err == nil:
			won = i
		case !errors.Is(classify(err), errdefs.ErrAlreadyExists):
			t.Errorf("put %d: %v, want already exists", i, err)
		}
	}
	if won < 0 {
		t.Fatal("no put to a new tag succeeded")
	}
	want, _ := imgs[won].Digest()
	if _, h, err := r.Resolve(ctx, "chalk.local/build:k2"); err != nil || h != want {
		t.Errorf("new tag names %s, %v; want the winner %s", h, err, want)
	}
}

// rawManifest is a manifest as bytes, for remote.Put.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.b, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mt, nil }

// TestCredentialsFile: created 0600 on first use, the same on the next,
// narrowed back to 0600 if widened; the registry's storage is 0700 even
// when it existed wider.
func TestCredentialsFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "registry-auth.json")
	c1, err := LoadOrCreateCredentials(path)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file: %v, %v; want mode 0600", st.Mode(), err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	c2, err := LoadOrCreateCredentials(path)
	if err != nil || c2 != c1 {
		t.Fatalf("second load = %+v, %v; want the first credentials", c2, err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("widened credentials file left at %v", st.Mode())
	}
	if c1.Pull.Password == c1.Push.Password || len(c1.Push.Password) < 32 {
		t.Errorf("weak credentials: %+v", c1)
	}
	if err := os.WriteFile(filepath.Join(dir, "bad.json"), []byte(`{"pull":{}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateCredentials(filepath.Join(dir, "bad.json")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("malformed file: %v, want invalid argument", err)
	}

	root := filepath.Join(dir, "registry")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(t, Config{RootDir: root, CredentialsFile: path})
	if r.Credentials() != c1 {
		t.Errorf("registry uses %+v, want the file's %+v", r.Credentials(), c1)
	}
	if st, _ := os.Stat(root); st.Mode().Perm() != 0o700 {
		t.Errorf("registry storage mode %v, want 0700", st.Mode().Perm())
	}
}

// TestNotFoundProbesLogAtDebug: a 404 answer to a read is normal (every
// Resolve of an image not yet here), and so is a read of a blob by sha512;
// nothing is logged above debug for them.
func TestNotFoundProbesLogAtDebug(t *testing.T) {
	var buf syncBuffer
	r := newTestRegistry(t, Config{Logger: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if _, _, err := r.Resolve(t.Context(), "nothere"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Resolve: %v, want not found", err)
	}
	local, _ := r.LocalRef("nothere")
	if _, err := remote.Head(local, r.RemoteOptions(t.Context())...); err == nil {
		t.Fatal("HEAD of a missing manifest succeeded")
	}
	// A blob read by sha512 (distribution warns that it maps it to sha256).
	data := []byte("sha512 read")
	blob(t, r, "chalk.local/logs", data, sha512Of(data))
	pull := r.Credentials().Pull
	if resp, body := call(t, r, http.MethodGet, "/v2/chalk.local/logs/blobs/"+sha512Of(data), &pull, "", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("blob by sha512: %d %s", resp.StatusCode, body)
	}
	out := buf.String()
	if !strings.Contains(out, "http.response.status=404") {
		t.Fatalf("the 404s were not logged at all:\n%s", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "level=ERROR") || strings.Contains(line, "level=WARN") {
			t.Errorf("logged above debug: %s", line)
		}
	}
}
