package ingress

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Tokens are "<expiry unix seconds>.<base64url HMAC-SHA256>" where the MAC
// covers a domain string, the sandbox id, the port and the expiry: a token
// opens one port of one sandbox until it expires, and nothing else.

func mac(key []byte, id string, port uint16, exp int64) []byte {
	h := hmac.New(sha256.New, key)
	fmt.Fprintf(h, "chalk-ingress-v1\x00%s\x00%d\x00%d", id, port, exp)
	return h.Sum(nil)
}

// Sign returns a token for port of sandbox id valid until exp.
func Sign(key []byte, id string, port uint16, exp time.Time) string {
	e := exp.Unix()
	return strconv.FormatInt(e, 10) + "." + base64.RawURLEncoding.EncodeToString(mac(key, id, port, e))
}

// Verify reports whether tok is a token for port of sandbox id that has
// not expired at now.
func Verify(key []byte, tok, id string, port uint16, now time.Time) bool {
	es, sig, ok := strings.Cut(tok, ".")
	if !ok || len(es) > 12 || len(sig) != 43 {
		return false
	}
	e, err := strconv.ParseInt(es, 10, 64)
	if err != nil || !now.Before(time.Unix(e, 0)) {
		return false
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		return false
	}
	return hmac.Equal(got, mac(key, id, port, e))
}
