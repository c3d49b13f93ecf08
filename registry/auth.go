package registry

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/authn"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Every request to the embedded registry, reads included, carries HTTP basic
// credentials (the OCI distribution convention: a 401 with
// `WWW-Authenticate: Basic realm=...` tells clients such as
// go-containerregistry, crane, skopeo or podman to send them). There are two:
// the push credential (chalkd itself: builds, seeds, pull-through, deletes)
// and the pull credential (read-only; what a node's image cache, and later a
// fleet node, uses). Both are random secrets kept in a 0600 file of the
// node's data dir, never mounted into sandboxes.

// Credential is one username and password of the embedded registry.
type Credential struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// Authenticator returns c for go-containerregistry (remote.WithAuth).
func (c Credential) Authenticator() authn.Authenticator {
	return &authn.Basic{Username: c.Username, Password: c.Password}
}

// Credentials are the embedded registry's two credentials.
type Credentials struct {
	// Pull may read (GET, HEAD) only.
	Pull Credential `json:"pull"`
	// Push may also write: upload blobs, put manifests, delete.
	Push Credential `json:"push"`
}

func (c Credentials) valid() bool {
	return c.Pull.Username != "" && c.Pull.Password != "" && c.Push.Username != "" && c.Push.Password != "" &&
		c.Pull.Username != c.Push.Username
}

// NewCredentials returns fresh random credentials.
func NewCredentials() (Credentials, error) {
	secret := func() (string, error) {
		var b [32]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", fmt.Errorf("registry credentials: %w", err)
		}
		return hex.EncodeToString(b[:]), nil
	}
	var c Credentials
	var err error
	c.Pull.Username, c.Push.Username = "chalk-pull", "chalk-push"
	if c.Pull.Password, err = secret(); err != nil {
		return Credentials{}, err
	}
	if c.Push.Password, err = secret(); err != nil {
		return Credentials{}, err
	}
	return c, nil
}

// LoadOrCreateCredentials reads the credentials kept at path, creating the
// file (0600, with fresh random credentials) if it does not exist. An
// existing file is made 0600 again if its mode was widened.
func LoadOrCreateCredentials(path string) (Credentials, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return createCredentials(path)
	}
	if err != nil {
		return Credentials{}, fmt.Errorf("registry credentials %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return Credentials{}, fmt.Errorf("registry credentials %s: %w", path, err)
	}
	var c Credentials
	if err := json.Unmarshal(b, &c); err != nil || !c.valid() {
		return Credentials{}, fmt.Errorf("registry credentials %s: malformed (remove it to make new ones): %w", path, errdefs.ErrInvalidArgument)
	}
	return c, nil
}

func createCredentials(path string) (Credentials, error) {
	c, err := NewCredentials()
	if err != nil {
		return Credentials{}, err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return Credentials{}, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".registry-auth-*") // 0600
	if err != nil {
		return Credentials{}, fmt.Errorf("registry credentials: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return Credentials{}, fmt.Errorf("registry credentials: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return Credentials{}, fmt.Errorf("registry credentials: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return Credentials{}, fmt.Errorf("registry credentials: %w", err)
	}
	// Link, not rename: if another process created the file meanwhile, its
	// credentials win and are the ones returned.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return LoadOrCreateCredentials(path)
		}
		return Credentials{}, fmt.Errorf("registry credentials: %w", err)
	}
	return c, nil
}

// access is what a request may do.
type access int

const (
	accessNone access = iota
	accessPull
	accessPush
)

// authHandler lets through requests with one of the credentials and the
// access their method needs (GET and HEAD: pull; anything else: push).
type authHandler struct {
	next http.Handler
	log  *slog.Logger
	// Hashes of "username:password": compared in constant time, whatever
	// the length of what a client sent.
	pull, push [sha256.Size]byte
}

func newAuthHandler(c Credentials, log *slog.Logger, next http.Handler) *authHandler {
	return &authHandler{next: next, log: log, pull: credHash(c.Pull.Username, c.Pull.Password), push: credHash(c.Push.Username, c.Push.Password)}
}

func credHash(user, pass string) [sha256.Size]byte {
	return sha256.Sum256([]byte(user + "\x00" + pass))
}

func (h *authHandler) access(r *http.Request) access {
	user, pass, ok := r.BasicAuth()
	if !ok {
		return accessNone
	}
	got := credHash(user, pass)
	isPush := subtle.ConstantTimeCompare(got[:], h.push[:])
	isPull := subtle.ConstantTimeCompare(got[:], h.pull[:])
	switch {
	case isPush == 1:
		return accessPush
	case isPull == 1:
		return accessPull
	}
	return accessNone
}

func (h *authHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a := h.access(r)
	if a == accessNone {
		// A client's first request is anonymous (the challenge tells it how
		// to authenticate); a credential that does not match is worth a warning.
		if user, _, ok := r.BasicAuth(); ok {
			h.log.Warn("registry: wrong credentials", "user", user, "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="chalk-registry"`)
		writeRegistryError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
		return
	}
	if a != accessPush && r.Method != http.MethodGet && r.Method != http.MethodHead {
		h.log.Warn("registry: write with the pull credential refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
		writeRegistryError(w, http.StatusForbidden, "DENIED", "this credential may only pull")
		return
	}
	h.next.ServeHTTP(w, r)
}

// writeRegistryError answers with an OCI distribution error body.
func writeRegistryError(w http.ResponseWriter, status int, code, msg string) {
	type errorBody struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	var buf bytes.Buffer
	_ = json.NewEncoder(&buf).Encode(struct {
		Errors []errorBody `json:"errors"`
	}{[]errorBody{{code, msg}}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	w.WriteHeader(status)
	_, _ = io.Copy(w, &buf)
}
