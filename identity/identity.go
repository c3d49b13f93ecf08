// Package identity is chalkd's OIDC issuer for workload identity.
//
// Every sandbox gets short-lived JWTs that name it (sub =
// "chalk:org:<org-id>:sbx:<sandbox-id>") and describe it (image digest,
// network policy hash). The Issuer signs them with keys kept in Config.Dir,
// publishes the OIDC discovery document and the JWKS so that relying parties
// (AWS STS, GCP workload identity federation, Vault, our own API) can verify
// them, and rotates its keys on a schedule:
//
//   - a "next" key is always published in the JWKS before it signs anything
//     (it is published for a whole rotation period before it is promoted);
//   - a retired key stays published, and keeps verifying, until every token
//     it signed has expired (MaxTTL plus Leeway after its retirement).
//
// Verify accepts only tokens signed by our own keys; it never fetches keys
// named by a token (jku, x5u, jwk and x5c headers are refused).
package identity

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

const (
	// DefaultTTL is the lifetime of a token when the requester asks for none.
	DefaultTTL = 15 * time.Minute
	// MaxTTL is the longest lifetime a token may have.
	MaxTTL = time.Hour
	// Leeway is the clock skew Verify tolerates on exp, nbf and iat.
	Leeway = 30 * time.Second
	// DefaultRotateEvery is the default signing key rotation period.
	DefaultRotateEvery = 24 * time.Hour
	// MinRotateEvery is the shortest rotation period Config accepts.
	MinRotateEvery = time.Minute

	// AlgRS256 is RSASSA-PKCS1-v1_5 with SHA-256 over a 2048-bit key.
	AlgRS256 = "RS256"
	// AlgES256 is ECDSA over P-256 with SHA-256 (the default for new
	// keys: a signature costs ~0.05 ms where RS256's costs ~1 ms, on every
	// sandbox start).
	AlgES256 = "ES256"

	// DiscoveryPath is where the OIDC discovery document is served, relative
	// to the issuer URL.
	DiscoveryPath = "/.well-known/openid-configuration"
	// JWKSPath is where the JSON Web Key Set is served, relative to the
	// issuer URL.
	JWKSPath = "/.well-known/jwks.json"

	// KeyFile is the name of the file in Config.Dir holding the signing keys
	// (mode 0600, the directory 0700).
	KeyFile = "signing-keys.json"
)

// Config configures an Issuer. Issuer and Dir are required; every other
// field has a working zero value.
type Config struct {
	// Issuer is the issuer URL: https, with a host, without query, fragment
	// or user info; a trailing slash is removed. Plain http is accepted only
	// for loopback hosts (127.0.0.0/8, ::1, localhost) for tests and
	// development: no cloud provider accepts such an issuer.
	Issuer string
	// Dir holds the signing keys (KeyFile). It is created 0700.
	Dir string
	// Alg is the signing algorithm of new keys: AlgRS256 or AlgES256.
	// Changing it takes effect at the next rotation (the next key, already
	// published, is replaced by one of Alg at start).
	//
	// "" is the default, AlgES256, without replacing anything: a new key
	// set is ES256; an existing one keeps its keys (an RS256 next key still
	// takes over at the next rotation) and every key made from then on is
	// ES256, so an RS256 issuer signs ES256 from its second rotation on and
	// every key is published a whole rotation period before it signs.
	Alg string
	// RotateEvery is how long a key signs before the next one takes over.
	// Default DefaultRotateEvery; at least MinRotateEvery.
	RotateEvery time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger receives key lifecycle events (nil discards).
	Logger *slog.Logger
	// IsActive reports whether a sandbox may still hold credentials: Mint
	// refuses and Verify rejects tokens of sandboxes for which it returns
	// false. Nil means every sandbox is active.
	IsActive func(ctx context.Context, sandboxID string) bool
	// Leading, when control-plane replicas share Dir, reports whether this
	// one holds the leader lease: only the leader rotates keys (Maintain);
	// the others re-read Dir at every tick (Reload), so every replica
	// publishes and verifies the same keys. Nil: this process alone
	// maintains them.
	Leading func() bool

	// keepNext: Alg was the default; a next key of another algorithm is
	// kept (see Alg).
	keepNext bool
}

func (c Config) withDefaults() (Config, error) {
	iss, err := ValidateIssuerURL(c.Issuer)
	if err != nil {
		return c, err
	}
	c.Issuer = iss
	if c.Dir == "" {
		return c, fmt.Errorf("identity: key directory: %w", errdefs.ErrInvalidArgument)
	}
	switch c.Alg {
	case "":
		c.Alg, c.keepNext = AlgES256, true
	case AlgRS256, AlgES256:
	default:
		return c, fmt.Errorf("identity: signing algorithm %q (want %s or %s): %w", c.Alg, AlgRS256, AlgES256, errdefs.ErrInvalidArgument)
	}
	switch {
	case c.RotateEvery == 0:
		c.RotateEvery = DefaultRotateEvery
	case c.RotateEvery < MinRotateEvery:
		return c, fmt.Errorf("identity: rotation period %s is shorter than %s: %w", c.RotateEvery, MinRotateEvery, errdefs.ErrInvalidArgument)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// ValidateIssuerURL checks an issuer URL and returns its canonical form
// (without a trailing slash). See Config.Issuer for the rules.
func ValidateIssuerURL(raw string) (string, error) {
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("identity: issuer URL %q: %s: %w", raw, why, errdefs.ErrInvalidArgument)
	}
	if raw == "" {
		return bad("empty")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return bad(err.Error())
	}
	switch {
	case u.Host == "" || u.Opaque != "":
		return bad("no host")
	case u.User != nil:
		return bad("user info is not allowed")
	case u.RawQuery != "" || u.ForceQuery:
		return bad("query is not allowed")
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return bad("fragment is not allowed")
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopbackHost(u.Hostname()) {
			return bad("http is only allowed for loopback hosts (use https)")
		}
	default:
		return bad("scheme must be https")
	}
	return strings.TrimRight(raw, "/"), nil
}

func isLoopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}
