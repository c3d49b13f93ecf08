package metadata

import (
	"encoding/json"
	"io"
	"net/http"
	"sort"
	"testing"
	"time"
)

// BenchmarkTokenEndpoint mints tokens through the metadata service over a
// real loopback HTTP connection (keep-alive), as a sandbox would. The target
// is a median under 1 ms. "fresh" signs a new token per request; "cached"
// is the default configuration with a client polling the same audience.
func BenchmarkTokenEndpoint(b *testing.B) {
	for _, bc := range []struct {
		name string
		cfg  Config
	}{
		{"fresh", Config{DisableTokenCache: true}},
		{"cached", Config{}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			env := newEnv(b, bc.cfg)
			c := clientFrom(b, addrA)
			req, err := http.NewRequest("GET", env.mdSrv.URL+TokenPath+"?audience=sts.amazonaws.com", nil)
			if err != nil {
				b.Fatal(err)
			}
			req.Header.Set(FlavorHeader, FlavorValue)
			durs := make([]time.Duration, 0, 1024)
			for b.Loop() {
				t0 := time.Now()
				resp, err := c.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				var tr TokenResponse
				err = json.NewDecoder(resp.Body).Decode(&tr)
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 || tr.Token == "" {
					b.Fatalf("status %d, %v", resp.StatusCode, err)
				}
				durs = append(durs, time.Since(t0))
			}
			sort.Slice(durs, func(i, j int) bool { return durs[i] < durs[j] })
			b.ReportMetric(float64(durs[len(durs)/2].Microseconds())/1000, "ms-p50")
			b.ReportMetric(float64(durs[len(durs)*99/100].Microseconds())/1000, "ms-p99")
		})
	}
}
