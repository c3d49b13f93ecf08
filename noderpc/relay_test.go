package noderpc

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/metadata"
)

// nodeMetadata is a node's metadata service for tests: every request comes
// from sandbox id (as its source address would say) and goes to rc.
func nodeMetadata(t testing.TB, rc *RelayClient, id string) string {
	t.Helper()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc.ServeHTTP(w, r.WithContext(metadata.WithCaller(r.Context(), metadata.Sandbox{ID: id, Running: true})))
	}))
	t.Cleanup(hs.Close)
	return hs.URL
}

func get(t *testing.T, method, url, body string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// TestRelayOnlyForItsSandboxes: a node relays the MCP gateway and /api of
// the sandboxes placed on it to the control plane, which serves them with
// the caller set to that sandbox; another node (a valid certificate of the
// fleet) cannot relay for it, a sandbox that does not run gets nothing, a
// caller without a node certificate gets nothing; only the relayed routes
// pass, with nothing the sandbox sends naming the caller; answers stream
// event by event; the MCP body bound holds on the node's hop.
func TestRelayOnlyForItsSandboxes(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), "b"))
	if err != nil {
		t.Fatal(err)
	}
	on := map[string]string{"sb-a": a.ID, "sb-b": b.ID, "sb-ended": a.ID}
	release, hold := make(chan struct{}), make(chan struct{})
	var holding atomic.Int32
	var mu sync.Mutex
	var seen []string
	c.mux.Handle(RelayPrefix, &Relay{
		Admit:  c.fleet.AdmitCert,
		NodeOf: func(id string) string { return on[id] },
		Caller: func(_ context.Context, id string) (metadata.Sandbox, error) {
			if id == "sb-ended" {
				return metadata.Sandbox{}, fmt.Errorf("sandbox %q is not running: %w", id, errdefs.ErrFailedPrecondition)
			}
			return metadata.Sandbox{ID: id, OrgID: "org", Running: true}, nil
		},
		Log: c.fleet.log(),
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/mcp/hold" {
				holding.Add(1)
				defer holding.Add(-1)
				select {
				case <-hold:
				case <-r.Context().Done():
				}
				return
			}
			sb, ok := metadata.CallerFrom(r.Context())
			body, _ := io.ReadAll(r.Body)
			mu.Lock()
			seen = append(seen, fmt.Sprintf("%s %s %v %s xff=%q auth=%q", r.Method, r.URL.Path, ok, sb.ID, r.Header.Get("X-Forwarded-For"), r.Header.Get("Authorization")))
			mu.Unlock()
			if r.URL.Path == "/mcp/stream" {
				w.Header().Set("Content-Type", "text/event-stream")
				fmt.Fprint(w, "data: one\n\n")
				w.(http.Flusher).Flush()
				<-release
				fmt.Fprint(w, "data: two\n\n")
				return
			}
			fmt.Fprintf(w, "%s for %s (%d bytes)", r.URL.Path, sb.ID, len(body))
		}),
	})
	relayA, err := NewRelayClient(a, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	relayB, err := NewRelayClient(b, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}

	// Node a for its own sandbox: served as that sandbox.
	fromA := nodeMetadata(t, relayA, "sb-a")
	if code, body := get(t, "POST", fromA+"/mcp/tools", `{"x":1}`, "Authorization", "Bearer t", "X-Forwarded-For", "10.0.0.1"); code != 200 || body != "/mcp/tools for sb-a (7 bytes)" {
		t.Fatalf("own sandbox: %d %q", code, body)
	}
	if code, body := get(t, "GET", fromA+"/api/chalk.compute.v1.SandboxService/List", ""); code != 200 || !strings.Contains(body, "for sb-a") {
		t.Fatalf("own sandbox's /api: %d %q", code, body)
	}
	mu.Lock()
	if len(seen) != 2 || seen[0] != `POST /mcp/tools true sb-a xff="" auth="Bearer t"` {
		t.Fatalf("the control plane saw %q", seen)
	}
	mu.Unlock()
	// Other routes are not relayed (by the node, nor taken by the control plane).
	for _, p := range []string{"/v1/identity", "/mcp/../v1/identity", "/mcpx"} {
		if code, _ := get(t, "GET", fromA+p, ""); code != http.StatusNotFound && code != http.StatusMovedPermanently {
			t.Errorf("%s relayed: %d", p, code)
		}
	}
	// An MCP body over the bound stops at the node.
	if code, body := get(t, "POST", fromA+"/mcp/tools", strings.Repeat("x", MaxRelayMCPBody+1)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized MCP body: %d %q", code, body)
	}

	// Node b (or a, for b's sandbox) cannot relay for another node's sandbox.
	before := len(seen)
	for _, tc := range []struct {
		rc *RelayClient
		id string
	}{{relayB, "sb-a"}, {relayA, "sb-b"}, {relayA, "sb-nowhere"}} {
		if code, body := get(t, "POST", nodeMetadata(t, tc.rc, tc.id)+"/mcp/tools", "{}"); code != http.StatusForbidden || !strings.Contains(body, "is not placed on node") {
			t.Errorf("relay for %s by another node: %d %q", tc.id, code, body)
		}
	}
	if code, body := get(t, "POST", nodeMetadata(t, relayA, "sb-ended")+"/mcp/tools", "{}"); code != http.StatusForbidden || !strings.Contains(body, "not running") {
		t.Errorf("relay for an ended sandbox: %d %q", code, body)
	}
	mu.Lock()
	if len(seen) != before {
		t.Errorf("refused relays reached the handler: %q", seen[before:])
	}
	mu.Unlock()
	if !strings.Contains(c.logs.String(), "relay for a sandbox not on the node refused") {
		t.Errorf("the refusal is not logged: %s", c.logs)
	}
	// Without a node certificate (TLS to the fleet listener, no client cert).
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	res, err := anon.Post(c.url+RelayPrefix+"sb-a/mcp/tools", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusUnauthorized {
		t.Errorf("anonymous relay: %d", res.StatusCode)
	}

	// Streams: the first event arrives before the handler writes the second.
	res, err = http.Post(fromA+"/mcp/stream", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	br := bufio.NewReader(res.Body)
	line, err := br.ReadString('\n')
	if err != nil || line != "data: one\n" {
		t.Fatalf("first event: %q %v", line, err)
	}
	close(release)
	rest, _ := io.ReadAll(br)
	if string(rest) != "\ndata: two\n\n" {
		t.Fatalf("rest of the stream: %q", rest)
	}

	// A sandbox's requests in flight are bounded on the node's hop.
	done := make(chan int, MaxRelaysPerSandbox)
	for range MaxRelaysPerSandbox {
		go func() {
			res, err := http.Post(fromA+"/mcp/hold", "application/json", strings.NewReader("{}"))
			if err != nil {
				done <- 0
				return
			}
			res.Body.Close()
			done <- res.StatusCode
		}()
	}
	waitFor(t, "the held requests", func() bool { return holding.Load() == MaxRelaysPerSandbox })
	if code, body := get(t, "POST", fromA+"/mcp/tools", "{}"); code != http.StatusTooManyRequests {
		t.Errorf("request %d in flight: %d %q", MaxRelaysPerSandbox+1, code, body)
	}
	// Another sandbox is not held up by it.
	if code, body := get(t, "POST", nodeMetadata(t, relayA, "sb-ended")+"/mcp/tools", "{}"); code != http.StatusForbidden {
		t.Errorf("another sandbox meanwhile: %d %q", code, body)
	}
	close(hold)
	for range MaxRelaysPerSandbox {
		if code := <-done; code != http.StatusOK {
			t.Errorf("held request: %d", code)
		}
	}

	// An MCP answer that does not come within the bound is given up.
	slow, err := NewRelayClient(a, c.url, nil)
	if err != nil {
		t.Fatal(err)
	}
	slow.MCPHeaderTimeout = 200 * time.Millisecond
	hold = make(chan struct{})
	defer close(hold)
	if code, body := get(t, "POST", nodeMetadata(t, slow, "sb-a")+"/mcp/hold", "{}"); code != http.StatusGatewayTimeout {
		t.Errorf("no answer: %d %q, want 504", code, body)
	}
	// Without a Content-Length too.
	chunked, _ := http.NewRequest("POST", fromA+"/mcp/tools", io.MultiReader(strings.NewReader(strings.Repeat("x", 2*MaxRelayMCPBody))))
	if res, err := http.DefaultClient.Do(chunked); err != nil || res.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized chunked MCP body: %v %v", res.StatusCode, err)
	} else {
		res.Body.Close()
	}

	// A control plane out of reach: 502, without its address.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := "https://" + l.Addr().String()
	l.Close()
	down, err := NewRelayClient(a, gone, nil)
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, "POST", nodeMetadata(t, down, "sb-a")+"/mcp/tools", "{}"); code != http.StatusBadGateway || strings.Contains(body, "127.0.0.1") {
		t.Errorf("control plane out of reach: %d %q", code, body)
	}

	// A node removed from the fleet gets nothing relayed, even for a
	// sandbox still recorded on it, on a connection it already holds.
	// (A path of its own: the oversized bodies above may still reach the
	// handler, after their answer, as they are torn down.)
	if err := c.st.RemoveNode(ctx, a.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, "POST", fromA+"/mcp/after-removal", "{}"); code != http.StatusForbidden || !strings.Contains(body, "removed from the fleet") {
		t.Errorf("relay by a removed node: %d %q", code, body)
	}
	if code, body := get(t, "POST", nodeMetadata(t, relayB, "sb-b")+"/mcp/after-removal", "{}"); code != http.StatusOK {
		t.Errorf("another node after a removal: %d %q", code, body)
	}
	mu.Lock()
	var after []string
	for _, s := range seen {
		if strings.Contains(s, "/mcp/after-removal") {
			after = append(after, s)
		}
	}
	mu.Unlock()
	if len(after) != 1 || !strings.Contains(after[0], " sb-b ") {
		t.Errorf("after the removal the handler saw %q, want only sb-b's request", after)
	}
}
