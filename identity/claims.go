package identity

import (
	"fmt"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Claim names beyond the registered ones (iss, sub, aud, exp, iat, nbf, jti).
const (
	ClaimOrgID         = "org_id"
	ClaimSandboxID     = "sandbox_id"
	ClaimImageDigest   = "image_digest"
	ClaimNetworkPolicy = "network_policy"
	ClaimCreatedBy     = "created_by"
)

// claimsSupported lists every claim our tokens carry (published in the
// discovery document).
var claimsSupported = []string{
	"iss", "sub", "aud", "exp", "iat", "nbf", "jti",
	ClaimOrgID, ClaimSandboxID, ClaimImageDigest, ClaimNetworkPolicy, ClaimCreatedBy,
}

const (
	subjectPrefix = "chalk:org:"
	subjectSbx    = ":sbx:"
	// MaxSubjectLen is the longest subject we issue (AWS limits sub to 127 bytes).
	MaxSubjectLen = 127
	// MaxIDLen is the longest org or sandbox id a subject may be built from.
	MaxIDLen = (MaxSubjectLen - len(subjectPrefix) - len(subjectSbx)) / 2
)

// Subject describes the sandbox a token is minted for. OrgID and SandboxID
// are immutable ids and form the token's sub; the rest are informational
// claims.
type Subject struct {
	OrgID         string
	SandboxID     string
	ImageDigest   string // the image's content hash
	NetworkPolicy string // a hash of the effective network policy
	CreatedBy     string // informational: who created the sandbox
}

// Claims are the verified contents of a token.
type Claims struct {
	Issuer        string
	Subject       string
	Audience      string
	Expiry        time.Time
	IssuedAt      time.Time
	NotBefore     time.Time
	ID            string // jti
	OrgID         string
	SandboxID     string
	ImageDigest   string
	NetworkPolicy string
	CreatedBy     string
}

// wireClaims is the JSON payload of a token.
type wireClaims struct {
	Issuer        string           `json:"iss"`
	Subject       string           `json:"sub"`
	Audience      jwt.Audience     `json:"aud"`
	Expiry        *jwt.NumericDate `json:"exp"`
	IssuedAt      *jwt.NumericDate `json:"iat"`
	NotBefore     *jwt.NumericDate `json:"nbf"`
	ID            string           `json:"jti"`
	OrgID         string           `json:"org_id"`
	SandboxID     string           `json:"sandbox_id"`
	ImageDigest   string           `json:"image_digest"`
	NetworkPolicy string           `json:"network_policy"`
	CreatedBy     string           `json:"created_by"`
}

// SubjectFor returns the token subject of a sandbox,
// "chalk:org:<org-id>:sbx:<sandbox-id>", or "" when either id is invalid
// (see CheckIDs). The result is at most MaxSubjectLen bytes.
func SubjectFor(orgID, sandboxID string) string {
	if CheckIDs(orgID, sandboxID) != nil {
		return ""
	}
	return subjectPrefix + orgID + subjectSbx + sandboxID
}

// ParseSubject splits a subject made by SubjectFor into its ids.
func ParseSubject(sub string) (orgID, sandboxID string, err error) {
	rest, ok := strings.CutPrefix(sub, subjectPrefix)
	if ok {
		orgID, sandboxID, ok = strings.Cut(rest, subjectSbx)
	}
	if !ok || CheckIDs(orgID, sandboxID) != nil {
		return "", "", fmt.Errorf("identity: subject %q: %w", sub, errdefs.ErrInvalidArgument)
	}
	return orgID, sandboxID, nil
}

// CheckIDs validates the ids a subject is built from: 1 to MaxIDLen bytes of
// [A-Za-z0-9._-] each.
func CheckIDs(orgID, sandboxID string) error {
	if err := checkID("org", orgID); err != nil {
		return err
	}
	return checkID("sandbox", sandboxID)
}

func checkID(kind, id string) error {
	if id == "" || len(id) > MaxIDLen {
		return fmt.Errorf("identity: %s id %q: must be 1 to %d bytes: %w", kind, id, MaxIDLen, errdefs.ErrInvalidArgument)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("identity: %s id %q: character %q not allowed: %w", kind, id, c, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// checkAudience validates a requested audience: one non-empty value of
// printable ASCII without spaces, at most 512 bytes.
func checkAudience(aud string) error {
	if aud == "" || len(aud) > 512 {
		return fmt.Errorf("identity: audience %q: must be 1 to 512 bytes: %w", aud, errdefs.ErrInvalidArgument)
	}
	for i := 0; i < len(aud); i++ {
		if c := aud[i]; c <= ' ' || c >= 0x7f || c == ',' {
			return fmt.Errorf("identity: audience %q: character %q not allowed (exactly one audience): %w", aud, c, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// checkClaimValue bounds the informational claims.
func checkClaimValue(name, v string) error {
	if len(v) > 256 {
		return fmt.Errorf("identity: claim %s is %d bytes (max 256): %w", name, len(v), errdefs.ErrInvalidArgument)
	}
	return nil
}

// CheckSandbox reports whether the token belongs to sandboxID: verifiers
// acting on a sandbox named in a request (read its info, mint its tokens)
// must call it so that sandbox A's token never acts on sandbox B.
func (c *Claims) CheckSandbox(orgID, sandboxID string) error {
	if c == nil || c.SandboxID != sandboxID || c.OrgID != orgID {
		return fmt.Errorf("identity: token of sandbox %q may not act on sandbox %q: %w", c.sandboxID(), sandboxID, errdefs.ErrPermissionDenied)
	}
	return nil
}

func (c *Claims) sandboxID() string {
	if c == nil {
		return ""
	}
	return c.SandboxID
}
