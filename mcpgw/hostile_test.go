package mcpgw

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/chalkcompute/chalkcompute/store"
)

// These are the attacks of issue #21, each against an official-SDK upstream
// that records what it ran (mcptest.Upstream.Ran). Server "ro" allows only
// read_file.

func newHostile(t *testing.T) *fixture {
	t.Helper()
	f := newFixtureWith(t, "Authorization", &mcp.StreamableHTTPOptions{Stateless: true})
	f.servers["ro"] = &Upstream{Name: "ro", URL: f.servers["tools"].URL, Credential: secret, Tools: []string{"read_file"}}
	return f
}

func (f *fixture) postTo(t *testing.T, server, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, f.url(server), strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("Mcp-Protocol-Version", "2025-06-18")
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/"+server)}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitAudit returns once cond holds of the audit records (a handler
// records after its answer is written, so the client can be ahead).
func (f *fixture) waitAudit(t *testing.T, cond func([]store.MCPAudit) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		f.mu.Lock()
		ok := cond(f.audit)
		f.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			f.mu.Lock()
			defer f.mu.Unlock()
			t.Fatalf("the audit never got there (%d records; the last %+v)", len(f.audit), f.audit[max(0, len(f.audit)-3):])
		}
		runtime.Gosched()
	}
}

func (f *fixture) ranTool(name string) bool {
	return slices.Contains(f.up.Ran(), "tools/call "+name)
}

func TestSmuggledToolCalls(t *testing.T) {
	f := newHostile(t)
	for _, tc := range []struct{ name, body string }{
		{"Params twin", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"},"Params":{"name":"read_file"}}`},
		{"Params twin first", `{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"read_file"},"params":{"name":"delete_repo"}}`},
		{"long s twin", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"},"paramſ":{"name":"read_file"}}`},
		{"Name twin", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","Name":"delete_repo"}}`},
		{"NAME twin", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"delete_repo","name":"read_file"}}`},
		{"Method twin", `{"jsonrpc":"2.0","id":1,"method":"tools/call","Method":"ping","params":{"name":"delete_repo"}}`},
		{"Method twin first", `{"jsonrpc":"2.0","id":1,"Method":"ping","method":"tools/call","params":{"name":"delete_repo"}}`},
		{"duplicate name", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","name":"delete_repo"}}`},
		{"escaped duplicate", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","n\u0061me":"delete_repo"}}`},
		{"duplicate method", `{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"delete_repo"}}`},
		{"unknown member", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"},"extra":{"name":"delete_repo"}}`},
		{"Kelvin sign", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"},"\u212aey":1}`},
		{"method case", `{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"delete_repo"}}`},
		{"in a batch", `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"},"Params":{"name":"read_file"}}]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body := f.postTo(t, "ro", tc.body)
			if status != http.StatusBadRequest && !strings.Contains(body, "not allowed") {
				t.Errorf("%d %s: want a refusal", status, body)
			}
		})
	}
	if f.ranTool("delete_repo") {
		t.Fatalf("delete_repo ran upstream: %v", f.up.Ran())
	}
	f.waitAudit(t, func(recs []store.MCPAudit) bool { return len(recs) >= 14 })
	f.mu.Lock()
	for _, a := range f.audit {
		if a.Tool == "read_file" && a.Decision == "allowed" {
			t.Errorf("audit claims read_file was allowed: %+v", a)
		}
	}
	f.mu.Unlock()
	// The allowed call still works, and is what runs.
	if status, body := f.postTo(t, "ro", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}}`); status != 200 || !strings.Contains(body, "read_file ran") {
		t.Fatalf("read_file: %d %s", status, body)
	}
	if !f.ranTool("read_file") {
		t.Fatalf("read_file did not run: %v", f.up.Ran())
	}
}

// TestListFilteringByID: answers are matched by the gateway's own ids, so
// no spelling of the sandbox's id skips the filter, and the sandbox gets
// its id back.
func TestListFilteringByID(t *testing.T) {
	f := newHostile(t)
	for _, tc := range []struct{ id, want string }{{`7`, `"id":7`}, {`7.0`, `"id":7.0`}, {`"\u0037"`, `"id":"7"`}, {`7e0`, `"id":7e0`}, {`"x"`, `"id":"x"`}} {
		t.Run(tc.id, func(t *testing.T) {
			status, body := f.postTo(t, "ro", `{"jsonrpc":"2.0","id":`+tc.id+`,"method":"tools/list"}`)
			if status != 200 || !strings.Contains(body, `"read_file"`) || !strings.Contains(body, tc.want) {
				t.Fatalf("%d %s", status, body)
			}
			for _, hidden := range []string{"delete_repo", "secret_tool", "whoami"} {
				if strings.Contains(body, hidden) {
					t.Fatalf("tools/list with id %s lists %s: %s", tc.id, hidden, body)
				}
			}
		})
	}
	status, body := f.postTo(t, "ro", `{"jsonrpc":"2.0","id":7,"method":"tools/list","Method":"ping"}`)
	if status != http.StatusBadRequest || strings.Contains(body, "delete_repo") {
		t.Fatalf("Method twin: %d %s", status, body)
	}
}

// TestRedirectsStayAtTheOrigin: a redirect to a node-local service is not
// followed (neither the body nor a custom-header credential goes there),
// and the dialer refuses loopback and the node's own addresses.
func TestRedirectsStayAtTheOrigin(t *testing.T) {
	var hit atomic.Int64
	var gotKey atomic.Value
	local := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hit.Add(1)
		gotKey.Store(r.Header.Get("X-Api-Key"))
		fmt.Fprint(w, `{"jsonrpc":"2.0","id":1,"result":{"node-local":"answer"}}`)
	}))
	defer local.Close()
	redir := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, local.URL+"/admin", http.StatusTemporaryRedirect)
	}))
	defer redir.Close()
	for _, allowLocal := range []bool{false, true} {
		t.Run(fmt.Sprintf("dial allowed %v", allowLocal), func(t *testing.T) {
			f := newHostile(t)
			f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, redir.URL))
			if allowLocal { // only the origin rule stands in the way
				f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, local.URL))
			}
			f.servers["evil"] = &Upstream{Name: "evil", URL: redir.URL, HeaderName: "X-Api-Key", Credential: secret}
			status, body := f.postTo(t, "evil", `{"jsonrpc":"2.0","id":1,"method":"ping"}`)
			if status != http.StatusBadGateway || strings.Contains(body, "node-local") || strings.Contains(body, secret) {
				t.Fatalf("%d %s", status, body)
			}
			if n := hit.Load(); n != 0 {
				t.Fatalf("the node-local service was reached %d times (X-Api-Key %v)", n, gotKey.Load())
			}
		})
	}
	f := newHostile(t)
	for _, a := range []string{"127.0.0.1:80", "[::1]:443", "169.254.169.254:80", "[::ffff:127.0.0.1]:80"} {
		if err := f.gw.checkDial(netip.MustParseAddrPort(a)); err == nil {
			t.Errorf("dialling %s allowed", a)
		}
	}
	addrs, _ := net.InterfaceAddrs()
	for _, na := range addrs {
		if p, err := netip.ParsePrefix(na.String()); err == nil {
			if err := f.gw.checkDial(netip.AddrPortFrom(p.Addr(), 443)); err == nil {
				t.Errorf("dialling the node's own %s allowed", p.Addr())
			}
		}
	}
}

func addrPort(t *testing.T, u string) netip.AddrPort {
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	return netip.MustParseAddrPort(pu.Host)
}

// TestCredentialEchoes: an upstream that answers its credential encoded is
// refused (and audited), not only redacted.
func TestCredentialEchoes(t *testing.T) {
	f := newFixture(t, "Authorization")
	f.servers["leaky"] = &Upstream{Name: "leaky", URL: f.servers["tools"].URL, Credential: secret, Tools: []string{"leak"}}
	var progress []string
	var pmu sync.Mutex
	s := f.connect(t, "sb-a", "leaky", &mcp.ClientOptions{ProgressNotificationHandler: func(_ context.Context, r *mcp.ProgressNotificationClientRequest) {
		pmu.Lock()
		progress = append(progress, r.Params.Message)
		pmu.Unlock()
	}})
	for _, how := range []string{"plain", "base64", "url", "percent-all", "hex", "split"} {
		t.Run(how, func(t *testing.T) {
			p := &mcp.CallToolParams{Name: "leak", Arguments: map[string]any{"how": how}}
			p.SetProgressToken("p-" + how)
			res, err := s.CallTool(context.Background(), p)
			if err == nil || !strings.Contains(err.Error(), "held the server's credential") {
				t.Fatalf("leak %s: %v %+v", how, err, res)
			}
		})
	}
	pmu.Lock()
	if len(progress) != 0 {
		t.Errorf("progress with half the credential reached the sandbox: %q", progress)
	}
	pmu.Unlock()
	f.waitAudit(t, func(recs []store.MCPAudit) bool {
		n := 0
		for _, a := range recs {
			if strings.Contains(a.Decision, "held its credential") {
				n++
			}
		}
		return n >= 7 // six answers and the progress notification
	})

	// A hand-written upstream: the credential \u-escaped in a JSON string,
	// and in a Content-Type parameter.
	esc := ""
	for _, r := range secret {
		esc += fmt.Sprintf(`\u%04x`, r)
	}
	raw := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		id := strings.Split(strings.Split(string(b), `"id":`)[1], ",")[0]
		w.Header().Set("Content-Type", `application/json; charset="`+secret+`"; b64=`+base64.StdEncoding.EncodeToString([]byte(secret)))
		fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"%s"}]}}`, id, esc)
	}))
	defer raw.Close()
	f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, raw.URL))
	f.servers["raw"] = &Upstream{Name: "raw", URL: raw.URL, Credential: secret}
	req, _ := http.NewRequest(http.MethodPost, f.url("raw"), strings.NewReader(`{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x"}}`))
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", "http://169.254.169.254/mcp/raw")}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	ct := resp.Header.Get("Content-Type")
	if ct != "application/json" || !strings.Contains(string(b), "held the server's credential") || strings.Contains(string(b), `\u0073`) {
		t.Fatalf("\\u-escaped credential: %s %q", ct, b)
	}
}

// TestBatchAuditAndRate: every item of a refused batch is audited as
// refused; the rate counts messages.
func TestBatchAuditAndRate(t *testing.T) {
	f := newHostile(t)
	batch := `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo"}}]`
	if status, body := f.postTo(t, "ro", batch); status != 200 || !strings.Contains(body, "batch refused") {
		t.Fatalf("batch: %d %s", status, body)
	}
	f.waitAudit(t, func(recs []store.MCPAudit) bool { return len(recs) >= 2 })
	f.mu.Lock()
	for _, a := range f.audit {
		if a.Method == "tools/call" && a.Decision == "allowed" {
			t.Errorf("refused batch item audited as allowed: %+v", a)
		}
	}
	f.mu.Unlock()
	if f.ranTool("read_file") || f.ranTool("delete_repo") {
		t.Fatalf("a refused batch ran: %v", f.up.Ran())
	}
	f.servers["ro"].Rate = 1 // burst 2
	three := `[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"},{"jsonrpc":"2.0","id":3,"method":"ping"}]`
	if status, body := f.postTo(t, "ro", three); status != http.StatusTooManyRequests {
		t.Fatalf("3 messages at rate 1/s burst 2: %d %s", status, body)
	}
}

// TestAuditFlood: concurrent large batches from one sandbox lose no record
// silently: what is over its audit budget is counted in "suppressed"
// records.
func TestAuditFlood(t *testing.T) {
	f := newHostile(t)
	f.gw.cfg.AuditBurst = 500
	f.gw.cfg.MaxConcurrent = 64 // every batch is read (and refused by the rate)
	f.gw.cfg.AuditRate = 1e-9
	item := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}}`
	batch := "[" + strings.TrimSuffix(strings.Repeat(item+",", maxBatch), ",") + "]"
	const n = 40
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.postTo(t, "ro", batch)
		}()
	}
	wg.Wait()
	count := func(recs []store.MCPAudit) (stored, suppressed int) {
		for _, a := range recs {
			if a.Method == "(audit)" {
				var k int
				fmt.Sscanf(a.Decision, "suppressed: %d", &k)
				suppressed += k
			} else {
				stored++
			}
		}
		return
	}
	// Every handler has audited once the gateway counted them all.
	f.waitAudit(t, func(recs []store.MCPAudit) bool {
		stored, _ := count(recs)
		return int64(stored)+f.gw.Suppressed() >= n*maxBatch
	})
	f.gw.FlushSuppressed()
	f.mu.Lock()
	defer f.mu.Unlock()
	stored, suppressed := count(f.audit)
	if stored != 500 || stored+suppressed != n*maxBatch || f.gw.Suppressed() != int64(suppressed) {
		t.Fatalf("%d records stored, %d reported suppressed (counter %d), want %d in all", stored, suppressed, f.gw.Suppressed(), n*maxBatch)
	}
}

// TestSlowBodies: a body trickling in is cut off, and a sandbox's requests
// in flight are capped.
func TestSlowBodies(t *testing.T) {
	f := newHostile(t)
	f.gw.cfg.MaxConcurrent = 4
	f.gw.cfg.ReadGrace = 200e6 // 0.2 s
	f.gw.cfg.MinReadRate = 1024
	open := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", strings.TrimPrefix(f.srv.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "POST /mcp/ro HTTP/1.1\r\nHost: x\r\nX-Test-Sandbox: sb-a\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{", tok("sb-a", "http://169.254.169.254/mcp/ro"))
		return c, bufio.NewReader(c)
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var readers []*bufio.Reader
	for range 4 {
		c, r := open()
		conns = append(conns, c)
		readers = append(readers, r)
	}
	for _, r := range readers {
		resp, err := http.ReadResponse(r, nil)
		if err != nil {
			continue // the connection was closed: as good
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("a trickling body: %d", resp.StatusCode)
		}
	}
	// The cap: hold MaxConcurrent bodies open (no deadline to speak of),
	// and one more request is refused.
	f.gw.cfg.ReadGrace = 1 << 40
	for range 4 {
		c, _ := open()
		conns = append(conns, c)
	}
	for {
		f.gw.mu.Lock()
		n := f.gw.inflight["sb-a"]
		f.gw.mu.Unlock()
		if n == 4 {
			break
		}
		runtime.Gosched()
	}
	if status, _ := f.postTo(t, "ro", `{"jsonrpc":"2.0","id":1,"method":"ping"}`); status != http.StatusTooManyRequests {
		t.Fatalf("request over the cap: %d", status)
	}
}

// TestCompletionRefs: completions name a prompt or resource, and the same
// allowlists apply.
func TestCompletionRefs(t *testing.T) {
	f := newHostile(t)
	for _, tc := range []struct{ ref, want string }{
		{`{"type":"ref/prompt","name":"internal"}`, `prompt \"internal\" is not allowed`},
		{`{"type":"ref/resource","uri":"file:///secret.txt"}`, `resource \"file:///secret.txt\" is not allowed`},
		{`{"type":"ref/prompt","name":"greet","Name":"internal"}`, `member \"Name\" is not \"name\"`},
		{`{"type":"ref/tool","name":"greet"}`, `ref.type`},
	} {
		status, body := f.postTo(t, "tools", `{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":`+tc.ref+`,"argument":{"name":"a","value":""}}}`)
		if !strings.Contains(body, tc.want) {
			t.Errorf("ref %s: %d %s, want %q", tc.ref, status, body, tc.want)
		}
	}
	if slices.Contains(f.up.Ran(), "completion/complete") {
		t.Fatalf("a refused completion ran: %v", f.up.Ran())
	}
}

// TestRefusalNotesAreBounded: a stream of refused upstream messages keeps
// at most maxNotes records in memory, and the audit counts the rest.
func TestRefusalNotesAreBounded(t *testing.T) {
	f := newHostile(t)
	c := &call{caller: Caller{SandboxID: "sb-a", OrgID: "org1"}}
	for range maxNotes + 36 {
		c.note("(response)", "", "refused: test")
	}
	if len(c.notes) != maxNotes {
		t.Fatalf("%d notes kept", len(c.notes))
	}
	f.gw.audit(c, httptest.NewRequest(http.MethodGet, "/mcp/ro", nil), "ro", 200, "allowed")
	f.mu.Lock()
	defer f.mu.Unlock()
	last := f.audit[len(f.audit)-1]
	if len(f.audit) != maxNotes+2 || !strings.Contains(last.Decision, "36 more") {
		t.Fatalf("%d records, last %+v", len(f.audit), last)
	}
}

// TestOversizedBatches: the 40 concurrent 1,000-item batches are
// refused before any item runs, each with one record saying why.
func TestOversizedBatches(t *testing.T) {
	f := newHostile(t)
	f.gw.cfg.MaxConcurrent = 64
	item := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}}`
	batch := "[" + strings.TrimSuffix(strings.Repeat(item+",", 1000), ",") + "]"
	var wg sync.WaitGroup
	for range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if status, body := f.postTo(t, "ro", batch); status != http.StatusBadRequest {
				t.Errorf("1,000-item batch: %d %.200s", status, body)
			}
		}()
	}
	wg.Wait()
	f.waitAudit(t, func(recs []store.MCPAudit) bool { return len(recs) >= 40 })
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.audit {
		if !strings.Contains(a.Decision, "batch of 1000 messages: at most 256") {
			t.Fatalf("record %+v", a)
		}
	}
	if len(f.audit) != 40 || f.ranTool("read_file") {
		t.Fatalf("%d records; ran %v", len(f.audit), f.up.Ran())
	}
}

// TestCancellationReachesTheUpstream: a notifications/cancelled names the
// request by the sandbox's id; the gateway gives the upstream its own. (The
// call's stream stays open: only the notification can cancel it.)
func TestCancellationReachesTheUpstream(t *testing.T) {
	f := newFixture(t, "Authorization")
	aud := "http://169.254.169.254/mcp/tools"
	status, hdr, body := f.post(t, "sb-a", tok("sb-a", aud), initBody, nil)
	sid := hdr.Get("Mcp-Session-Id")
	if status != 200 || sid == "" {
		t.Fatalf("initialize: %d %s", status, body)
	}
	h := http.Header{"Mcp-Session-Id": {sid}, "Mcp-Protocol-Version": {"2025-06-18"}}
	if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), `{"jsonrpc":"2.0","method":"notifications/initialized"}`, h); status != 202 {
		t.Fatalf("initialized: %d %s", status, body)
	}
	req, _ := http.NewRequest(http.MethodPost, f.url("tools"), strings.NewReader(`{"jsonrpc":"2.0","id":"req-1","method":"tools/call","params":{"name":"slow","_meta":{"progressToken":"c1"}}}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Transport: as{sandbox: "sb-a", token: tok("sb-a", aud)}}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for { // until the progress event: the tool runs
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("the slow call's stream ended: %v", err)
		}
		if strings.Contains(line, "halfway") {
			break
		}
	}
	if status, _, body := f.post(t, "sb-a", tok("sb-a", aud), `{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"req-1"}}`, h); status != 202 {
		t.Fatalf("cancelled: %d %s", status, body)
	}
	deadline := time.Now().Add(10 * time.Second)
	for f.up.Cancelled.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the upstream never saw the cancellation")
		}
		runtime.Gosched()
	}
}

// TestErrorsWithholdTheCredential: an upstream error carrying the
// credential (here a same-origin redirect loop whose URL holds it
// base64-encoded) reaches neither the sandbox nor the audit.
func TestErrorsWithholdTheCredential(t *testing.T) {
	enc := base64.URLEncoding.EncodeToString([]byte(secret))
	loop := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/next?k="+enc, http.StatusTemporaryRedirect)
	}))
	defer loop.Close()
	f := newHostile(t)
	f.gw.cfg.AllowAddrs = append(f.gw.cfg.AllowAddrs, addrPort(t, loop.URL))
	f.servers["loop"] = &Upstream{Name: "loop", URL: loop.URL, Credential: secret}
	status, body := f.postTo(t, "loop", `{"jsonrpc":"2.0","id":1,"method":"ping"}`)
	if status != http.StatusBadGateway || strings.Contains(body, enc[:20]) || !strings.Contains(body, "withheld") {
		t.Fatalf("%d %s", status, body)
	}
	f.waitAudit(t, func(recs []store.MCPAudit) bool { return len(recs) > 0 })
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.audit {
		if strings.Contains(a.Decision, enc[:20]) {
			t.Fatalf("the audit holds the encoded credential: %+v", a)
		}
	}
}

// TestAuditNamesBounded: a tool name is the sandbox's, as long as a request
// body: its audit record (the name, and the denial quoting it) is cut to
// MaxAuditTool and MaxAuditDecision bytes, since the audit rate counts
// records, not bytes (a 1 MiB name was stored whole, twice).
func TestAuditNamesBounded(t *testing.T) {
	f := newHostile(t)
	name := "\x1b]0;owned\x07" + strings.Repeat("é", 400<<10)
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"` + strings.ReplaceAll(name, "\x1b", `\u001b`) + `"}}`
	body = strings.ReplaceAll(body, "\x07", `\u0007`)
	if status, resp := f.postTo(t, "ro", body); status != 200 || !strings.Contains(resp, "is not allowed") {
		t.Fatalf("a long tool name: %d %.200s", status, resp)
	}
	f.waitAudit(t, func(recs []store.MCPAudit) bool { return len(recs) >= 1 })
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, a := range f.audit {
		if len(a.Tool) > MaxAuditTool+len("…") || len(a.Decision) > MaxAuditDecision+len("…") || !utf8.ValidString(a.Tool) ||
			!strings.HasPrefix(a.Tool, name[:64]) || !strings.HasPrefix(a.Decision, "denied: ") {
			t.Fatalf("audit record: %d bytes of tool (at most %d), %d of decision (at most %d): %.80q %.80q",
				len(a.Tool), MaxAuditTool, len(a.Decision), MaxAuditDecision, a.Tool, a.Decision)
		}
	}
}
