package mcpgw

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/internal/mcptest"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/store"
)

// BenchmarkGatewayHop measures what a tools/call costs the process that
// runs the gateway, as chalkd serves it: the metadata service's HTTP
// server and listener, the gateway, its audit records drained by a
// goroutine. The sandbox's client (8 sessions of the official SDK, as
// chalkbench's throughput row, but paced at hopRate calls/s in all, so
// that the machine's load changes the work per call less) and the upstream
// (the official SDK's server) run in child processes, so this process's CPU
// time per call is the gateway hop's alone: "cpu-us/call" (user + system, getrusage), and
// "syscalls/call" (read and write system calls, /proc/self/io). CPU time is
// what a loaded shared machine distorts least; throughput with 8 sessions
// on 2 cores is bound by it. Run with -benchtime=1x (each run lasts
// hopSeconds whatever b.N).
func BenchmarkGatewayHop(b *testing.B) { gatewayHop(b, "upstream") }

// BenchmarkGatewayHopJSON is BenchmarkGatewayHop with an upstream that
// answers POSTs with JSON bodies instead of SSE streams (the SDK's
// JSONResponse option, as many servers do).
func BenchmarkGatewayHopJSON(b *testing.B) { gatewayHop(b, "upstream-json") }

func gatewayHop(b *testing.B, upstream string) {
	up := startHopChild(b, upstream, "")
	upURL := "http://" + up.addr + "/"
	server := &Upstream{Name: "tools", URL: upURL, Credential: secret, Rate: 1e9, Tools: []string{"add", "whoami"}}
	audits := make(chan store.MCPAudit, 8192)
	go func() {
		for range audits {
		}
	}()
	gw, err := New(Config{
		Upstream: func(context.Context, string, string) (*Upstream, error) { return server, nil },
		Verify: func(_ context.Context, token, aud string) (Claims, error) {
			return Claims{Subject: "chalk:org:org1:sbx:sb1", SandboxID: "sb1", Expiry: time.Now().Add(time.Hour)}, nil
		},
		Caller: func(r *http.Request) (Caller, bool) {
			sb, ok := metadata.CallerFrom(r.Context())
			return Caller{SandboxID: sb.ID, OrgID: sb.OrgID, Labels: map[string]string{}}, ok
		},
		Audit:      func(a store.MCPAudit) { audits <- a },
		AllowAddrs: []netip.AddrPort{netip.MustParseAddrPort(up.addr)},
	})
	if err != nil {
		b.Fatal(err)
	}
	hopMeasure(b, gw)
}

// BenchmarkBareHop is BenchmarkGatewayHop with a bare proxy in the
// gateway's place: the same metadata service (server, listener), the
// gateway's HTTP/1.1 transport under an http.Client, the body forwarded
// as it came and the answer copied back unparsed, with the headers the
// gateway passes; no token, policy, JSON, session mapping or audit. It is
// the floor of a gateway built on net/http's server and this transport:
// BenchmarkGatewayHop's figure less this one is the gateway's own work.
func BenchmarkBareHop(b *testing.B) {
	up := startHopChild(b, "upstream", "")
	upURL := "http://" + up.addr + "/"
	client := &http.Client{Transport: newH1Transport((&net.Dialer{}).DialContext, http.DefaultTransport, DefaultTimeout)}
	hopMeasure(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		req, err := http.NewRequestWithContext(r.Context(), r.Method, upURL, bytes.NewReader(body))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		for _, k := range []string{"Accept", "Content-Type", "Mcp-Protocol-Version", "Mcp-Session-Id"} {
			if v := r.Header.Get(k); v != "" {
				req.Header.Set(k, v)
			}
		}
		req.Header.Set("Authorization", "Bearer "+secret)
		resp, err := client.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for _, k := range []string{"Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version"} {
			if v := resp.Header.Get(k); v != "" {
				w.Header().Set(k, v)
			}
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	}))
}

// hopMeasure serves h as chalkd serves the gateway (the metadata service's
// server and listener, at /mcp/) and runs the client child b.N times,
// reporting this process's CPU time and read/write system calls per call.
func hopMeasure(b *testing.B, h http.Handler) {
	md, err := metadata.New(metadata.Config{Issuer: hopMinter{}, Resolver: hopResolver{}})
	if err != nil {
		b.Fatal(err)
	}
	md.Handle("/mcp/", h, metadata.WithoutFlavorHeader())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := md.HTTPServer()
	go srv.Serve(md.Listener(ln))
	defer srv.Close()
	for b.Loop() {
		cl := startHopChild(b, "client", "http://"+ln.Addr().String()+"/mcp/tools")
		if !cl.sc.Scan() || cl.sc.Text() != "start" {
			b.Fatalf("client: %q", cl.sc.Text())
		}
		cpu0, io0 := selfCPU(), selfIO()
		if !cl.sc.Scan() {
			b.Fatal("client ended")
		}
		cpu1, io1 := selfCPU(), selfIO()
		calls, err := strconv.ParseInt(strings.TrimPrefix(cl.sc.Text(), "calls "), 10, 64)
		if err != nil || calls == 0 {
			b.Fatalf("client: %q", cl.sc.Text())
		}
		b.ReportMetric(float64(cpu1-cpu0)/float64(calls)/1e3, "cpu-us/call")
		b.ReportMetric(float64(io1-io0)/float64(calls), "syscalls/call")
		b.ReportMetric(float64(calls)/hopSeconds, "calls/s")
		_ = cl.cmd.Wait()
	}
}

const (
	hopSeconds = 3
	hopRate    = 500 // calls per second, all sessions together
)

type hopResolver struct{}

func (hopResolver) SandboxByAddr(_ context.Context, a netip.Addr) (metadata.Sandbox, bool) {
	return metadata.Sandbox{ID: "sb1", OrgID: "org1", Running: true}, a.IsLoopback()
}

type hopMinter struct{}

func (hopMinter) Mint(context.Context, identity.Subject, string, time.Duration) (string, time.Time, error) {
	return "", time.Time{}, fmt.Errorf("not in this benchmark")
}
func (hopMinter) Now() time.Time { return time.Now() }
func (hopMinter) URL() string    { return "http://issuer.invalid" }

type hopChild struct {
	cmd  *exec.Cmd
	sc   *bufio.Scanner
	addr string
}

// startHopChild runs this test binary as the upstream or the client
// (TestHopChild).
func startHopChild(b *testing.B, role, url string) *hopChild {
	cmd := exec.Command(os.Args[0], "-test.run=^TestHopChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "MCPGW_HOP_CHILD="+role, "MCPGW_HOP_URL="+url)
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	c := &hopChild{cmd: cmd, sc: bufio.NewScanner(out)}
	if strings.HasPrefix(role, "upstream") {
		if !c.sc.Scan() {
			b.Fatal("upstream did not start")
		}
		c.addr = c.sc.Text()
	}
	return c
}

// TestHopChild is BenchmarkGatewayHop's child processes (skipped otherwise).
func TestHopChild(t *testing.T) {
	switch os.Getenv("MCPGW_HOP_CHILD") {
	case "upstream", "upstream-json":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		fmt.Println(ln.Addr())
		var opts *mcp.StreamableHTTPOptions
		if os.Getenv("MCPGW_HOP_CHILD") == "upstream-json" {
			opts = &mcp.StreamableHTTPOptions{JSONResponse: true}
		}
		_ = http.Serve(ln, mcptest.NewWith("Authorization", opts))
	case "client":
		hopClient(t, os.Getenv("MCPGW_HOP_URL"))
	default:
		t.Skip("BenchmarkGatewayHop's child")
	}
}

func hopClient(t *testing.T, url string) {
	ctx := context.Background()
	args := &mcp.CallToolParams{Name: "add", Arguments: map[string]any{"a": 1, "b": 2}}
	var sessions []*mcp.ClientSession
	for range 8 {
		hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
		c := mcp.NewClient(&mcp.Implementation{Name: "hop", Version: "1"}, nil)
		s, err := c.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: url, HTTPClient: &http.Client{Transport: bearerRT{hc.Transport}}, DisableStandaloneSSE: true}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for range 20 { // warm connections and pools
			if _, err := s.CallTool(ctx, args); err != nil {
				t.Fatal(err)
			}
		}
		sessions = append(sessions, s)
	}
	fmt.Println("start")
	var calls atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(hopSeconds * time.Second)
	for _, s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Second * time.Duration(len(sessions)) / hopRate)
			defer tick.Stop()
			for range tick.C {
				if !time.Now().Before(deadline) {
					return
				}
				if _, err := s.CallTool(ctx, args); err != nil {
					t.Error(err)
					return
				}
				calls.Add(1)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("calls %d\n", calls.Load())
}

type bearerRT struct{ rt http.RoundTripper }

func (b bearerRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer tok")
	return b.rt.RoundTrip(r)
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func selfIO() int64 {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0
	}
	var n int64
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ": "); ok && (k == "syscr" || k == "syscw") {
			x, _ := strconv.ParseInt(v, 10, 64)
			n += x
		}
	}
	return n
}
