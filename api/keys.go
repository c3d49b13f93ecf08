package api

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"hash/crc32"
	"math/big"
	"strings"
)

// API key format, recognisable by secret scanners (as GitHub's ghp_ keys):
//
//	chalk_<40 base62 random chars><6 base62 chars: CRC-32 of the random part>
//
// 40 base62 characters carry 238 bits. The checksum lets a scanner tell a
// real key from a look-alike without asking chalkd. The first 8 random
// characters, with the prefix, are the key's public prefix (shown in
// listings and the audit trail). Keys made before teams ("chalk_" and
// base64url) still authenticate: every key is looked up by its SHA-256.
const (
	KeyPrefix     = "chalk_"
	keyBodyLen    = 40
	keyCheckLen   = 6
	keyPublicLen  = 8
	base62Digits  = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	keyIDRandomHx = 8
)

func base62(n uint64, width int) string {
	b := make([]byte, width)
	for i := width - 1; i >= 0; i-- {
		b[i] = base62Digits[n%62]
		n /= 62
	}
	return string(b)
}

// NewKey returns a fresh API key secret, its public prefix and the hash stored for it.
func NewKey() (secret, prefix, hash string) {
	body := make([]byte, keyBodyLen)
	max := big.NewInt(62)
	for i := range body {
		n, err := rand.Int(rand.Reader, max)
		if err != nil {
			panic(err)
		}
		body[i] = base62Digits[n.Int64()]
	}
	secret = KeyPrefix + string(body) + base62(uint64(crc32.ChecksumIEEE(body)), keyCheckLen)
	return secret, KeyPublicPrefix(secret), HashKey(secret)
}

// KeyPublicPrefix is the part of a key that may be shown: chalk_ and 8 characters.
func KeyPublicPrefix(secret string) string {
	if len(secret) < len(KeyPrefix)+keyPublicLen {
		return secret
	}
	return secret[:len(KeyPrefix)+keyPublicLen]
}

// ValidKeyChecksum reports whether s has the format of a key made by NewKey
// with an intact checksum (what a secret scanner checks).
func ValidKeyChecksum(s string) bool {
	body, ok := strings.CutPrefix(s, KeyPrefix)
	if !ok || len(body) != keyBodyLen+keyCheckLen {
		return false
	}
	for i := 0; i < len(body); i++ {
		if strings.IndexByte(base62Digits, body[i]) < 0 {
			return false
		}
	}
	return base62(uint64(crc32.ChecksumIEEE([]byte(body[:keyBodyLen]))), keyCheckLen) == body[keyBodyLen:]
}

// HashKey is the stored form of a key.
func HashKey(secret string) string {
	s := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(s[:])
}

func newKeyID() string {
	b := make([]byte, keyIDRandomHx)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return "key-" + hex.EncodeToString(b)
}
