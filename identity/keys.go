package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
)

// rsaBits is the size of generated RSA keys.
const rsaBits = 2048

// keyRecord is one signing key as persisted in KeyFile.
type keyRecord struct {
	KID string `json:"kid"`
	Alg string `json:"alg"`
	// Created is when the key was generated and first published.
	Created time.Time `json:"created"`
	// Activated is when the key started signing; zero for the next key.
	Activated time.Time `json:"activated,omitzero"`
	// Retired is when the key stopped signing; zero while it signs.
	Retired time.Time       `json:"retired,omitzero"`
	JWK     jose.JSONWebKey `json:"jwk"` // the private key
}

// keyFileDoc is the content of KeyFile.
type keyFileDoc struct {
	Version int          `json:"version"`
	Keys    []*keyRecord `json:"keys"`
}

// signingKey is a loaded key.
type signingKey struct {
	rec    *keyRecord
	alg    jose.SignatureAlgorithm
	public crypto.PublicKey
	signer jose.Signer // nil for keys that no longer sign
	// header is the base64url JOSE header of every token this key signs.
	header string
}

// verifySignature checks sig over the JWS signing input with the key's
// algorithm (and no other).
func (k *signingKey) verifySignature(signingInput string, sig []byte) error {
	h := sha256.Sum256([]byte(signingInput))
	switch pub := k.public.(type) {
	case *rsa.PublicKey:
		if k.rec.Alg == AlgRS256 {
			return rsa.VerifyPKCS1v15(pub, crypto.SHA256, h[:], sig)
		}
	case *ecdsa.PublicKey:
		// JWS ES256 signatures are R || S, 32 bytes each (RFC 7518 3.4).
		if k.rec.Alg == AlgES256 && len(sig) == 64 {
			r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
			if ecdsa.Verify(pub, h[:], r, s) {
				return nil
			}
		}
	}
	return errors.New("invalid signature")
}

// headerFor returns the encoded JOSE header Mint produces for a key:
// go-jose serialises the header map with sorted keys.
func headerFor(alg, kid string) string {
	b, _ := json.Marshal(struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
		Typ string `json:"typ"`
	}{alg, kid, "JWT"})
	return base64.RawURLEncoding.EncodeToString(b)
}

// keySet is an immutable snapshot of the keys; the Issuer swaps it atomically.
type keySet struct {
	current *signingKey
	next    *signingKey
	retired []*signingKey // oldest first
	// verify holds the keys tokens may be signed with: current and retired.
	verify map[string]*signingKey
	// byHeader indexes verify by the encoded header each key signs with.
	byHeader map[string]*signingKey
	jwks     jose.JSONWebKeySet
	algs     []string
}

func generateKey(alg string, now time.Time) (*keyRecord, error) {
	var priv crypto.Signer
	var err error
	switch alg {
	case AlgRS256:
		priv, err = rsa.GenerateKey(rand.Reader, rsaBits)
	case AlgES256:
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		return nil, fmt.Errorf("identity: signing algorithm %q: %w", alg, errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return nil, fmt.Errorf("identity: generate %s key: %w", alg, err)
	}
	jwk := jose.JSONWebKey{Key: priv.Public(), Algorithm: alg, Use: "sig"}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("identity: key thumbprint: %w", err)
	}
	kid := base64.RawURLEncoding.EncodeToString(tp)
	return &keyRecord{
		KID:     kid,
		Alg:     alg,
		Created: now.UTC(),
		JWK:     jose.JSONWebKey{Key: priv, KeyID: kid, Algorithm: alg, Use: "sig"},
	}, nil
}

func loadKey(rec *keyRecord) (*signingKey, error) {
	k := &signingKey{rec: rec, alg: jose.SignatureAlgorithm(rec.Alg), header: headerFor(rec.Alg, rec.KID)}
	var private bool
	switch key := rec.JWK.Key.(type) {
	case *rsa.PrivateKey:
		k.public, private = key.Public(), true
	case *ecdsa.PrivateKey:
		k.public, private = key.Public(), true
	case *rsa.PublicKey, *ecdsa.PublicKey:
		k.public = key
	default:
		return nil, fmt.Errorf("identity: key %s: unsupported key type %T: %w", rec.KID, rec.JWK.Key, errdefs.ErrInvalidArgument)
	}
	switch pub := k.public.(type) {
	case *rsa.PublicKey:
		if rec.Alg != AlgRS256 || pub.N.BitLen() < rsaBits {
			return nil, fmt.Errorf("identity: key %s: %d-bit RSA key with alg %q: %w", rec.KID, pub.N.BitLen(), rec.Alg, errdefs.ErrInvalidArgument)
		}
	case *ecdsa.PublicKey:
		if rec.Alg != AlgES256 || pub.Curve != elliptic.P256() {
			return nil, fmt.Errorf("identity: key %s: EC key with alg %q: %w", rec.KID, rec.Alg, errdefs.ErrInvalidArgument)
		}
	}
	// Only a key that may still sign keeps its private half.
	if rec.Retired.IsZero() != private {
		return nil, fmt.Errorf("identity: key %s: retired keys hold only a public key, others a private key: %w", rec.KID, errdefs.ErrInvalidArgument)
	}
	if rec.KID == "" || rec.JWK.KeyID != rec.KID {
		return nil, fmt.Errorf("identity: key %q: kid mismatch: %w", rec.KID, errdefs.ErrInvalidArgument)
	}
	if rec.Retired.IsZero() {
		signer, err := jose.NewSigner(
			jose.SigningKey{Algorithm: k.alg, Key: jose.JSONWebKey{Key: rec.JWK.Key, KeyID: rec.KID}},
			(&jose.SignerOptions{}).WithType("JWT"))
		if err != nil {
			return nil, fmt.Errorf("identity: key %s: signer: %w", rec.KID, err)
		}
		k.signer = signer
	}
	return k, nil
}

// buildKeySet classifies records into current, next and retired keys.
func buildKeySet(recs []*keyRecord) (*keySet, error) {
	ks := &keySet{verify: make(map[string]*signingKey), byHeader: make(map[string]*signingKey)}
	seen := make(map[string]bool)
	for _, rec := range recs {
		if seen[rec.KID] {
			return nil, fmt.Errorf("identity: key %s listed twice: %w", rec.KID, errdefs.ErrInvalidArgument)
		}
		seen[rec.KID] = true
		k, err := loadKey(rec)
		if err != nil {
			return nil, err
		}
		switch {
		case !rec.Retired.IsZero():
			ks.retired = append(ks.retired, k)
			ks.verify[rec.KID] = k
		case rec.Activated.IsZero():
			if ks.next != nil {
				return nil, fmt.Errorf("identity: two next keys (%s, %s): %w", ks.next.rec.KID, rec.KID, errdefs.ErrInvalidArgument)
			}
			ks.next = k
		default:
			if ks.current != nil {
				return nil, fmt.Errorf("identity: two current keys (%s, %s): %w", ks.current.rec.KID, rec.KID, errdefs.ErrInvalidArgument)
			}
			ks.current = k
			ks.verify[rec.KID] = k
		}
	}
	for _, k := range ks.verify {
		ks.byHeader[k.header] = k
	}
	if ks.current == nil || ks.next == nil {
		return nil, fmt.Errorf("identity: key set needs a current and a next key: %w", errdefs.ErrInvalidArgument)
	}
	// Publish: current, next, then retired newest first.
	pub := []*signingKey{ks.current, ks.next}
	for i := len(ks.retired) - 1; i >= 0; i-- {
		pub = append(pub, ks.retired[i])
	}
	algSeen := make(map[string]bool)
	for _, k := range pub {
		ks.jwks.Keys = append(ks.jwks.Keys, jose.JSONWebKey{Key: k.public, KeyID: k.rec.KID, Algorithm: k.rec.Alg, Use: "sig"})
		if !algSeen[k.rec.Alg] {
			algSeen[k.rec.Alg] = true
			ks.algs = append(ks.algs, k.rec.Alg)
		}
	}
	return ks, nil
}

func (ks *keySet) records() []*keyRecord {
	recs := make([]*keyRecord, 0, 2+len(ks.retired))
	for _, k := range ks.retired {
		recs = append(recs, k.rec)
	}
	return append(recs, ks.current.rec, ks.next.rec)
}

// readKeyFile returns the records in dir's KeyFile, or fs.ErrNotExist.
func readKeyFile(dir string) ([]*keyRecord, fs.FileMode, error) {
	path := filepath.Join(dir, KeyFile)
	st, err := os.Stat(path)
	if err != nil {
		return nil, 0, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	var doc keyFileDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, 0, fmt.Errorf("identity: %s: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	if doc.Version != 1 {
		return nil, 0, fmt.Errorf("identity: %s: version %d: %w", path, doc.Version, errdefs.ErrInvalidArgument)
	}
	return doc.Keys, st.Mode().Perm(), nil
}

// writeKeyFile replaces dir's KeyFile atomically (temp file, fsync, rename),
// mode 0600.
func writeKeyFile(dir string, recs []*keyRecord) error {
	b, err := json.MarshalIndent(keyFileDoc{Version: 1, Keys: recs}, "", "  ")
	if err != nil {
		return fmt.Errorf("identity: encode keys: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, KeyFile), b, 0o600); err != nil {
		return fmt.Errorf("identity: write keys: %w", err)
	}
	return nil
}

func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
