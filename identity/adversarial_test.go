package identity

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// forge builds a compact JWS from a header, a payload and a signing function.
func forge(t *testing.T, header, claims map[string]any, sign func(input []byte) []byte) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	p, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(p)
	return input + "." + base64.RawURLEncoding.EncodeToString(sign([]byte(input)))
}

func rs256(k *rsa.PrivateKey) func([]byte) []byte {
	return func(in []byte) []byte {
		h := sha256.Sum256(in)
		sig, err := rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, h[:])
		if err != nil {
			panic(err)
		}
		return sig
	}
}

func hs256(secret []byte) func([]byte) []byte {
	return func(in []byte) []byte {
		m := hmac.New(sha256.New, secret)
		m.Write(in)
		return m.Sum(nil)
	}
}

func validClaims(env *testEnv, aud string) map[string]any {
	now := env.clock.Now()
	return map[string]any{
		"iss": env.iss.URL(), "sub": SubjectFor(testSubject.OrgID, testSubject.SandboxID), "aud": aud,
		"exp": now.Add(10 * time.Minute).Unix(), "iat": now.Unix(), "nbf": now.Unix(), "jti": "forged-jti",
		"org_id": testSubject.OrgID, "sandbox_id": testSubject.SandboxID,
	}
}

func with(m map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
		} else {
			out[kv[i].(string)] = kv[i+1]
		}
	}
	return out
}

// attackerServer serves the attacker's JWKS and certificate and counts
// requests: nobody may fetch them.
func attackerServer(t *testing.T, key *rsa.PrivateKey, kid string, certDER []byte) (*httptest.Server, *atomic.Int32) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		switch r.URL.Path {
		case "/jwks.json":
			json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: kid, Algorithm: "RS256", Use: "sig"}}})
		case "/cert.pem":
			pem.Encode(w, &pem.Block{Type: "CERTIFICATE", Bytes: certDER})
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func selfSigned(t *testing.T, key *rsa.PrivateKey) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "attacker"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestAdversarialTokens presents forged and out-of-policy tokens to Verify
// and, where the forgery is one any relying party must catch, to go-oidc
// fetching our discovery document and JWKS over HTTP.
func TestAdversarialTokens(t *testing.T) {
	env := newEnv(t)
	ctx := context.Background()
	const aud = "https://api.chalk.test"
	ours := env.iss.keys.Load().current
	ourKey := ours.rec.JWK.Key.(*rsa.PrivateKey)
	kid := ours.rec.KID
	attacker, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	attackerJWK := jose.JSONWebKey{Key: attacker.Public(), KeyID: "attacker", Algorithm: "RS256", Use: "sig"}
	certDER := selfSigned(t, attacker)
	evil, evilHits := attackerServer(t, attacker, "attacker", certDER)
	pubDER, err := x509.MarshalPKIXPublicKey(ourKey.Public())
	if err != nil {
		t.Fatal(err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	pkcs1PEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&ourKey.PublicKey)})

	hdr := func(kv ...any) map[string]any {
		return with(map[string]any{"alg": "RS256", "kid": kid, "typ": "JWT"}, kv...)
	}
	claims := validClaims(env, aud)
	now := env.clock.Now()
	// Tokens minted legitimately under a shifted clock.
	mintAt := func(shift time.Duration, s Subject, a string, ttl time.Duration) string {
		env.clock.Add(shift)
		defer env.clock.Add(-shift)
		tok, _, err := env.iss.Mint(ctx, s, a, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	ended := testSubject
	ended.SandboxID = "sbx-ended"
	endedTok := mintAt(0, ended, aud, 0)
	env.active.End(ended.SandboxID)
	valid := mintAt(0, testSubject, aud, 0)
	// An RS256 signature is 256 bytes: its last base64 character carries 2
	// bits of data and 4 zero padding bits. Setting a padding bit keeps the
	// decoded bytes but not the canonical spelling.
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	last := strings.IndexByte(alphabet, valid[len(valid)-1])
	nonCanonical := valid[:len(valid)-1] + string(alphabet[last|1])
	if last&0xf != 0 || nonCanonical == valid {
		t.Fatalf("test bug: last signature character %q is not canonical padding", valid[len(valid)-1])
	}
	signPS256 := func(in []byte) []byte {
		h := sha256.Sum256(in)
		sig, _ := rsa.SignPSS(rand.Reader, ourKey, crypto.SHA256, h[:], nil)
		return sig
	}
	signRS512 := func(in []byte) []byte {
		h := sha512.Sum512(in)
		sig, _ := rsa.SignPKCS1v15(rand.Reader, ourKey, crypto.SHA512, h[:])
		return sig
	}
	attackerJWKJSON, _ := json.Marshal(attackerJWK)
	var attackerJWKMap map[string]any
	json.Unmarshal(attackerJWKJSON, &attackerJWKMap)

	tests := []struct {
		name  string
		token string
		// rp: go-oidc must reject it too. False for rules that only our own
		// verifiers enforce (header hygiene, sandbox liveness, exact aud).
		rp bool
		// why is a substring of the expected rejection: the right check fired.
		why string
	}{
		{"control: valid token", "", false, ""},
		{"alg none", forge(t, hdr("alg", "none"), claims, func([]byte) []byte { return nil }), true, "alg \"none\""},
		{"alg none without kid", forge(t, map[string]any{"alg": "none"}, claims, func([]byte) []byte { return nil }), true, "no kid"},
		{"alg NONE signed", forge(t, hdr("alg", "NONE"), claims, rs256(ourKey)), true, "alg \"NONE\""},
		{"HS256 keyed with our public key PEM", forge(t, hdr("alg", "HS256"), claims, hs256(pubPEM)), true, "alg \"HS256\""},
		{"HS256 keyed with our public key PKCS1 PEM", forge(t, hdr("alg", "HS256"), claims, hs256(pkcs1PEM)), true, "alg \"HS256\""},
		{"HS256 keyed with our public key DER", forge(t, hdr("alg", "HS256"), claims, hs256(pubDER)), true, "alg \"HS256\""},
		{"HS256 keyed with our modulus", forge(t, hdr("alg", "HS256"), claims, hs256(ourKey.N.Bytes())), true, "alg \"HS256\""},
		{"unknown kid", forge(t, hdr("kid", "attacker"), claims, rs256(attacker)), true, "unknown kid"},
		{"our kid, attacker key", forge(t, hdr(), claims, rs256(attacker)), true, "signature does not verify"},
		{"no kid, attacker key", forge(t, hdr("kid", nil), claims, rs256(attacker)), true, "no kid"},
		{"no kid, our key", forge(t, hdr("kid", nil), claims, rs256(ourKey)), false, "no kid"},
		{"jku to attacker JWKS", forge(t, hdr("kid", "attacker", "jku", evil.URL+"/jwks.json"), claims, rs256(attacker)), true, "[\"jku\"] not allowed"},
		{"x5u to attacker cert", forge(t, hdr("kid", "attacker", "x5u", evil.URL+"/cert.pem"), claims, rs256(attacker)), true, "[\"x5u\"] not allowed"},
		{"embedded jwk", forge(t, hdr("kid", "attacker", "jwk", attackerJWKMap), claims, rs256(attacker)), true, "[\"jwk\"] not allowed"},
		{"x5c attacker cert", forge(t, hdr("kid", "attacker", "x5c", []string{base64.StdEncoding.EncodeToString(certDER)}), claims, rs256(attacker)), true, "[\"x5c\"] not allowed"},
		{"jku on a token our key signed", forge(t, hdr("jku", evil.URL+"/jwks.json"), claims, rs256(ourKey)), false, "[\"jku\"] not allowed"},
		{"x5u on a token our key signed", forge(t, hdr("x5u", evil.URL+"/cert.pem"), claims, rs256(ourKey)), false, "[\"x5u\"] not allowed"},
		{"crit header", forge(t, hdr("crit", []string{"exp"}, "exp", 1), claims, rs256(ourKey)), false, "[\"crit\" \"exp\"] not allowed"},
		{"typ not JWT", forge(t, hdr("typ", "at+jwt"), claims, rs256(ourKey)), false, "typ"},
		{"RS512 with our key", forge(t, hdr("alg", "RS512"), claims, signRS512), true, "alg \"RS512\""},
		{"PS256 with our key", forge(t, hdr("alg", "PS256"), claims, signPS256), true, "alg \"PS256\""},
		{"ES256 header on RSA key", forge(t, hdr("alg", "ES256"), claims, rs256(ourKey)), true, "alg \"ES256\""},
		{"expired", mintAt(-time.Hour, testSubject, aud, 15*time.Minute), true, "expired"},
		{"future nbf", mintAt(time.Hour, testSubject, aud, 15*time.Minute), true, "not valid before"},
		{"wrong aud", mintAt(0, testSubject, "sts.amazonaws.com", 0), true, "audience"},
		{"wrong issuer", forge(t, hdr(), with(claims, "iss", "https://evil.example"), rs256(ourKey)), true, "issuer"},
		{"no exp", forge(t, hdr(), with(claims, "exp", nil), rs256(ourKey)), true, "required"},
		{"lifetime over an hour", forge(t, hdr(), with(claims, "exp", now.Add(2*time.Hour).Unix()), rs256(ourKey)), false, "lifetime"},
		{"two audiences", forge(t, hdr(), with(claims, "aud", []string{aud, "other"}), rs256(ourKey)), false, "audience"},
		{"sub of another sandbox", forge(t, hdr(), with(claims, "sub", SubjectFor("org-a", "sbx-2")), rs256(ourKey)), false, "subject"},
		{"no jti", forge(t, hdr(), with(claims, "jti", nil), rs256(ourKey)), false, "no jti"},
		{"ended sandbox", endedTok, false, "has ended"},
		{"non-canonical signature encoding", nonCanonical, false, "signature encoding"},
		{"truncated signature", valid[:len(valid)-4], true, "signature"},
		{"signature stripped", valid[:strings.LastIndexByte(valid, '.')+1], true, "signature does not verify"},
		{"whitespace inserted", valid[:20] + " " + valid[20:], false, "character"},
		{"JSON serialization", `{"payload":"` + strings.Split(valid, ".")[1] + `"}`, true, "character"},
		{"four parts", valid + ".AAAA", true, "3 dot-separated parts"},
		{"empty", "", true, "length 0"},
	}
	rp := env.relyingParty(t, aud)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok := tt.token
			if strings.HasPrefix(tt.name, "control") {
				// The harness itself must accept a good token, or every
				// rejection below proves nothing.
				if _, err := env.iss.Verify(ctx, valid, aud); err != nil {
					t.Fatalf("Verify(valid) = %v", err)
				}
				if _, err := env.rpVerify(ctx, rp, valid); err != nil {
					t.Fatalf("go-oidc rejected a valid token: %v", err)
				}
				return
			}
			c, err := env.iss.Verify(ctx, tok, aud)
			if !errors.Is(err, errdefs.ErrUnauthenticated) {
				t.Fatalf("Verify = %+v, %v; want ErrUnauthenticated", c, err)
			}
			if !strings.Contains(err.Error(), tt.why) {
				t.Fatalf("Verify rejected for %q, want a rejection mentioning %q", err, tt.why)
			}
			if tt.rp {
				if _, err := env.rpVerify(ctx, rp, tok); err == nil {
					t.Fatal("go-oidc accepted the token")
				}
			}
		})
	}
	if n := evilHits.Load(); n != 0 {
		t.Fatalf("the attacker's key server got %d requests", n)
	}
}
