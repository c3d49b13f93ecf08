package identity

import (
	"context"
	"strings"
	"testing"
	"time"
)

// FuzzVerify feeds random and mutated tokens to Verify: it must never
// panic, and it must accept nothing but the exact tokens we minted.
func FuzzVerify(f *testing.F) {
	clock := newFakeClock()
	iss, err := New(context.Background(), Config{Issuer: "https://id.example.com", Dir: f.TempDir(), Now: clock.Now})
	if err != nil {
		f.Fatal(err)
	}
	ctx := context.Background()
	valid := map[string]bool{}
	for _, aud := range []string{"api", "sts.amazonaws.com"} {
		tok, _, err := iss.Mint(ctx, testSubject, aud, time.Hour)
		if err != nil {
			f.Fatal(err)
		}
		valid[tok] = true
		f.Add(tok)
		parts := strings.Split(tok, ".")
		f.Add(parts[0] + "." + parts[1] + ".")
		f.Add(parts[0] + ".." + parts[2])
		f.Add("eyJhbGciOiJub25lIn0." + parts[1] + ".")
	}
	f.Add("")
	f.Add("...")
	f.Add("a.b.c")
	f.Add(`{"protected":"","payload":"","signature":""}`)
	f.Fuzz(func(t *testing.T, tok string) {
		for _, aud := range []string{"api", "sts.amazonaws.com"} {
			c, err := iss.Verify(ctx, tok, aud)
			if err == nil && !valid[tok] {
				t.Fatalf("Verify accepted a token we never minted: %q => %+v", tok, c)
			}
			if err == nil && c.Audience != aud {
				t.Fatalf("accepted for audience %q a token for %q", aud, c.Audience)
			}
		}
	})
}
