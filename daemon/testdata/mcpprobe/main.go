// Command mcpprobe is the MCP client the gateway tests run inside a
// sandbox: the official Go SDK's client over Streamable HTTP, with the
// sandbox's workload token from the metadata service.
//
//	mcpprobe sdk URL               list tools, call add, whoami, secret_tool, then slow (printing its progress as it comes)
//	mcpprobe raw METHOD URL TOKEN BODY [Header=Value...]
//	                               one request; TOKEN is "meta:AUDIENCE" (from the metadata service), "-" (none) or a JWT;
//	                               prints "status: N", "session: ID" and the body
//	mcpprobe upstream ADDR         serve internal/mcptest's upstream on ADDR (chalkbench)
//	mcpprobe bench URL AUD N CONC SECS
//	                               N sequential tools/call of "add", then CONC sessions calling for SECS seconds;
//	                               prints a JSON line (AUD "-": no token, for the direct baseline)
//	                               with the client's CPU time per call of the concurrent sessions
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/chalkcompute/chalkcompute/internal/mcptest"
)

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "sdk":
		err = sdk(os.Args[2])
	case len(os.Args) >= 6 && os.Args[1] == "raw":
		err = raw(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6:])
	case len(os.Args) == 3 && os.Args[1] == "upstream":
		err = serveUpstream(os.Args[2])
	case len(os.Args) == 7 && os.Args[1] == "bench":
		err = bench(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6])
	default:
		err = fmt.Errorf("usage: mcpprobe sdk URL | raw METHOD URL TOKEN BODY [Header=Value...]")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mcpprobe:", err)
		os.Exit(1)
	}
}

// token fetches the sandbox's identity token for audience.
func token(audience string) (string, error) {
	req, _ := http.NewRequest(http.MethodGet, "http://169.254.169.254/v1/identity/token?audience="+url.QueryEscape(audience), nil)
	req.Header.Set("Metadata-Flavor", "chalk")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var t struct {
		Token string `json:"token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&t); err != nil || t.Token == "" {
		return "", fmt.Errorf("token for %s: %d %v", audience, resp.StatusCode, err)
	}
	return t.Token, nil
}

// bearer adds the token to every request, sent by rt (nil:
// http.DefaultTransport).
// selfCPU is this process's user + system time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type bearer struct {
	tok string
	rt  http.RoundTripper
}

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.tok)
	if b.rt != nil {
		return b.rt.RoundTrip(r)
	}
	return http.DefaultTransport.RoundTrip(r)
}

func text(r *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range r.Content {
		if t, ok := c.(*mcp.TextContent); ok {
			b.WriteString(t.Text)
		}
	}
	return b.String()
}

func sdk(endpoint string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tok, err := token(endpoint)
	if err != nil {
		return err
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "mcpprobe", Version: "1"}, &mcp.ClientOptions{
		ProgressNotificationHandler: func(_ context.Context, r *mcp.ProgressNotificationClientRequest) {
			fmt.Printf("progress: %s\n", r.Params.Message)
		},
	})
	s, err := c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: endpoint, HTTPClient: &http.Client{Transport: bearer{tok: tok}}}, nil)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer s.Close()
	fmt.Printf("session: %s\n", s.ID())
	lt, err := s.ListTools(ctx, nil)
	if err != nil {
		return fmt.Errorf("tools/list: %w", err)
	}
	var names []string
	for _, t := range lt.Tools {
		names = append(names, t.Name)
	}
	slices.Sort(names)
	fmt.Printf("tools: %s\n", strings.Join(names, ","))
	for _, call := range []mcp.CallToolParams{
		{Name: "add", Arguments: map[string]any{"a": 2, "b": 3}},
		{Name: "whoami"},
		{Name: "secret_tool"},
	} {
		res, err := s.CallTool(ctx, &call)
		switch {
		case err != nil:
			fmt.Printf("%s: error: %v\n", call.Name, err)
		case res.IsError:
			fmt.Printf("%s: tool error: %s\n", call.Name, text(res))
		default:
			fmt.Printf("%s: %s\n", call.Name, text(res))
		}
	}
	p := &mcp.CallToolParams{Name: "slow"}
	p.SetProgressToken("p1")
	res, err := s.CallTool(ctx, p)
	if err != nil {
		return fmt.Errorf("slow: %w", err)
	}
	fmt.Printf("slow: %s\n", text(res))
	return nil
}

func raw(method, endpoint, tok, body string, headers []string) error {
	switch {
	case tok == "-":
		tok = ""
	case strings.HasPrefix(tok, "meta:"):
		var err error
		if tok, err = token(strings.TrimPrefix(tok, "meta:")); err != nil {
			return err
		}
	}
	var rd io.Reader
	if body != "" && body != "-" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, endpoint, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, "=")
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	fmt.Printf("status: %d\nsession: %s\n%s\n", resp.StatusCode, resp.Header.Get("Mcp-Session-Id"), b)
	return nil
}

func serveUpstream(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	return http.Serve(l, mcptest.New("Authorization"))
}

func connect(ctx context.Context, endpoint, aud string) (*mcp.ClientSession, error) {
	// Each session its own transport, the same on both paths (a shared
	// http.DefaultTransport keeps 2 idle connections per host: 8 sessions
	// through the gateway opened a connection every few calls, the direct
	// ones none).
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	if aud != "-" {
		tok, err := token(aud)
		if err != nil {
			return nil, err
		}
		hc.Transport = bearer{tok: tok, rt: hc.Transport}
	}
	c := mcp.NewClient(&mcp.Implementation{Name: "mcpprobe-bench", Version: "1"}, nil)
	return c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: endpoint, HTTPClient: hc, DisableStandaloneSSE: true}, nil)
}

func bench(endpoint, aud, nS, concS, secsS string) error {
	n, _ := strconv.Atoi(nS)
	conc, _ := strconv.Atoi(concS)
	secs, _ := strconv.Atoi(secsS)
	ctx := context.Background()
	s, err := connect(ctx, endpoint, aud)
	if err != nil {
		return err
	}
	defer s.Close()
	args := &mcp.CallToolParams{Name: "add", Arguments: map[string]any{"a": 1, "b": 2}}
	lat := make([]time.Duration, 0, n)
	for i := range n + n/10 {
		t0 := time.Now()
		if _, err := s.CallTool(ctx, args); err != nil {
			return err
		}
		if i >= n/10 { // the first tenth warms connections
			lat = append(lat, time.Since(t0))
		}
	}
	slices.Sort(lat)
	var calls, concCalls atomic.Int64 // all calls; the concurrent sessions' calls
	calls.Store(int64(n + n/10))
	var wg sync.WaitGroup
	cpu0 := selfCPU()
	deadline := time.Now().Add(time.Duration(secs) * time.Second)
	errs := make(chan error, conc)
	for range conc {
		cs, err := connect(ctx, endpoint, aud)
		if err != nil {
			return err
		}
		defer cs.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if _, err := cs.CallTool(ctx, args); err != nil {
					errs <- err
					return
				}
				calls.Add(1)
				concCalls.Add(1)
			}
		}()
	}
	wg.Wait()
	cpu := selfCPU() - cpu0
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	out, _ := json.Marshal(map[string]any{
		"median_us": lat[len(lat)/2].Microseconds(), "p90_us": lat[len(lat)*9/10].Microseconds(),
		"calls_per_sec": float64(concCalls.Load()) / float64(secs), "calls": calls.Load(),
		"client_cpu_us": float64(cpu.Microseconds()) / float64(max(concCalls.Load(), 1)),
	})
	fmt.Println(string(out))
	return nil
}
