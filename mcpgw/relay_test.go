package mcpgw

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// countingListener counts the writes to the connections it accepts.
type countingListener struct {
	net.Listener
	writes atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: &l.writes}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.n.Add(1)
	return c.Conn.Write(b)
}

// TestAnswerInOneWrite: the SSE answer of a POST (headers, the event, the
// end of the stream) reaches the sandbox in one write, not one per part.
func TestAnswerInOneWrite(t *testing.T) {
	f := newHostile(t) // stateless upstream: no session needed
	// The upstream ends its stream right after the answer; on a loaded
	// machine that can take longer than the hold, which then flushes
	// (correct, but a second write): hold for long here.
	f.gw.hold = time.Minute
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: ln}
	srv := httptest.NewUnstartedServer(f.gw)
	srv.Listener = cl
	srv.Start()
	defer srv.Close()
	for i := range 3 {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/mcp/tools", strings.NewReader(`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		req.Header.Set("Mcp-Protocol-Version", "2025-06-18")
		before := cl.writes.Load()
		resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/tools")}}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" || !strings.Contains(string(b), `"id":7`) || !strings.Contains(string(b), `"text":"3"`) {
			t.Fatalf("call %d: %d %s %s", i, resp.StatusCode, resp.Header.Get("Content-Type"), b)
		}
		if n := cl.writes.Load() - before; n != 1 {
			t.Errorf("call %d: the answer took %d writes, want 1", i, n)
		}
	}
}

// TestHeldAnswerIsFlushed: an upstream that keeps a POST's stream open
// after its answer still has the answer delivered at once (the gateway
// holds the last event only briefly, waiting for the stream's end), and
// what it sends after the answer still reaches the sandbox.
func TestHeldAnswerIsFlushed(t *testing.T) {
	release := make(chan struct{})
	more := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			ID json.RawMessage `json:"id"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":%s,\"result\":{}}\n\n", req.ID)
		w.(http.Flusher).Flush()
		select { // the stream stays open
		case <-more:
		case <-r.Context().Done():
			return
		}
		fmt.Fprint(w, "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"level\":\"info\",\"data\":\"after\"}}\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer up.Close()
	defer close(release)
	f := newFixture(t, "Authorization")
	f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, up.URL))
	f.servers["open"] = &Upstream{Name: "open", URL: up.URL, Credential: secret}
	// The stream's idle bound is minutes: the answer must come long before.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, f.url("open"), strings.NewReader(`{"jsonrpc":"2.0","id":"a","method":"ping"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/open")}}).Do(req)
	if err != nil {
		t.Fatalf("the answer's headers did not arrive while the upstream kept the stream open: %v", err)
	}
	defer resp.Body.Close()
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	waitLine := func(want string) {
		t.Helper()
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("the stream ended before %q", want)
				}
				if strings.Contains(l, want) {
					return
				}
			case <-ctx.Done():
				t.Fatalf("%q did not arrive while the upstream kept the stream open", want)
			}
		}
	}
	waitLine(`"id":"a","result":{}`)
	close(more)
	waitLine(`"data":"after"`)
}

// TestSSEStateIsReset: relaySSE's reader and event buffers are reused
// across streams; a stream that ended inside an event leaves nothing of it
// to the next stream.
func TestSSEStateIsReset(t *testing.T) {
	g, err := New(Config{
		Upstream: func(context.Context, string, string) (*Upstream, error) { return nil, nil },
		Verify:   func(context.Context, string, string) (Claims, error) { return Claims{}, nil },
		Caller:   func(*http.Request) (Caller, bool) { return Caller{}, false },
	})
	if err != nil {
		t.Fatal(err)
	}
	up := &Upstream{Name: "u", Credential: "credential-of-the-upstream"}
	relay := func(stream string) string {
		w := httptest.NewRecorder()
		if err := g.relaySSE(w, io.NopCloser(strings.NewReader(stream)), &call{up: up, det: up.detector()}); err != nil {
			t.Fatal(err)
		}
		return w.Body.String()
	}
	for i := range 20 {
		if got := relay(fmt.Sprintf("id: %d\nevent: message\n\nid: leak-%d\nevent: cut\ndata: {\"jsonrpc\":", i, i)); got != fmt.Sprintf("id: %d\nevent: message\n\n", i) {
			t.Fatalf("stream %d: relayed %q", i, got)
		}
		if got := relay("id: next\n\n"); got != "id: next\n\n" {
			t.Fatalf("the stream after %d: relayed %q, want only its own event", i, got)
		}
	}
}

// TestJSONAnswerTimeout: a JSON answer whose body does not complete within
// the gateway's Timeout is refused with 502 (not waited for), the
// upstream's connection is closed (not kept with half an answer in it), and
// the audit records the error. readLimited reads in the handler's
// goroutine; its timer must end the read in progress.
func TestJSONAnswerTimeout(t *testing.T) {
	gone := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		fmt.Fprint(w, `{"jsonrpc":"2.0",`)
		w.(http.Flusher).Flush()
		select { // the rest never comes
		case <-r.Context().Done():
			close(gone)
		case <-time.After(30 * time.Second):
		}
	}))
	defer up.Close()
	f := newFixture(t, "Authorization")
	f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, up.URL))
	f.gw.cfg.Timeout = 300 * time.Millisecond
	f.servers["stalls"] = &Upstream{Name: "stalls", URL: up.URL, Credential: secret}
	start := time.Now()
	req, _ := http.NewRequest(http.MethodPost, f.url("stalls"), strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/stalls")}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	status, body := resp.StatusCode, string(b)
	if status != http.StatusBadGateway || !strings.Contains(body, "no complete answer in 300ms") {
		t.Fatalf("stalled JSON answer: %d %s, want 502 naming the timeout", status, body)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the gateway answered after %s, want about its 300ms Timeout", d)
	}
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream's connection stayed open after the timed-out answer")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	found := false
	for _, a := range f.audit {
		if a.Server == "stalls" && a.Status == http.StatusBadGateway && strings.Contains(a.Decision, "no complete answer") {
			found = true
		}
	}
	if !found {
		t.Fatalf("no audit record of the timed-out answer: %+v", f.audit)
	}
}
