package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestChalkQuery: the seed's `sandbox.exec("chalk", "query", "--in",
// "user.id=1", "--out", "user.score")` with no configuration in the sandbox.
// The query server (in the fake internet) is an OIDC relying party: it
// verifies the bearer token with go-oidc against chalkd's discovery and JWKS,
// with its own URL as the audience, and answers as Chalk's online query API
// does. The sandbox authenticates as itself; a token for another audience is
// refused.
func TestChalkQuery(t *testing.T) {
	const queryURL = "http://198.51.100.70"
	inet := chalktest.NewFakeInternet(t)
	var (
		mu       sync.Mutex
		verifier *oidc.IDTokenVerifier
		subjects []string
	)
	inet.Serve("198.51.100.70", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/query/online" {
			http.Error(w, "not found", http.StatusNotFound)
			return
		}
		mu.Lock()
		v := verifier
		mu.Unlock()
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if v == nil || !ok {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		idt, err := v.Verify(r.Context(), tok)
		if err != nil {
			http.Error(w, "token refused: "+err.Error(), http.StatusUnauthorized)
			return
		}
		var q struct {
			Inputs  map[string]any `json:"inputs"`
			Outputs []string       `json:"outputs"`
		}
		if err := json.NewDecoder(r.Body).Decode(&q); err != nil || q.Inputs["user.id"] != 1.0 || len(q.Outputs) != 1 || q.Outputs[0] != "user.score" {
			http.Error(w, fmt.Sprintf("bad query %+v (%v)", q, err), http.StatusBadRequest)
			return
		}
		mu.Lock()
		subjects = append(subjects, idt.Subject)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"data":[{"field":"user.score","value":0.93,"ts":"2026-11-23T00:00:00Z"}],"errors":[]}`)
	}))
	n := chalktest.StartOpts(t, chalktest.Options{Internet: inet, Args: []string{"--query-url", queryURL}})
	ctx := ctxT(t, 2*time.Minute)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", n.Socket)
	}}}
	provider, err := oidc.NewProvider(oidc.ClientContext(ctx, hc), "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	mu.Lock()
	verifier = provider.Verifier(&oidc.Config{ClientID: queryURL})
	mu.Unlock()

	sb := create(t, n.Client())
	if out := mustExec(t, sb, "chalk", "query", "--in", "user.id=1", "--out", "user.score"); out != "user.score\t0.93\n" {
		t.Fatalf("chalk query: %q", out)
	}
	out := mustExec(t, sb, "chalk", "query", "--in", "user.id=1", "--out", "user.score", "-o", "json")
	var res struct {
		Data []struct {
			Field string  `json:"field"`
			Value float64 `json:"value"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Data) != 1 || res.Data[0].Value != 0.93 {
		t.Fatalf("chalk query -o json: %q %v", out, err)
	}
	mu.Lock()
	got := append([]string(nil), subjects...)
	mu.Unlock()
	want := "chalk:org:default:sbx:" + sb.ID()
	if len(got) != 2 || got[0] != want || got[1] != want {
		t.Fatalf("query server saw subjects %q, want %q twice", got, want)
	}
	// The sandbox's token for the Chalk API is not one for the query server.
	code, stderr, _ := execCode(ctx, sb, "sh", "-c", "chalk query --query-token-file $CHALK_API_TOKEN_FILE --in user.id=1 --out user.score")
	if code <= 0 || !strings.Contains(stderr, "401") || !strings.Contains(stderr, "audience") {
		t.Fatalf("query with a token for another audience: code %d, %q", code, stderr)
	}
	// Bad flags name the flag; outside a sandbox there is no query server.
	if code, stderr, _ := execCode(ctx, sb, "chalk", "query", "--in", "user.id", "--out", "user.score"); code == 0 || !strings.Contains(stderr, `--in "user.id"`) {
		t.Fatalf("bad --in: code %d, %q", code, stderr)
	}
	if _, stderr, code := n.CLI("query", "--in", "user.id=1", "--out", "user.score"); code == 0 || !strings.Contains(stderr, "no Chalk query server") {
		t.Fatalf("chalk query on the host without a query server: code %d, %q", code, stderr)
	}
}
