// Package mcpgw is the MCP gateway: sandboxes reach their org's upstream MCP
// servers at http://169.254.169.254/mcp/<server> with their workload
// identity token, and the gateway
//
//   - verifies the token (signature, expiry, audience = the gateway URL, the
//     sandbox still running) and that it belongs to the sandbox whose network
//     namespace the request came from;
//   - checks the server's policy: which sandboxes may use it (labels), and
//     which tools, prompts and resources they may use. Bodies are read by
//     one strict decoder (strictjson.go, jsonrpc.go: no duplicate keys, no
//     case or folding twins of spec members, no unknown top-level members)
//     item by item for batches; the standard Mcp-Method/Mcp-Name headers
//     must agree with the body; calls outside the allowlists are refused
//     with a JSON-RPC error. What is forwarded is the gateway's encoding of
//     what it checked, with request ids of its own (downstream.go); answers
//     are matched by those ids, so list results are always filtered;
//   - removes the sandbox's Authorization header, adds the upstream
//     credential, and proxies the Streamable HTTP transport: POST with JSON
//     or SSE responses (streamed event by event), GET streams, DELETE;
//     session ids are the gateway's own, bound to the sandbox and server
//     (upstream ids never reach the sandbox);
//   - refuses upstream messages that hold the credential in a common
//     encoding (leak.go), redacts it as a safety net, and never writes it
//     to logs or errors;
//   - audits every message with its decision (Config.Audit; within a
//     per-sandbox budget, the excess counted), and enforces a per-sandbox
//     rate limit per server counted in messages, a cap on requests in
//     flight, a minimum request body rate, size limits, upstream timeouts,
//     redirects only within the upstream's origin, and a dialer that
//     refuses loopback, link-local, metadata and the node's own addresses
//     (on the address actually dialled, for every hop).
package mcpgw

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
	"github.com/chalkcompute/chalkcompute/store"
)

// Upstream is a registered server as the gateway uses it: the credential
// in the clear (in memory only).
type Upstream struct {
	Name, URL  string
	HeaderName string // "" = Authorization: Bearer
	Credential string
	// Allowlists: nil allows everything.
	Tools, Resources, Prompts []string
	Labels                    map[string]string // required sandbox labels
	Rate                      float64           // calls per second per sandbox; 0 = DefaultRate

	detOnce sync.Once
	det     *leakDetector // the credential's, made once: an Upstream is reused across requests
	redOnce sync.Once
	red     [][]byte // what redact replaces, made once
}

// detector returns the leak detector of the credential, made at first use
// (its encodings and windows are the same for every request; it goes with
// the Upstream, which the caller drops when the server changes).
func (u *Upstream) detector() *leakDetector {
	u.detOnce.Do(func() { u.det = newLeakDetector(u.Credential) })
	return u.det
}

// Caller is the sandbox a request came from, known by its network namespace.
type Caller struct {
	SandboxID, OrgID string
	Labels           map[string]string
}

// Claims are what the gateway needs of a verified workload token.
type Claims struct {
	Subject, SandboxID string
	Expiry             time.Time
}

// Limits and defaults.
const (
	DefaultRate          = 50.0
	DefaultMaxRequest    = 1 << 20
	DefaultMaxResponse   = 16 << 20
	DefaultTimeout       = 60 * time.Second
	DefaultStreamIdle    = 5 * time.Minute
	DefaultMaxConcurrent = 16
	DefaultReadGrace     = 10 * time.Second
	DefaultMinReadRate   = 16 << 10
	DefaultAuditRate     = 200.0
	DefaultAuditBurst    = 2000
	maxSessionsPerCallr  = 64
	sessionIdle          = time.Hour
)

// Config configures a Gateway. Upstream, Verify and Caller are required.
type Config struct {
	// Upstream returns the org's server with its credential (errdefs.ErrNotFound if none).
	Upstream func(ctx context.Context, orgID, name string) (*Upstream, error)
	// Verify checks a workload token for exactly audience.
	Verify func(ctx context.Context, token, audience string) (Claims, error)
	// Caller identifies the sandbox the request came from.
	Caller func(r *http.Request) (Caller, bool)
	// BaseURL is the gateway's URL inside sandboxes (default
	// http://169.254.169.254/mcp); a server's URL and token audience is
	// BaseURL/<name> (BaseURL itself is accepted too).
	BaseURL string
	// Audit receives one record per message (nil: none).
	Audit func(store.MCPAudit)
	// Transport reaches upstreams (default: Dialer-guarded http.Transport).
	Transport http.RoundTripper
	// Deny are destinations never dialled (loopback, link-local, the
	// metadata address and the node's own addresses always are).
	Deny []netip.Prefix
	// AllowAddrs are exact destinations dialled despite the rules above
	// (tests: httptest upstreams listen on loopback).
	AllowAddrs []netip.AddrPort
	// MaxConcurrent bounds a sandbox's requests in flight (streams
	// included); default DefaultMaxConcurrent.
	MaxConcurrent int
	// ReadGrace and MinReadRate bound how slowly a request body may arrive:
	// it must be complete by ReadGrace + size/MinReadRate (defaults
	// DefaultReadGrace, DefaultMinReadRate).
	ReadGrace   time.Duration
	MinReadRate int64
	// AuditRate and AuditBurst bound the records one sandbox adds per second
	// (defaults DefaultAuditRate, DefaultAuditBurst); the ones over it are
	// counted and recorded as one "suppressed" record per sandbox and server.
	AuditRate  float64
	AuditBurst int
	// MaxRequest and MaxResponse bound bodies (a response: each SSE event).
	MaxRequest, MaxResponse int64
	// Timeout bounds an upstream answer (headers, and whole JSON bodies);
	// StreamIdle bounds the wait between two events of a stream.
	Timeout, StreamIdle time.Duration
	Logger              *slog.Logger
	Now                 func() time.Time
}

// Gateway is the http.Handler behind /mcp/ on the metadata address.
type Gateway struct {
	cfg    Config
	client *http.Client
	hold   time.Duration // sseHold (tests: longer, so that write counts do not depend on timing)

	mu        sync.Mutex
	sessions  map[string]*session // gateway session id ->
	buckets   map[string]*bucket  // sandbox/server ->
	verified  map[verKey]Claims   // audience and token -> claims, until the token expires
	inflight  map[string]int      // sandbox -> requests in flight
	requests  map[string]value    // inflightKey -> the gateway's id of a request in flight
	audits    map[string]*bucket  // sandbox -> audit budget
	supp      map[suppKey]int     // records over a sandbox's audit budget, not yet reported
	suppTotal atomic.Int64
}

type suppKey struct{ org, sandbox, server string }

// verKey keys the verified-token cache (a struct: no concatenation of the
// token per request).
type verKey struct{ aud, tok string }

// maxVerified bounds the verified-token cache.
const maxVerified = 8192

type session struct {
	sandboxID, orgID, server string
	upstreamID               string
	used                     time.Time
}

// New returns a Gateway.
func New(cfg Config) (*Gateway, error) {
	if cfg.Upstream == nil || cfg.Verify == nil || cfg.Caller == nil {
		return nil, errors.New("mcpgw: Upstream, Verify and Caller are required")
	}
	if cfg.BaseURL == "" {
		cfg.BaseURL = "http://169.254.169.254/mcp"
	}
	cfg.BaseURL = strings.TrimSuffix(cfg.BaseURL, "/")
	if cfg.MaxRequest <= 0 {
		cfg.MaxRequest = DefaultMaxRequest
	}
	if cfg.MaxResponse <= 0 {
		cfg.MaxResponse = DefaultMaxResponse
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.StreamIdle <= 0 {
		cfg.StreamIdle = DefaultStreamIdle
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = DefaultMaxConcurrent
	}
	if cfg.ReadGrace <= 0 {
		cfg.ReadGrace = DefaultReadGrace
	}
	if cfg.MinReadRate <= 0 {
		cfg.MinReadRate = DefaultMinReadRate
	}
	if cfg.AuditRate <= 0 {
		cfg.AuditRate = DefaultAuditRate
	}
	if cfg.AuditBurst <= 0 {
		cfg.AuditBurst = DefaultAuditBurst
	}
	g := &Gateway{cfg: cfg, hold: sseHold, sessions: map[string]*session{}, buckets: map[string]*bucket{}, verified: map[verKey]Claims{},
		inflight: map[string]int{}, requests: map[string]value{}, audits: map[string]*bucket{}, supp: map[suppKey]int{}}
	rt := cfg.Transport
	if rt == nil {
		rt = g.transport()
	}
	g.client = &http.Client{Transport: rt, CheckRedirect: checkRedirect(cfg.Deny)}
	return g, nil
}

// checkRedirect follows a redirect only within the registered upstream's
// origin (scheme, host and port of via[0]): the request carries the
// credential, in a custom header too, which net/http would copy to any
// host. The dialer checks the address of every hop besides.
func checkRedirect(deny []netip.Prefix) func(*http.Request, []*http.Request) error {
	return func(req *http.Request, via []*http.Request) error {
		if len(via) >= 5 {
			return errors.New("too many redirects")
		}
		if o, want := origin(req.URL), origin(via[0].URL); o != want {
			return fmt.Errorf("redirect to %s, outside the registered origin %s: %w", o, want, errForbiddenAddr)
		}
		return CheckURL(req.URL.String(), deny)
	}
}

func origin(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return strings.ToLower(u.Scheme) + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// forbidden reports addresses the gateway never dials.
func forbidden(a netip.Addr, deny []netip.Prefix) bool {
	a = a.Unmap()
	if a.IsLoopback() || a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsMulticast() || a.IsUnspecified() || a.IsInterfaceLocalMulticast() {
		return true
	}
	for _, p := range deny {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// CheckURL refuses upstream URLs that are not http(s), carry credentials
// or name a forbidden address literally.
func CheckURL(raw string, deny []netip.Prefix) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("upstream URL %q: %v: %w", raw, err, errdefs.ErrInvalidArgument)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("upstream URL %q: scheme must be http or https: %w", raw, errdefs.ErrInvalidArgument)
	}
	if u.Host == "" || u.User != nil || u.Fragment != "" {
		return fmt.Errorf("upstream URL %q: want scheme://host[:port]/path, without user info or fragment: %w", raw, errdefs.ErrInvalidArgument)
	}
	if a, err := netip.ParseAddr(strings.Trim(u.Hostname(), "[]")); err == nil && forbidden(a, deny) {
		return fmt.Errorf("upstream URL %q: %s is a loopback, link-local, metadata or node-internal address: %w", raw, a, errdefs.ErrInvalidArgument)
	}
	return nil
}

// transport reaches upstreams: plain http:// through h1Transport, the rest
// (https) through net/http's Transport; both dial through the guard.
func (g *Gateway) transport() http.RoundTripper {
	d := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return err
		}
		return g.checkDial(ap)
	}}
	std := &http.Transport{
		Proxy: nil, DialContext: d.DialContext, ForceAttemptHTTP2: true,
		MaxIdleConns: 256, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second,
		TLSHandshakeTimeout: 10 * time.Second, ResponseHeaderTimeout: g.cfg.Timeout,
	}
	return newH1Transport(d.DialContext, std, g.cfg.Timeout)
}

var errForbiddenAddr = errors.New("forbidden upstream address")

// checkDial refuses the address about to be dialled if it is forbidden or
// one of the node's own (a service on the node listening on all addresses).
func (g *Gateway) checkDial(ap netip.AddrPort) error {
	if slices.Contains(g.cfg.AllowAddrs, ap) {
		return nil
	}
	a := ap.Addr().Unmap()
	if forbidden(a, g.cfg.Deny) {
		return fmt.Errorf("%s is a loopback, link-local, metadata or node-internal address: %w", a, errForbiddenAddr)
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return fmt.Errorf("the node's addresses: %v: %w", err, errForbiddenAddr)
	}
	for _, na := range addrs {
		if p, err := netip.ParsePrefix(na.String()); err == nil && p.Addr().Unmap() == a {
			return fmt.Errorf("%s is an address of the node: %w", a, errForbiddenAddr)
		}
	}
	return nil
}

// httpError is a refusal before or instead of proxying.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func fail(status int, format string, args ...any) *httpError {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...)}
}

// call is one request through the gateway.
type call struct {
	start     time.Time
	caller    Caller
	sub       string
	up        *Upstream
	bytesIn   int64
	bytesOut  int64
	msgs      []rpcMsg // the JSON-RPC messages of a POST
	batch     bool     // the POST was a batch
	pending   map[string]pending
	requests  int // requests forwarded (pending holds those not answered yet)
	det       *leakDetector
	notes     []store.MCPAudit // refusals of the upstream's messages
	moreNotes int              // refusals beyond maxNotes
}

// maxNotes bounds the refusals a call keeps for the audit (a stream can
// last long); the rest are counted in one more record.
const maxNotes = 64

// note records a refusal of something the upstream sent.
func (c *call) note(method, tool, decision string) {
	if len(c.notes) < maxNotes {
		c.notes = append(c.notes, store.MCPAudit{Method: method, Tool: tool, Decision: decision})
		return
	}
	c.moreNotes++
}

func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c := &call{start: g.cfg.Now()}
	name := strings.Trim(strings.TrimPrefix(r.URL.Path, "/mcp"), "/")
	status, decision := http.StatusOK, "allowed"
	defer func() {
		g.audit(c, r, name, status, decision)
	}()
	err := g.serve(w, r, c, name, &status)
	if err != nil {
		var he *httpError
		if !errors.As(err, &he) {
			he = fail(http.StatusBadGateway, "%v", err)
		}
		if how := c.det.find(he.msg); how != "" {
			// An upstream's error (a redirect's URL, say) carrying the
			// credential goes neither to the sandbox nor to the audit.
			he = fail(he.status, "upstream MCP server %q: the error held the server's credential (%s); withheld", name, how)
		}
		status = he.status
		decision = "denied: " + he.msg
		if he.status == http.StatusBadGateway || he.status == http.StatusGatewayTimeout {
			decision = "error: " + he.msg
		}
		g.writeError(w, c, he)
	}
}

func (g *Gateway) writeError(w http.ResponseWriter, c *call, he *httpError) {
	msg := he.msg
	if c.up != nil {
		msg = redactString(msg, c.up)
	}
	if he.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="chalk-mcp-gateway"`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(he.status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

func (g *Gateway) serve(w http.ResponseWriter, r *http.Request, c *call, name string, status *int) error {
	if name == "" || strings.Contains(name, "/") {
		return fail(http.StatusNotFound, "want %s/<server>", g.cfg.BaseURL)
	}
	caller, ok := g.cfg.Caller(r)
	if !ok {
		return fail(http.StatusForbidden, "request does not come from a running sandbox")
	}
	c.caller = caller
	if !g.enter(caller.SandboxID) {
		return fail(http.StatusTooManyRequests, "sandbox %s has %d requests in flight to the MCP gateway", caller.SandboxID, g.cfg.MaxConcurrent)
	}
	defer g.leave(caller.SandboxID)
	// The workload token, for this gateway.
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || tok == "" {
		return fail(http.StatusUnauthorized, "missing bearer token: use the sandbox's identity token for audience %s/%s (GET http://169.254.169.254/v1/identity/token?audience=...)", g.cfg.BaseURL, name)
	}
	cl, err := g.verify(r.Context(), tok, g.cfg.BaseURL+"/"+name)
	if err != nil {
		return fail(http.StatusUnauthorized, "%v", err)
	}
	c.sub = cl.Subject
	if cl.SandboxID != caller.SandboxID {
		return fail(http.StatusForbidden, "the token belongs to sandbox %s, the request comes from sandbox %s", cl.SandboxID, caller.SandboxID)
	}
	up, err := g.cfg.Upstream(r.Context(), caller.OrgID, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return fail(http.StatusNotFound, "no MCP server %q is registered", name)
	} else if err != nil {
		return fail(http.StatusInternalServerError, "MCP server %q: %v", name, err)
	}
	c.up = up
	c.det = up.detector()
	for k, v := range up.Labels {
		if caller.Labels[k] != v {
			return fail(http.StatusForbidden, "sandbox %s may not use MCP server %q (it needs label %s=%s)", caller.SandboxID, name, k, v)
		}
	}
	if !g.allow(caller.SandboxID+"/"+name, up.Rate, 1) {
		return fail(http.StatusTooManyRequests, "rate limit of MCP server %q exceeded for sandbox %s", name, caller.SandboxID)
	}
	switch r.Method {
	case http.MethodPost, http.MethodGet, http.MethodDelete:
	default:
		w.Header().Set("Allow", "GET, POST, DELETE")
		return fail(http.StatusMethodNotAllowed, "method %s: the Streamable HTTP transport uses POST, GET and DELETE", r.Method)
	}
	var body []byte
	if r.Method == http.MethodPost {
		if body, err = g.readBody(w, r); err != nil {
			return err
		}
		c.bytesIn = int64(len(body))
		if c.msgs, err = parseMessages(body); err != nil {
			return fail(http.StatusBadRequest, "%v", err)
		}
		c.batch = bytes.HasPrefix(bytes.TrimSpace(body), []byte("["))
		// The rate counts messages: the request took one token already.
		if n := len(c.msgs) - 1; n > 0 && !g.allow(caller.SandboxID+"/"+name, up.Rate, n) {
			return fail(http.StatusTooManyRequests, "rate limit of MCP server %q exceeded for sandbox %s (a batch of %d messages)", name, caller.SandboxID, len(c.msgs))
		}
		if err := checkHeaders(r.Header, c.msgs); err != nil {
			return err
		}
		if denied := g.policy(up, c.msgs); denied {
			*status = http.StatusOK
			return g.refuse(w, c)
		}
		body = c.assignIDs(g.inflightID(c, name))
		defer g.track(c, name)()
	}
	// The session: the gateway's id in, upstream's id out.
	var sess *session
	if id := r.Header.Get("Mcp-Session-Id"); id != "" {
		if sess = g.session(id, caller, name); sess == nil {
			return fail(http.StatusNotFound, "unknown MCP session (start a new one with initialize)")
		}
	} else if r.Method != http.MethodPost {
		return fail(http.StatusBadRequest, "%s needs an Mcp-Session-Id", r.Method)
	}
	resp, err := g.forward(r, up, body, sess)
	if err != nil {
		if errors.Is(err, errForbiddenAddr) {
			return fail(http.StatusBadGateway, "upstream MCP server %q: refused: it (or a redirect) leads outside its origin, or to a loopback, link-local, metadata or node-internal address", name)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return fail(http.StatusGatewayTimeout, "upstream MCP server %q did not answer in %s", name, g.cfg.Timeout)
		}
		return fail(http.StatusBadGateway, "upstream MCP server %q: %v", name, redactString(err.Error(), up))
	}
	defer resp.Body.Close()
	*status = resp.StatusCode
	if r.Method == http.MethodDelete && resp.StatusCode < 300 && sess != nil {
		g.dropSession(r.Header.Get("Mcp-Session-Id"))
	}
	gwID := ""
	if upID := resp.Header.Get("Mcp-Session-Id"); upID != "" {
		if sess != nil {
			gwID = r.Header.Get("Mcp-Session-Id")
		} else if gwID, err = g.newSession(caller, name, upID); err != nil {
			return fail(http.StatusTooManyRequests, "%v", err)
		}
	}
	return g.relay(w, resp, c, gwID)
}

// readBody reads a POST body within MaxRequest and at least MinReadRate
// (after ReadGrace): a sandbox cannot hold a handler with a trickle.
func (g *Gateway) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	rc := http.NewResponseController(w)
	start := time.Now()
	deadline := func(n int) time.Time {
		return start.Add(g.cfg.ReadGrace + time.Duration(float64(n)/float64(g.cfg.MinReadRate)*float64(time.Second)))
	}
	// Without a connection deadline (HTTP/2, a writer wrapped without
	// Unwrap) a timer closes the body, which ends a pending Read on HTTP/2.
	noDeadline := rc.SetReadDeadline(deadline(0)) != nil
	var timer *time.Timer
	var timedOut atomic.Bool
	if noDeadline {
		timer = time.AfterFunc(g.cfg.ReadGrace+time.Duration(float64(g.cfg.MaxRequest)/float64(g.cfg.MinReadRate)*float64(time.Second)), func() {
			timedOut.Store(true)
			r.Body.Close()
		})
		defer timer.Stop()
	}
	var buf bytes.Buffer
	chunkp := chunks.Get().(*[]byte)
	defer chunks.Put(chunkp)
	chunk := *chunkp
	for {
		n, err := r.Body.Read(chunk)
		buf.Write(chunk[:n])
		if int64(buf.Len()) > g.cfg.MaxRequest {
			w.Header().Set("Connection", "close")
			return nil, fail(http.StatusRequestEntityTooLarge, "request body over %d bytes", g.cfg.MaxRequest)
		}
		if err == io.EOF {
			if !noDeadline {
				_ = rc.SetReadDeadline(time.Time{})
			}
			return buf.Bytes(), nil
		}
		if err != nil {
			// The deadline stays: net/http must not wait for the rest.
			w.Header().Set("Connection", "close")
			var ne net.Error
			if timedOut.Load() || errors.As(err, &ne) && ne.Timeout() {
				return nil, fail(http.StatusRequestTimeout, "request body slower than %d bytes/s", g.cfg.MinReadRate)
			}
			return nil, fail(http.StatusBadRequest, "reading the request: %v", err)
		}
		if !noDeadline && n > 0 {
			_ = rc.SetReadDeadline(deadline(buf.Len()))
		}
	}
}

// Buffers reused across requests (a request's body is copied out of its
// chunk; an SSE reader is reset before and after use).
var (
	chunks    = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
	sseStates = sync.Pool{New: func() any { return &sseState{br: bufio.NewReaderSize(nil, 64<<10)} }}
)

// sseState is relaySSE's reader and event buffers, reused across streams
// (reset before use; the reader is reset to nil after).
type sseState struct {
	br            *bufio.Reader
	ev, data, out bytes.Buffer
}

// maxPooledEvent bounds the event buffers sseStates keeps.
const maxPooledEvent = 256 << 10

// enter counts a request of the sandbox in flight, within MaxConcurrent.
func (g *Gateway) enter(sandboxID string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inflight[sandboxID] >= g.cfg.MaxConcurrent {
		return false
	}
	g.inflight[sandboxID]++
	return true
}

func (g *Gateway) leave(sandboxID string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inflight[sandboxID]--; g.inflight[sandboxID] <= 0 {
		delete(g.inflight, sandboxID)
	}
}

// verify checks the token for the server's URL (or the gateway's). A
// verified token is remembered until it expires: the request must still
// come from its sandbox, which the caller check establishes per request,
// and Forget drops a sandbox's tokens when it ends.
func (g *Gateway) verify(ctx context.Context, tok, aud string) (Claims, error) {
	key := verKey{aud, tok}
	now := g.cfg.Now()
	g.mu.Lock()
	cl, ok := g.verified[key]
	g.mu.Unlock()
	if ok && now.Before(cl.Expiry) {
		return cl, nil
	}
	cl, err := g.cfg.Verify(ctx, tok, aud)
	if err != nil {
		cl2, err2 := g.cfg.Verify(ctx, tok, g.cfg.BaseURL)
		if err2 != nil {
			return Claims{}, err
		}
		cl = cl2
	}
	if !cl.Expiry.IsZero() {
		g.mu.Lock()
		if len(g.verified) >= maxVerified {
			for k, c := range g.verified {
				if !now.Before(c.Expiry) || len(g.verified) >= maxVerified {
					delete(g.verified, k)
				}
			}
		}
		g.verified[key] = cl
		g.mu.Unlock()
	}
	return cl, nil
}

// forward sends the request upstream with the credential.
func (g *Gateway) forward(r *http.Request, up *Upstream, body []byte, sess *session) (*http.Response, error) {
	ctx := r.Context()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, r.Method, up.URL, rd)
	if err != nil {
		return nil, err
	}
	for _, h := range []string{"Accept", "Content-Type", "Mcp-Protocol-Version", "Last-Event-Id", "Mcp-Method", "Mcp-Name"} {
		if v := r.Header.Values(h); len(v) > 0 {
			req.Header[http.CanonicalHeaderKey(h)] = slices.Clone(v)
		}
	}
	for k, v := range r.Header {
		if strings.HasPrefix(k, "Mcp-Param-") {
			req.Header[k] = slices.Clone(v)
		}
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json") // what the gateway encoded
	}
	if sess != nil {
		req.Header.Set("Mcp-Session-Id", sess.upstreamID)
	}
	if up.Credential != "" {
		if up.HeaderName == "" || strings.EqualFold(up.HeaderName, "Authorization") {
			req.Header.Set("Authorization", "Bearer "+up.Credential)
		} else {
			req.Header.Set(up.HeaderName, up.Credential)
		}
	}
	return g.client.Do(req)
}

// relay copies the upstream response to the sandbox: the headers it needs
// (checked), JSON bodies and each SSE event's data through downstream
// (SSE flushed event by event), anything else only if it does not hold the
// credential.
func (g *Gateway) relay(w http.ResponseWriter, resp *http.Response, c *call, gwID string) error {
	h := w.Header()
	ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if ct != "" && c.det.find(ct) == "" {
		h.Set("Content-Type", ct) // without parameters: nothing rides along
	}
	if v := resp.Header.Get("Mcp-Protocol-Version"); protocolVersion.MatchString(v) {
		h.Set("Mcp-Protocol-Version", v)
	}
	if gwID != "" {
		h.Set("Mcp-Session-Id", gwID)
	}
	if ct == "text/event-stream" {
		h.Set("Cache-Control", "no-cache")
		w.WriteHeader(resp.StatusCode)
		if len(c.pending) == 0 {
			// A GET stream (or a POST's without requests): the client
			// waits for the headers, and events may not come for long.
			// A POST's answer stream sends them with its first event,
			// as the upstream does.
			_ = http.NewResponseController(w).Flush()
		}
		return g.relaySSE(w, resp.Body, c)
	}
	b, err := readLimited(resp.Body, g.cfg.MaxResponse, g.cfg.Timeout)
	if err != nil {
		return fail(http.StatusBadGateway, "upstream MCP server %q: response: %v", c.up.Name, err)
	}
	switch {
	case len(bytes.TrimSpace(b)) == 0:
	case ct == "application/json":
		if b = g.downstream(c, b); b == nil {
			return fail(http.StatusBadGateway, "upstream MCP server %q: its answer was refused (the audit says why)", c.up.Name)
		}
	default:
		if how := c.det.find(string(b)); how != "" {
			c.note("(response)", "", "refused: the upstream's answer held its credential ("+how+")")
			return fail(http.StatusBadGateway, "upstream MCP server %q: its answer was refused (the audit says why)", c.up.Name)
		}
		b = redact(b, c.up)
	}
	w.WriteHeader(resp.StatusCode)
	n, _ := w.Write(b)
	c.bytesOut += int64(n)
	return nil
}

var protocolVersion = regexp.MustCompile(`^[0-9]{4}-[0-9]{2}-[0-9]{2}$`)

// readLimited reads a whole answer body within max bytes and timeout, in
// the caller's goroutine: a timer closes the body if it is not complete by
// then, which ends the Read in progress (h1Body closes its connection;
// net/http's bodies end their reads too). Before, a goroutine read it while
// the handler waited on a channel: two goroutine hand-offs per JSON answer.
func readLimited(r io.ReadCloser, max int64, timeout time.Duration) ([]byte, error) {
	var timedOut atomic.Bool
	t := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		r.Close()
	})
	b, err := io.ReadAll(io.LimitReader(r, max+1))
	if !t.Stop() || timedOut.Load() {
		return nil, fmt.Errorf("no complete answer in %s", timeout)
	}
	if err == nil && int64(len(b)) > max {
		return nil, fmt.Errorf("over %d bytes", max)
	}
	return b, err
}

// relaySSE streams events: each event's data (a JSON-RPC message) is
// filtered and redacted, and the event flushed before the next is read.
// Once every request of the POST is answered, an event is held for at most
// sseHold instead: the upstream normally ends the stream right after its
// answer, and the end goes to the sandbox in the same write (one write per
// call instead of three); an upstream that keeps the stream open has its
// events flushed by the timer.
func (g *Gateway) relaySSE(w http.ResponseWriter, body io.ReadCloser, c *call) error {
	fl, _ := w.(http.Flusher)
	st := sseStates.Get().(*sseState)
	br := st.br
	br.Reset(body)
	ev, data, out := &st.ev, &st.data, &st.out // the event's non-data lines; its data, lines joined; the event as relayed
	ev.Reset()
	data.Reset()
	out.Reset()
	defer func() {
		br.Reset(nil)
		// The buffers are kept unless a large event grew them.
		if ev.Cap()+data.Cap()+out.Cap() <= maxPooledEvent {
			sseStates.Put(st)
		}
	}()
	hasData := false
	idle := time.AfterFunc(g.cfg.StreamIdle, func() { body.Close() })
	defer idle.Stop()
	// mu orders the hold timer's Flush with this goroutine's writes; ended
	// says the handler returned (w must not be used then).
	var mu sync.Mutex
	ended, holding := false, false // holding: the hold timer is armed
	var hold *time.Timer
	defer func() {
		mu.Lock()
		ended = true
		mu.Unlock()
		if hold != nil {
			hold.Stop()
		}
	}()
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A long line: collect it whole, within the limit.
			full := append([]byte(nil), line...)
			for errors.Is(err, bufio.ErrBufferFull) && int64(len(full)) <= g.cfg.MaxResponse {
				line, err = br.ReadSlice('\n')
				full = append(full, line...)
			}
			if int64(len(full)) > g.cfg.MaxResponse {
				return nil // the sandbox sees the stream end
			}
			line = full
		}
		if len(line) == 0 && err != nil {
			return nil
		}
		idle.Reset(g.cfg.StreamIdle)
		trimmed := bytes.TrimRight(line, "\r\n")
		switch {
		case len(trimmed) == 0:
			if hasData || ev.Len() > 0 {
				out.Reset()
				out.Write(ev.Bytes())
				if hasData {
					d := bytes.TrimSpace(data.Bytes())
					if len(d) > 0 {
						d = g.downstream(c, d)
					}
					if d == nil {
						out.Reset() // refused: the whole event goes
					} else {
						out.WriteString("data: ")
						out.Write(d) // one line: the encoding escapes newlines
						out.WriteString("\n\n")
					}
				} else {
					out.WriteByte('\n')
				}
				if out.Len() > 0 {
					mu.Lock()
					n, werr := w.Write(out.Bytes())
					c.bytesOut += int64(n)
					if werr == nil && fl != nil {
						if c.requests > 0 && len(c.pending) == 0 {
							// Held: the timer, once armed, is not pushed
							// back by later events (no event waits longer).
							// Not armed when the upstream's stream has
							// ended already (its end came with the
							// event): the next read returns at once.
							switch {
							case holding:
							case br.Buffered() == 0 && bodyEnded(body):
							case hold == nil:
								hold = time.AfterFunc(g.hold, func() {
									mu.Lock()
									defer mu.Unlock()
									holding = false
									if !ended {
										fl.Flush()
									}
								})
							default:
								hold.Reset(g.hold)
							}
							holding = true
						} else {
							fl.Flush()
						}
					}
					mu.Unlock()
					if werr != nil {
						return nil
					}
				}
			}
			ev.Reset()
			data.Reset()
			hasData = false
		case bytes.HasPrefix(trimmed, []byte("data:")):
			d := bytes.TrimPrefix(trimmed[5:], []byte(" "))
			if hasData {
				data.WriteByte('\n')
			}
			data.Write(d)
			hasData = true
			if int64(data.Len()) > g.cfg.MaxResponse {
				return nil
			}
		default:
			// Only the fields a client uses, and none holding the credential.
			field, _, _ := bytes.Cut(trimmed, []byte(":"))
			switch string(field) {
			case "id", "event", "retry":
				if how := c.det.find(string(trimmed)); how != "" {
					c.note("(response)", "", "refused: an SSE field held the credential ("+how+")")
					break
				}
				ev.Write(redact(trimmed, c.up))
				ev.WriteByte('\n')
			}
		}
		if err != nil {
			return nil
		}
	}
}

// bodyEnded reports whether body (h1Transport's) has ended: the next read
// returns io.EOF without waiting for the upstream.
func bodyEnded(body io.Reader) bool {
	e, ok := body.(interface{ ended() bool })
	return ok && e.ended()
}

// sseHold bounds how long an event after the POST's last answer waits for
// the end of the stream before it is flushed on its own.
const sseHold = 2 * time.Millisecond

// audit records the call: one record per JSON-RPC message with its own
// decision (or one for the HTTP request when it carried none: GET, DELETE,
// refusals before parsing), and one per message of the upstream's that the
// gateway refused. Records over the sandbox's audit budget are counted and
// reported in a "suppressed" record (see emit).
func (g *Gateway) audit(c *call, r *http.Request, name string, status int, decision string) {
	if g.cfg.Audit == nil || c.caller.SandboxID == "" {
		return // not from a sandbox: nothing to attribute it to
	}
	now := g.cfg.Now()
	base := store.MCPAudit{
		At: now.UTC(), OrgID: c.caller.OrgID, SandboxID: c.caller.SandboxID, Subject: c.sub, Server: name,
		HTTPMethod: r.Method, Decision: decision, Status: status,
		LatencyMS: float64(now.Sub(c.start).Microseconds()) / 1000, BytesIn: c.bytesIn, BytesOut: c.bytesOut,
	}
	recs := make([]store.MCPAudit, 0, len(c.msgs)+len(c.notes)+1)
	if len(c.msgs) == 0 {
		recs = append(recs, base)
	}
	for _, m := range c.msgs {
		rec := base
		rec.Method, rec.Tool = m.method, m.name
		if m.method == "" {
			rec.Method = "(response)"
		}
		if len(m.args) > 0 {
			sum := sha256.Sum256(m.args)
			rec.ArgsSHA256 = hex.EncodeToString(sum[:])
		}
		if m.denied != "" {
			rec.Decision = "denied: " + m.denied
		} else if m.batch != "" {
			rec.Decision = "denied: " + m.batch
		}
		recs = append(recs, rec)
	}
	for _, n := range c.notes {
		rec := base
		rec.Method, rec.Tool, rec.Decision = n.Method, n.Tool, n.Decision
		recs = append(recs, rec)
	}
	if c.moreNotes > 0 {
		rec := base
		rec.Method, rec.Decision = "(response)", fmt.Sprintf("refused: %d more upstream messages (not recorded one by one)", c.moreNotes)
		recs = append(recs, rec)
	}
	for i := range recs {
		recs[i].Tool, recs[i].Decision = reqlimit.Clip(recs[i].Tool, MaxAuditTool), reqlimit.Clip(recs[i].Decision, MaxAuditDecision)
	}
	g.emit(suppKey{c.caller.OrgID, c.caller.SandboxID, name}, recs)
}

// emit passes records to Config.Audit within the sandbox's audit budget
// (AuditRate per second, AuditBurst at once); the rest are counted, and
// reported by a record of their number before the sandbox's next record
// that fits, or by FlushSuppressed.
// Bounds of an audit record's sandbox-written strings: a tool name or
// resource URI, and the decision (a denial quotes the name). The audit rate
// counts records, and a name may fill a request body (MaxRequest, 1 MiB):
// unbounded, one sandbox wrote ~200 MiB/s to the store, kept 30 days.
const (
	MaxAuditTool     = 512
	MaxAuditDecision = 1024
)

func (g *Gateway) emit(k suppKey, recs []store.MCPAudit) {
	now := g.cfg.Now()
	g.mu.Lock()
	b := g.audits[k.sandbox]
	if b == nil {
		b = &bucket{tokens: float64(g.cfg.AuditBurst), last: now}
		g.audits[k.sandbox] = b
	}
	b.tokens = min(float64(g.cfg.AuditBurst), b.tokens+now.Sub(b.last).Seconds()*g.cfg.AuditRate)
	b.last = now
	n := min(len(recs), int(b.tokens))
	b.tokens -= float64(n)
	var out []store.MCPAudit
	if n > 0 {
		out = g.takeSuppressedLocked(k.sandbox, now)
	}
	if over := len(recs) - n; over > 0 {
		g.supp[k] += over
		g.suppTotal.Add(int64(over))
	}
	g.mu.Unlock()
	for _, r := range out {
		g.cfg.Audit(r)
	}
	for _, r := range recs[:n] {
		g.cfg.Audit(r)
	}
}

// takeSuppressedLocked turns the counts of a sandbox ("" = all) into records.
func (g *Gateway) takeSuppressedLocked(sandboxID string, now time.Time) []store.MCPAudit {
	var out []store.MCPAudit
	for k, n := range g.supp {
		if sandboxID != "" && k.sandbox != sandboxID {
			continue
		}
		out = append(out, store.MCPAudit{
			At: now.UTC(), OrgID: k.org, SandboxID: k.sandbox, Server: k.server, Method: "(audit)",
			Decision: fmt.Sprintf("suppressed: %d records over the sandbox's audit rate (%g/s, burst %d)", n, g.cfg.AuditRate, g.cfg.AuditBurst),
		})
		delete(g.supp, k)
	}
	return out
}

// FlushSuppressed records the counts of suppressed records now.
func (g *Gateway) FlushSuppressed() {
	if g.cfg.Audit == nil {
		return
	}
	g.mu.Lock()
	out := g.takeSuppressedLocked("", g.cfg.Now())
	g.mu.Unlock()
	for _, r := range out {
		g.cfg.Audit(r)
	}
}

// Suppressed is the number of records over sandboxes' audit budgets so far.
func (g *Gateway) Suppressed() int64 { return g.suppTotal.Load() }

// ---- sessions

func randomID() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

func (g *Gateway) newSession(c Caller, server, upstreamID string) (string, error) {
	id, err := randomID()
	if err != nil {
		return "", err
	}
	now := g.cfg.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for k, s := range g.sessions {
		if now.Sub(s.used) > sessionIdle {
			delete(g.sessions, k)
			continue
		}
		if s.sandboxID == c.SandboxID {
			n++
		}
	}
	if n >= maxSessionsPerCallr {
		return "", fmt.Errorf("sandbox %s has %d open MCP sessions: close some (DELETE)", c.SandboxID, n)
	}
	g.sessions[id] = &session{sandboxID: c.SandboxID, orgID: c.OrgID, server: server, upstreamID: upstreamID, used: now}
	return id, nil
}

// session returns the session id names if it belongs to this sandbox and
// server (another sandbox's id is as unknown as a made-up one).
func (g *Gateway) session(id string, c Caller, server string) *session {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.sessions[id]
	if s == nil || s.sandboxID != c.SandboxID || s.orgID != c.OrgID || s.server != server {
		return nil
	}
	s.used = g.cfg.Now()
	return s
}

func (g *Gateway) dropSession(id string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.sessions, id)
}

// Forget drops a sandbox's sessions and rate state (it ended), recording
// the count of its suppressed audit records first.
func (g *Gateway) Forget(sandboxID string) {
	g.mu.Lock()
	out := g.takeSuppressedLocked(sandboxID, g.cfg.Now())
	g.forgetLocked(sandboxID)
	g.mu.Unlock()
	if g.cfg.Audit != nil {
		for _, r := range out {
			g.cfg.Audit(r)
		}
	}
}

func (g *Gateway) forgetLocked(sandboxID string) {
	delete(g.audits, sandboxID)
	for k, s := range g.sessions {
		if s.sandboxID == sandboxID {
			delete(g.sessions, k)
		}
	}
	for k := range g.buckets {
		if strings.HasPrefix(k, sandboxID+"/") {
			delete(g.buckets, k)
		}
	}
	for k, c := range g.verified {
		if c.SandboxID == sandboxID {
			delete(g.verified, k)
		}
	}
}

// ---- rate limiting: a token bucket per sandbox and server.

type bucket struct {
	tokens float64
	last   time.Time
}

func (g *Gateway) allow(key string, rate float64, n int) bool {
	if rate <= 0 {
		rate = DefaultRate
	}
	burst := 2 * rate
	now := g.cfg.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	b := g.buckets[key]
	if b == nil {
		b = &bucket{tokens: burst, last: now}
		g.buckets[key] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	b.last = now
	if b.tokens < float64(n) {
		return false
	}
	b.tokens -= float64(n)
	return true
}
