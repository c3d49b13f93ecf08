package metadata

import (
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
)

const (
	// TokenPath mints a token: GET /v1/identity/token?audience=AUD[&ttl=SECONDS].
	TokenPath = "/v1/identity/token"
	// IdentityPath describes the caller's identity.
	IdentityPath = "/v1/identity"

	maxCachedTokens = 4096
)

// TokenResponse is the body of a successful token request.
type TokenResponse struct {
	Token     string    `json:"token"`
	ExpiresAt time.Time `json:"expires_at"`
}

// IdentityResponse is the body of GET /v1/identity.
type IdentityResponse struct {
	Subject       string `json:"sub"`
	OrgID         string `json:"org_id"`
	SandboxID     string `json:"sandbox_id"`
	ImageDigest   string `json:"image_digest"`
	NetworkPolicy string `json:"network_policy"`
	CreatedBy     string `json:"created_by"`
	Issuer        string `json:"issuer"`
}

// callerNow is the caller with its network_policy claim as it is now
// (Sandbox.PolicyNow); false once an error is written.
func (s *Server) callerNow(w http.ResponseWriter, r *http.Request) (Sandbox, bool) {
	sb, _ := CallerFrom(r.Context())
	now, err := sb.withPolicy(r.Context())
	if err != nil {
		s.log.ErrorContext(r.Context(), "metadata: network policy claim", "sandbox", sb.ID, "err", err)
		writeError(w, http.StatusInternalServerError, "internal error")
		return Sandbox{}, false
	}
	return now, true
}

func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k := range q {
		if k != "audience" && k != "ttl" {
			writeError(w, http.StatusBadRequest, "unknown parameter "+strconv.Quote(k))
			return
		}
		if len(q[k]) != 1 {
			writeError(w, http.StatusBadRequest, "parameter "+k+" given more than once (a token has exactly one audience)")
			return
		}
	}
	aud := q.Get("audience")
	if aud == "" {
		aud = s.cfg.DefaultAudience
	}
	if aud == "" {
		writeError(w, http.StatusBadRequest, "audience is required")
		return
	}
	var ttl time.Duration
	if v := q.Get("ttl"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || time.Duration(n)*time.Second > identity.MaxTTL {
			writeError(w, http.StatusBadRequest, "ttl must be 1 to "+strconv.Itoa(int(identity.MaxTTL/time.Second))+" seconds")
			return
		}
		ttl = time.Duration(n) * time.Second
	}
	sb, ok := s.callerNow(w, r)
	if !ok {
		return
	}
	key := cacheKey{sb.ID, sb.OrgID, sb.ImageDigest, sb.NetworkPolicy, sb.CreatedBy, aud, ttl}
	now := s.cfg.Issuer.Now()
	if tok, exp, ok := s.cache.get(key, now); ok {
		writeJSON(w, TokenResponse{Token: tok, ExpiresAt: exp.UTC()})
		return
	}
	tok, exp, err := s.cfg.Issuer.Mint(r.Context(), sb.Subject(), aud, ttl)
	switch {
	case err == nil:
	case errors.Is(err, errdefs.ErrInvalidArgument):
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, errdefs.ErrFailedPrecondition):
		writeError(w, http.StatusForbidden, err.Error())
		return
	default:
		s.log.ErrorContext(r.Context(), "metadata: mint failed", "sandbox", sb.ID, "err", err)
		writeError(w, http.StatusInternalServerError, "internal error")
		return
	}
	s.cache.put(key, tok, now, exp)
	writeJSON(w, TokenResponse{Token: tok, ExpiresAt: exp.UTC()})
}

func (s *Server) serveIdentity(w http.ResponseWriter, r *http.Request) {
	sb, ok := s.callerNow(w, r)
	if !ok {
		return
	}
	sub := identity.SubjectFor(sb.OrgID, sb.ID)
	if sub == "" {
		s.log.ErrorContext(r.Context(), "metadata: sandbox has invalid ids", "sandbox", sb.ID, "org", sb.OrgID)
		writeError(w, http.StatusInternalServerError, "internal error")
		return
	}
	writeJSON(w, IdentityResponse{
		Subject:       sub,
		OrgID:         sb.OrgID,
		SandboxID:     sb.ID,
		ImageDigest:   sb.ImageDigest,
		NetworkPolicy: sb.NetworkPolicy,
		CreatedBy:     sb.CreatedBy,
		Issuer:        s.cfg.Issuer.URL(),
	})
}

// tokenCache reuses a token for identical requests (same sandbox identity,
// audience and lifetime) while at least 3/4 of its lifetime remains, so a
// sandbox polling the service does not cost a signature per request. A nil
// cache caches nothing.
type tokenCache struct {
	mu  sync.Mutex
	max int
	m   map[cacheKey]cachedToken
}

type cacheKey struct {
	sandboxID, orgID, imageDigest, networkPolicy, createdBy, audience string
	ttl                                                               time.Duration
}

type cachedToken struct {
	token      string
	reuseUntil time.Time
	expiresAt  time.Time
}

func newTokenCache(max int) *tokenCache {
	return &tokenCache{max: max, m: make(map[cacheKey]cachedToken)}
}

func (c *tokenCache) get(k cacheKey, now time.Time) (string, time.Time, bool) {
	if c == nil {
		return "", time.Time{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	if !ok || !now.Before(e.reuseUntil) {
		return "", time.Time{}, false
	}
	return e.token, e.expiresAt, true
}

func (c *tokenCache) put(k cacheKey, tok string, minted, exp time.Time) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		for k, e := range c.m {
			if !minted.Before(e.reuseUntil) {
				delete(c.m, k)
			}
		}
		if len(c.m) >= c.max {
			return
		}
	}
	c.m[k] = cachedToken{token: tok, reuseUntil: minted.Add(exp.Sub(minted) / 4), expiresAt: exp}
}

// forget drops every cached token of a sandbox.
func (c *tokenCache) forget(sandboxID string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if k.sandboxID == sandboxID {
			delete(c.m, k)
		}
	}
}

// Forget drops the cached tokens of a sandbox; call it when the sandbox
// ends (requests of ended sandboxes are refused regardless).
func (s *Server) Forget(sandboxID string) { s.cache.forget(sandboxID) }
