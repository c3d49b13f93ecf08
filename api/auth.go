package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
)

// APIAudience is the audience a workload identity token must carry to call the API.
const APIAudience = "chalk-api"

// Principal is who is calling.
type Principal struct {
	Kind      string // "user" or "workload"
	OrgID     string
	Subject   string // users: chalk:org:<org>:user:<user>; workloads: the token's sub
	Name      string // users: the user's name; workloads: the sandbox id
	SandboxID string // workload only
	Admin     bool   // Role is admin

	// Users only (from the API key):
	User      string
	Role      store.Role // min(the key's role, the user's current role in OrgID)
	NodeAdmin bool       // the node's bootstrap admin, through an admin-role key
	KeyID     string
	KeyPrefix string
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

// Authenticator resolves bearer tokens to principals: the API server's
// calls, console sessions and the ingress listener's private routes share
// one (built before any of them, so none needs another to authenticate).
// Verified keys are cached in memory (keyCache): a revoked key, a removed
// member or a lowered role changed through this process's store takes
// effect on the next call (the store's AuthGeneration drops every cached
// answer); a change made by another chalkd on the same database within
// keyCacheTTL. Expiry is checked on every call.
type Authenticator struct {
	store    *store.Store
	workload WorkloadVerifier
	now      func() time.Time
	keys     keyCache
}

// NewAuthenticator returns an Authenticator of API keys in st and, if
// workload is not nil, workload tokens for the API audience.
func NewAuthenticator(st *store.Store, workload WorkloadVerifier) *Authenticator {
	return &Authenticator{store: st, workload: workload, now: time.Now}
}

// keyCacheTTL bounds how long a cached key is used without reading the
// store again: how late another process's revocation is seen here.
// keyCacheMax bounds the cache (only keys that verified are cached, so
// only holders of valid keys fill it; when full it starts over).
const (
	keyCacheTTL = 2 * time.Second
	keyCacheMax = 4096
)

// keyCache holds KeyByHash answers of usable keys by hash.
type keyCache struct {
	mu sync.Mutex
	m  map[string]*cachedKey
}

type cachedKey struct {
	ka  store.KeyAuth
	gen uint64    // the store's AuthGeneration before the lookup
	at  time.Time // when it was read
	// touched is when last_used_at was last written (unix nanos).
	touched atomic.Int64
}

func (c *keyCache) get(hash string, gen uint64, now time.Time) *cachedKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.m[hash]
	if e == nil {
		return nil
	}
	if e.gen != gen || now.Sub(e.at) >= keyCacheTTL || now.Before(e.at) {
		delete(c.m, hash)
		return nil
	}
	return e
}

func (c *keyCache) put(hash string, e *cachedKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= keyCacheMax {
		c.m = map[string]*cachedKey{}
	}
	c.m[hash] = e
}

// keyByHash is store.KeyByHash through the cache.
func (a *Authenticator) keyByHash(ctx context.Context, hash string, now time.Time) (*cachedKey, error) {
	gen := a.store.AuthGeneration() // before the read: a change during it invalidates the answer
	if e := a.keys.get(hash, gen, now); e != nil {
		return e, nil
	}
	ka, err := a.store.KeyByHash(ctx, hash)
	if err != nil {
		return nil, err
	}
	e := &cachedKey{ka: *ka, gen: gen, at: now}
	if !ka.Key.LastUsedAt.IsZero() {
		e.touched.Store(ka.Key.LastUsedAt.UnixNano())
	}
	if ka.Key.RevokedAt.IsZero() {
		a.keys.put(hash, e)
	}
	return e, nil
}

// Authenticate resolves an Authorization header value ("Bearer <token>")
// as every API call does.
func (a *Authenticator) Authenticate(ctx context.Context, header string) (*Principal, error) {
	return a.authenticate(ctx, header)
}

func (a *Authenticator) authenticate(ctx context.Context, header string) (*Principal, error) {
	tok, ok := strings.CutPrefix(header, "Bearer ")
	tok = strings.TrimSpace(tok)
	if !ok || tok == "" {
		return nil, fmt.Errorf("missing API token: send 'Authorization: Bearer <key>' (chalkd wrote the admin key to its data dir and the CLI config; 'chalk auth login' stores another): %w", errdefs.ErrUnauthenticated)
	}
	if strings.HasPrefix(tok, KeyPrefix) {
		return a.authenticateKey(ctx, HashKey(tok))
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

// authenticateKey finds a user API key by its hash and checks it is usable
// now (console sessions keep the hash, never the secret, and come here on
// every request).
func (a *Authenticator) authenticateKey(ctx context.Context, hash string) (*Principal, error) {
	now := a.now()
	e, err := a.keyByHash(ctx, hash, now)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, fmt.Errorf("invalid API token: %w", errdefs.ErrUnauthenticated)
	}
	if err != nil {
		return nil, err
	}
	ka, k := &e.ka, &e.ka.Key
	if !k.RevokedAt.IsZero() {
		return nil, fmt.Errorf("API key %s was revoked at %s: %w", k.Prefix, ts(k.RevokedAt), errdefs.ErrUnauthenticated)
	}
	if !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt) {
		return nil, fmt.Errorf("API key %s expired at %s: %w", k.Prefix, ts(k.ExpiresAt), errdefs.ErrUnauthenticated)
	}
	if last := e.touched.Load(); now.Sub(time.Unix(0, last)) > time.Minute && e.touched.CompareAndSwap(last, now.UnixNano()) {
		// last_used_at is shown to users, not used for decisions: a
		// minute's precision keeps the hot path free of writes, and a
		// failed update does not refuse a valid key.
		_ = a.store.TouchKey(ctx, k.ID, now)
	}
	role := k.Role.Min(ka.MemberRole)
	return &Principal{
		Kind: "user", OrgID: k.OrgID, Subject: UserSubject(k.OrgID, k.User), Name: k.User, User: k.User,
		Role: role, Admin: role == store.RoleAdmin, NodeAdmin: ka.NodeAdmin && role == store.RoleAdmin,
		KeyID: k.ID, KeyPrefix: k.Prefix,
	}, nil
}

// UserSubject is the subject of a user in an org (the created_by of its sandboxes).
func UserSubject(org, user string) string { return "chalk:org:" + org + ":user:" + user }

// authInterceptor authenticates every call.
type authInterceptor struct{ a *Authenticator }

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
