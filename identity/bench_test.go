package identity

import (
	"context"
	"sort"
	"testing"
	"time"
)

func benchIssuer(b *testing.B, alg string) *Issuer {
	b.Helper()
	iss, err := New(context.Background(), Config{Issuer: "https://issuer.example.com", Dir: b.TempDir(), Alg: alg})
	if err != nil {
		b.Fatal(err)
	}
	return iss
}

var benchSubject = Subject{OrgID: "org-1", SandboxID: "sbx-0123456789abcdef", ImageDigest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", NetworkPolicy: "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210", CreatedBy: "user:alice"}

// BenchmarkMint measures signing one token; the target is a median under 1 ms.
func BenchmarkMint(b *testing.B) {
	for _, alg := range []string{AlgRS256, AlgES256} {
		b.Run(alg, func(b *testing.B) {
			iss := benchIssuer(b, alg)
			ctx := context.Background()
			durs := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for b.Loop() {
				t0 := time.Now()
				if _, _, err := iss.Mint(ctx, benchSubject, "sts.amazonaws.com", 0); err != nil {
					b.Fatal(err)
				}
				durs = append(durs, time.Since(t0))
			}
			reportLatency(b, durs)
		})
	}
}

// BenchmarkVerify measures verifying one token on one core; the target is
// at least 20,000 verifications per second.
func BenchmarkVerify(b *testing.B) {
	for _, alg := range []string{AlgRS256, AlgES256} {
		b.Run(alg, func(b *testing.B) {
			iss := benchIssuer(b, alg)
			ctx := context.Background()
			tok, _, err := iss.Mint(ctx, benchSubject, "sts.amazonaws.com", 0)
			if err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			n := 0
			for b.Loop() {
				if _, err := iss.Verify(ctx, tok, "sts.amazonaws.com"); err != nil {
					b.Fatal(err)
				}
				n++
			}
			b.ReportMetric(float64(n)/time.Since(start).Seconds(), "verifies/s")
		})
	}
}

func reportLatency(b *testing.B, durs []time.Duration) {
	if len(durs) == 0 {
		return
	}
	sort.Slice(durs, func(i, j int) bool { return durs[i] < durs[j] })
	b.ReportMetric(float64(durs[len(durs)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(durs[len(durs)*99/100].Microseconds())/1000, "ms-p99")
}
