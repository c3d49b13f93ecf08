package identity

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// MaxTokenLen is the longest token Verify looks at.
const MaxTokenLen = 8 << 10

// Issuer mints and verifies workload tokens and publishes its keys. It is
// safe for concurrent use.
type Issuer struct {
	cfg  Config
	log  *slog.Logger
	mu   sync.Mutex // serialises key changes (Rotate, Maintain)
	keys atomic.Pointer[keySet]
	// tick is how often Run checks the schedule.
	tick time.Duration
}

// New loads the signing keys from cfg.Dir, creating them on first use, and
// rotates at once if the schedule says a rotation is overdue.
func New(ctx context.Context, cfg Config) (*Issuer, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	i := &Issuer{cfg: cfg, log: cfg.Logger}
	i.tick = min(cfg.RotateEvery/20, time.Minute)
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("identity: key directory: %w", err)
	}
	if err := os.Chmod(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("identity: key directory: %w", err)
	}
	now := cfg.Now()
	recs, mode, err := readKeyFile(cfg.Dir)
	switch {
	case isNotExist(err):
		cur, err := generateKey(cfg.Alg, now)
		if err != nil {
			return nil, err
		}
		cur.Activated = cur.Created
		next, err := generateKey(cfg.Alg, now)
		if err != nil {
			return nil, err
		}
		recs = []*keyRecord{cur, next}
		if err := i.install(recs); err != nil {
			return nil, err
		}
		i.log.InfoContext(ctx, "identity: created signing keys", "dir", cfg.Dir, "current", cur.KID, "next", next.KID, "alg", cfg.Alg)
	case err != nil:
		return nil, err
	default:
		if mode&0o077 != 0 {
			i.log.WarnContext(ctx, "identity: signing key file was readable by others; restricting it to 0600", "file", KeyFile, "mode", mode.String())
		}
		ks, err := buildKeySet(recs)
		if err != nil {
			return nil, err
		}
		// A next key of another algorithm has never signed: replace it so
		// the configured algorithm takes over at the next rotation (not
		// for the default: see Config.Alg).
		if ks.next.rec.Alg != cfg.Alg && !cfg.keepNext {
			next, err := generateKey(cfg.Alg, now)
			if err != nil {
				return nil, err
			}
			recs = append(withoutKID(recs, ks.next.rec.KID), next)
		}
		if err := i.install(recs); err != nil { // also rewrites 0600
			return nil, err
		}
	}
	if err := i.Maintain(ctx); err != nil {
		return nil, err
	}
	return i, nil
}

// Reload makes the key file in Dir the live key set (written by another
// replica's rotation), without writing it.
func (i *Issuer) Reload() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	recs, _, err := readKeyFile(i.cfg.Dir)
	if err != nil {
		return err
	}
	ks, err := buildKeySet(recs)
	if err != nil {
		return err
	}
	i.keys.Store(ks)
	return nil
}

// install persists recs and makes them the live key set.
func (i *Issuer) install(recs []*keyRecord) error {
	ks, err := buildKeySet(recs)
	if err != nil {
		return err
	}
	if err := writeKeyFile(i.cfg.Dir, ks.records()); err != nil {
		return err
	}
	i.keys.Store(ks)
	return nil
}

func withoutKID(recs []*keyRecord, kid string) []*keyRecord {
	out := make([]*keyRecord, 0, len(recs))
	for _, r := range recs {
		if r.KID != kid {
			out = append(out, r)
		}
	}
	return out
}

// URL returns the issuer URL (the iss of every token).
func (i *Issuer) URL() string { return i.cfg.Issuer }

// Now returns the issuer's clock (Config.Now): token times are on it.
func (i *Issuer) Now() time.Time { return i.cfg.Now() }

// Rotate forces a rotation: the next key (already published) starts
// signing, the current key retires (it stays published until its tokens
// have expired) and a new next key is published. This is
// `chalk admin keys rotate`.
func (i *Issuer) Rotate(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.rotateLocked(ctx)
}

func (i *Issuer) rotateLocked(ctx context.Context) error {
	ks := i.keys.Load()
	now := i.cfg.Now().UTC()
	next, err := generateKey(i.cfg.Alg, now)
	if err != nil {
		return err
	}
	// Copy the records we change: the live set must stay untouched if
	// persisting fails.
	cur := *ks.current.rec
	cur.Retired = now
	// A retired key never signs again: forget its private half.
	cur.JWK = cur.JWK.Public()
	promoted := *ks.next.rec
	promoted.Activated = now
	recs := make([]*keyRecord, 0, len(ks.retired)+3)
	for _, k := range ks.retired {
		if !i.expired(k.rec, now) {
			recs = append(recs, k.rec)
		}
	}
	recs = append(recs, &cur, &promoted, next)
	if err := i.install(recs); err != nil {
		return err
	}
	i.log.InfoContext(ctx, "identity: rotated signing key", "retired", cur.KID, "current", promoted.KID, "next", next.KID)
	return nil
}

// expired reports whether every token a retired key signed has expired.
func (i *Issuer) expired(rec *keyRecord, now time.Time) bool {
	return !rec.Retired.IsZero() && now.After(rec.Retired.Add(MaxTTL+Leeway))
}

// Maintain applies the schedule once: it rotates when the current key has
// signed for RotateEvery and unpublishes retired keys whose tokens have all
// expired. Run calls it periodically.
func (i *Issuer) Maintain(ctx context.Context) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	ks := i.keys.Load()
	now := i.cfg.Now()
	if !now.Before(ks.current.rec.Activated.Add(i.cfg.RotateEvery)) {
		return i.rotateLocked(ctx)
	}
	var keep []*keyRecord
	var dropped []string
	for _, k := range ks.retired {
		if i.expired(k.rec, now) {
			dropped = append(dropped, k.rec.KID)
		} else {
			keep = append(keep, k.rec)
		}
	}
	if len(dropped) == 0 {
		return nil
	}
	if err := i.install(append(keep, ks.current.rec, ks.next.rec)); err != nil {
		return err
	}
	i.log.InfoContext(ctx, "identity: unpublished expired signing keys", "kids", dropped)
	return nil
}

// Run applies the rotation schedule until ctx is done. Errors are logged and
// retried at the next tick; Run returns ctx's error.
func (i *Issuer) Run(ctx context.Context) error {
	t := time.NewTicker(max(i.tick, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			if i.cfg.Leading != nil && !i.cfg.Leading() {
				if err := i.Reload(); err != nil {
					i.log.ErrorContext(ctx, "identity: reload the keys another replica maintains", "err", err)
				}
				continue
			}
			if err := i.Maintain(ctx); err != nil {
				i.log.ErrorContext(ctx, "identity: key maintenance failed", "err", err)
			}
		}
	}
}

// JWKS returns the published public keys: the current key, the next key
// (published before it signs) and retired keys whose tokens may still be
// valid.
func (i *Issuer) JWKS() jose.JSONWebKeySet {
	ks := i.keys.Load()
	return jose.JSONWebKeySet{Keys: append([]jose.JSONWebKey(nil), ks.jwks.Keys...)}
}

// Mint signs a token for s with exactly one audience. ttl 0 means
// DefaultTTL; ttl above MaxTTL is refused. Mint refuses sandboxes that
// Config.IsActive reports as ended.
func (i *Issuer) Mint(ctx context.Context, s Subject, audience string, ttl time.Duration) (string, time.Time, error) {
	sub := SubjectFor(s.OrgID, s.SandboxID)
	if sub == "" {
		return "", time.Time{}, CheckIDs(s.OrgID, s.SandboxID)
	}
	if err := checkAudience(audience); err != nil {
		return "", time.Time{}, err
	}
	switch {
	case ttl == 0:
		ttl = DefaultTTL
	case ttl < time.Second || ttl > MaxTTL:
		return "", time.Time{}, fmt.Errorf("identity: token lifetime %s: must be between 1s and %s: %w", ttl, MaxTTL, errdefs.ErrInvalidArgument)
	}
	for _, c := range []struct{ name, v string }{
		{ClaimImageDigest, s.ImageDigest}, {ClaimNetworkPolicy, s.NetworkPolicy}, {ClaimCreatedBy, s.CreatedBy},
	} {
		if err := checkClaimValue(c.name, c.v); err != nil {
			return "", time.Time{}, err
		}
	}
	if i.cfg.IsActive != nil && !i.cfg.IsActive(ctx, s.SandboxID) {
		return "", time.Time{}, fmt.Errorf("identity: sandbox %s has ended: %w", s.SandboxID, errdefs.ErrFailedPrecondition)
	}
	var jti [16]byte
	rand.Read(jti[:])
	now := i.cfg.Now().Truncate(time.Second)
	exp := now.Add(ttl)
	claims := wireClaims{
		Issuer:        i.cfg.Issuer,
		Subject:       sub,
		Audience:      jwt.Audience{audience},
		Expiry:        jwt.NewNumericDate(exp),
		IssuedAt:      jwt.NewNumericDate(now),
		NotBefore:     jwt.NewNumericDate(now),
		ID:            base64.RawURLEncoding.EncodeToString(jti[:]),
		OrgID:         s.OrgID,
		SandboxID:     s.SandboxID,
		ImageDigest:   s.ImageDigest,
		NetworkPolicy: s.NetworkPolicy,
		CreatedBy:     s.CreatedBy,
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("identity: encode claims: %w", err)
	}
	key := i.keys.Load().current
	sig, err := key.signer.Sign(payload)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("identity: sign with key %s: %w", key.rec.KID, err)
	}
	tok, err := sig.CompactSerialize()
	if err != nil {
		return "", time.Time{}, fmt.Errorf("identity: serialize token: %w", err)
	}
	return tok, exp, nil
}

// parseHeader validates a JOSE header that is not byte-identical to the one
// we sign with and returns the key it names.
func parseHeader(ks *keySet, seg string) (*signingKey, error) {
	hdrJSON, err := base64.RawURLEncoding.Strict().DecodeString(seg)
	if err != nil {
		return nil, unauthenticated("header encoding")
	}
	var names map[string]json.RawMessage
	if err := json.Unmarshal(hdrJSON, &names); err != nil {
		return nil, unauthenticated("header: %v", err)
	}
	var refused []string
	for n := range names {
		if !allowedHeaders[n] {
			refused = append(refused, n)
		}
	}
	if len(refused) > 0 {
		slices.Sort(refused)
		return nil, unauthenticated("header parameters %q not allowed", refused)
	}
	var hdr joseHeader
	if err := json.Unmarshal(hdrJSON, &hdr); err != nil {
		return nil, unauthenticated("header: %v", err)
	}
	if hdr.Typ != "" && hdr.Typ != "JWT" {
		return nil, unauthenticated("typ %q", hdr.Typ)
	}
	if hdr.Kid == "" {
		return nil, unauthenticated("no kid")
	}
	key := ks.verify[hdr.Kid]
	if key == nil {
		return nil, unauthenticated("unknown kid %q", hdr.Kid)
	}
	if hdr.Alg != key.rec.Alg {
		return nil, unauthenticated("alg %q does not match key %s (%s)", hdr.Alg, key.rec.KID, key.rec.Alg)
	}
	return key, nil
}

// allowedHeaders are the only JOSE header parameters Verify accepts; in
// particular jku, x5u, jwk, x5c and crit are refused.
var allowedHeaders = map[string]bool{"alg": true, "kid": true, "typ": true}

type joseHeader struct {
	Alg string `json:"alg"`
	Kid string `json:"kid"`
	Typ string `json:"typ"`
}

func unauthenticated(format string, args ...any) error {
	return fmt.Errorf("identity: token rejected: "+format+": %w", append(args, errdefs.ErrUnauthenticated)...)
}

// Verify checks a token against our own signing keys and returns its
// claims. It requires a known kid whose key's algorithm matches alg, refuses
// any key-locating header (jku, x5u, jwk, x5c) and crit, and checks iss,
// aud == audience (exactly one), exp, nbf and iat (with Leeway), the
// lifetime (at most MaxTTL), that sub matches org_id and sandbox_id, and
// that the sandbox is still active. Every error wraps
// errdefs.ErrUnauthenticated.
func (i *Issuer) Verify(ctx context.Context, token, audience string) (*Claims, error) {
	if len(token) == 0 || len(token) > MaxTokenLen {
		return nil, unauthenticated("length %d", len(token))
	}
	for j := 0; j < len(token); j++ {
		c := token[j]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return nil, unauthenticated("character %q not allowed in a compact JWS", c)
		}
	}
	dot1 := strings.IndexByte(token, '.')
	dot2 := strings.LastIndexByte(token, '.')
	if dot1 < 0 || dot1 == dot2 || strings.Count(token, ".") != 2 {
		return nil, unauthenticated("want 3 dot-separated parts")
	}
	hdrSeg, payloadSeg, sigSeg := token[:dot1], token[dot1+1:dot2], token[dot2+1:]
	ks := i.keys.Load()
	// Our headers are byte-identical for every token a key signs: the
	// common case is one map lookup. Anything else goes through the strict
	// parser, which explains the rejection (or accepts an equivalent header).
	key := ks.byHeader[hdrSeg]
	if key == nil {
		var err error
		if key, err = parseHeader(ks, hdrSeg); err != nil {
			return nil, err
		}
	}
	// Strict decoding: a token has exactly one accepted spelling.
	sig, err := base64.RawURLEncoding.Strict().DecodeString(sigSeg)
	if err != nil {
		return nil, unauthenticated("signature encoding")
	}
	if err := key.verifySignature(token[:dot2], sig); err != nil {
		return nil, unauthenticated("signature does not verify with key %s", key.rec.KID)
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(payloadSeg)
	if err != nil {
		return nil, unauthenticated("payload encoding")
	}
	var wc wireClaims
	if err := json.Unmarshal(payload, &wc); err != nil {
		return nil, unauthenticated("payload: %v", err)
	}
	c, err := i.checkClaims(&wc, audience)
	if err != nil {
		return nil, err
	}
	if i.cfg.IsActive != nil && !i.cfg.IsActive(ctx, c.SandboxID) {
		return nil, unauthenticated("sandbox %s has ended", c.SandboxID)
	}
	return c, nil
}

func (i *Issuer) checkClaims(wc *wireClaims, audience string) (*Claims, error) {
	if wc.Issuer != i.cfg.Issuer {
		return nil, unauthenticated("issuer %q", wc.Issuer)
	}
	if audience == "" {
		return nil, unauthenticated("verifier named no audience")
	}
	if len(wc.Audience) != 1 || wc.Audience[0] != audience {
		return nil, unauthenticated("audience %q, want %q", []string(wc.Audience), audience)
	}
	if wc.Expiry == nil || wc.IssuedAt == nil || wc.NotBefore == nil {
		return nil, unauthenticated("exp, iat and nbf are required")
	}
	now := i.cfg.Now()
	exp, iat, nbf := wc.Expiry.Time(), wc.IssuedAt.Time(), wc.NotBefore.Time()
	switch {
	case !now.Before(exp.Add(Leeway)):
		return nil, unauthenticated("expired at %s", exp.UTC().Format(time.RFC3339))
	case now.Add(Leeway).Before(nbf):
		return nil, unauthenticated("not valid before %s", nbf.UTC().Format(time.RFC3339))
	case now.Add(Leeway).Before(iat):
		return nil, unauthenticated("issued in the future (%s)", iat.UTC().Format(time.RFC3339))
	case exp.Sub(iat) > MaxTTL || !exp.After(iat):
		return nil, unauthenticated("lifetime %s", exp.Sub(iat))
	}
	if wc.ID == "" {
		return nil, unauthenticated("no jti")
	}
	if sub := SubjectFor(wc.OrgID, wc.SandboxID); sub == "" || sub != wc.Subject {
		return nil, unauthenticated("subject %q does not match org %q sandbox %q", wc.Subject, wc.OrgID, wc.SandboxID)
	}
	return &Claims{
		Issuer:        wc.Issuer,
		Subject:       wc.Subject,
		Audience:      wc.Audience[0],
		Expiry:        exp,
		IssuedAt:      iat,
		NotBefore:     nbf,
		ID:            wc.ID,
		OrgID:         wc.OrgID,
		SandboxID:     wc.SandboxID,
		ImageDigest:   wc.ImageDigest,
		NetworkPolicy: wc.NetworkPolicy,
		CreatedBy:     wc.CreatedBy,
	}, nil
}
