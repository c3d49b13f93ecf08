package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"

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

// authenticator resolves bearer tokens to principals. User tokens are looked
// up in the store on every request (an indexed read): nothing is cached, so a
// deleted token is refused by the very next request on every path (TCP, unix
// socket, the metadata service's /api).
type authenticator struct {
	store    *store.Store
	workload WorkloadVerifier
}

func (a *authenticator) authenticate(ctx context.Context, header string) (*Principal, error) {
	tok, ok := strings.CutPrefix(header, "Bearer ")
	tok = strings.TrimSpace(tok)
	if !ok || tok == "" {
		return nil, fmt.Errorf("missing API token: send 'Authorization: Bearer <token>' (chalkd wrote the admin token to its data dir and the CLI config): %w", errdefs.ErrUnauthenticated)
	}
	if strings.HasPrefix(tok, TokenPrefix) {
		t, err := a.store.TokenByHash(ctx, HashToken(tok))
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil, fmt.Errorf("invalid API token: %w", errdefs.ErrUnauthenticated)
		}
		if err != nil {
			return nil, err
		}
		return &Principal{Kind: "user", OrgID: t.OrgID, Subject: "chalk:org:" + t.OrgID + ":user:" + t.Name, Name: t.Name, Admin: t.Admin}, nil
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

// authInterceptor makes sure every call has a principal: the one guard
// authenticated from the request's headers before any body was read, or
// (for a handler mounted without guard) one it authenticates itself.
type authInterceptor struct{ a *authenticator }

func (i authInterceptor) principal(ctx context.Context, h http.Header) (*Principal, error) {
	if p, ok := PrincipalFrom(ctx); ok {
		return p, nil
	}
	return i.a.authenticate(ctx, h.Get("Authorization"))
}

var _ connect.Interceptor = authInterceptor{}

func (i authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		p, err := i.principal(ctx, req.Header())
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
		p, err := i.principal(ctx, conn.RequestHeader())
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
