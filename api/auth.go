package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
)

// APIAudience is the audience a workload identity token must carry to call the API.
const APIAudience = "chalk-api"

// TokenPrefix starts every user API token.
const TokenPrefix = "chalk_"

// Principal is who is calling.
type Principal struct {
	Kind      string // "user" or "workload"
	OrgID     string
	Subject   string
	Name      string // user token name
	SandboxID string // workload only
	Admin     bool
}

// IsWorkload reports whether the caller is a sandbox acting as itself.
func (p *Principal) IsWorkload() bool { return p.Kind == "workload" }

type principalKey struct{}

// PrincipalFrom returns the authenticated caller of ctx.
func PrincipalFrom(ctx context.Context) (*Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(*Principal)
	return p, ok
}

// WithPrincipal returns ctx carrying p (for in-process callers and tests).
func WithPrincipal(ctx context.Context, p *Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// WorkloadVerifier verifies workload identity tokens for the API audience.
type WorkloadVerifier interface {
	VerifyWorkload(ctx context.Context, token string) (*Principal, error)
}

// NewToken returns a fresh random API token and the hash stored for it.
func NewToken() (secret, hash string) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	secret = TokenPrefix + base64.RawURLEncoding.EncodeToString(b)
	return secret, HashToken(secret)
}

// HashToken is the stored form of a token.
func HashToken(secret string) string {
	s := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(s[:])
}

// authenticator resolves bearer tokens to principals, caching user tokens.
type authenticator struct {
	store    *store.Store
	workload WorkloadVerifier

	mu    sync.Mutex
	cache map[string]cachedPrincipal
}

type cachedPrincipal struct {
	p   *Principal
	exp time.Time
}

func (a *authenticator) authenticate(ctx context.Context, header string) (*Principal, error) {
	tok, ok := strings.CutPrefix(header, "Bearer ")
	tok = strings.TrimSpace(tok)
	if !ok || tok == "" {
		return nil, fmt.Errorf("missing API token: send 'Authorization: Bearer <token>' (chalkd wrote the admin token to its data dir and the CLI config): %w", errdefs.ErrUnauthenticated)
	}
	if strings.HasPrefix(tok, TokenPrefix) {
		h := HashToken(tok)
		a.mu.Lock()
		c, hit := a.cache[h]
		a.mu.Unlock()
		if hit && time.Now().Before(c.exp) {
			return c.p, nil
		}
		t, err := a.store.TokenByHash(ctx, h)
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil, fmt.Errorf("invalid API token: %w", errdefs.ErrUnauthenticated)
		}
		if err != nil {
			return nil, err
		}
		p := &Principal{Kind: "user", OrgID: t.OrgID, Subject: "chalk:org:" + t.OrgID + ":user:" + t.Name, Name: t.Name, Admin: t.Admin}
		a.mu.Lock()
		if a.cache == nil {
			a.cache = map[string]cachedPrincipal{}
		}
		a.cache[h] = cachedPrincipal{p: p, exp: time.Now().Add(time.Minute)}
		a.mu.Unlock()
		return p, nil
	}
	if strings.Count(tok, ".") == 2 && a.workload != nil {
		p, err := a.workload.VerifyWorkload(ctx, tok)
		if err != nil {
			return nil, fmt.Errorf("invalid workload token: %v: %w", err, errdefs.ErrUnauthenticated)
		}
		return p, nil
	}
	return nil, fmt.Errorf("invalid API token: %w", errdefs.ErrUnauthenticated)
}

// authInterceptor authenticates every call.
type authInterceptor struct{ a *authenticator }

var _ connect.Interceptor = authInterceptor{}

func (i authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		p, err := i.a.authenticate(ctx, req.Header().Get("Authorization"))
		if err != nil {
			return nil, toConnect(err)
		}
		return next(WithPrincipal(ctx, p), req)
	}
}

func (authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		p, err := i.a.authenticate(ctx, conn.RequestHeader().Get("Authorization"))
		if err != nil {
			return toConnect(err)
		}
		return next(WithPrincipal(ctx, p), conn)
	}
}

// user returns the calling user, refusing workloads: sandboxes may never act
// as the user who created them.
func user(ctx context.Context) (*Principal, error) {
	p, ok := PrincipalFrom(ctx)
	if !ok {
		return nil, fmt.Errorf("no caller: %w", errdefs.ErrUnauthenticated)
	}
	if p.IsWorkload() {
		return nil, fmt.Errorf("workload identity %s may not do this; only users may: %w", p.Subject, errdefs.ErrPermissionDenied)
	}
	return p, nil
}

// caller returns any authenticated principal.
func caller(ctx context.Context) (*Principal, error) {
	p, ok := PrincipalFrom(ctx)
	if !ok {
		return nil, fmt.Errorf("no caller: %w", errdefs.ErrUnauthenticated)
	}
	return p, nil
}
