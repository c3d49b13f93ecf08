package noderpc

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/mcpgw"
	"github.com/chalkcompute/chalkcompute/metadata"
)

// The metadata routes of node sandboxes that need the control plane: the
// MCP gateway (/mcp/<server>: the upstream credentials are the control
// plane's alone) and the sandbox's own API access (/api/...). A node's
// metadata service identifies the caller by its source address, as for
// /v1/identity, and relays the request to the control plane's fleet
// listener over the mTLS fleet channel (its node certificate) at
// RelayPrefix/<sandbox id>/<route>; the control plane serves it only for a
// running sandbox placed on that node, with the caller set as if it had
// come to its own metadata service (the gateway's token, label, allowlist,
// rate and audit checks, the API's token binding, all run there). Answers
// stream back as they come (an SSE event is flushed by each hop).

// RelayPrefix is where the fleet listener takes relayed requests.
const RelayPrefix = "/chalk.node.v1.Relay/"

// RelayRoutes are the metadata routes a node relays.
var RelayRoutes = []string{"/mcp/", "/api/"}

// Bounds of the relay: requests in flight per sandbox on a node and per
// node on the control plane (the gateway bounds a sandbox's MCP calls
// further, the API its own calls); an MCP request body.
const (
	MaxRelaysPerSandbox = 32
	MaxRelaysPerNode    = 1024
	MaxRelayMCPBody     = mcpgw.DefaultMaxRequest
	// RelayMCPHeaderTimeout bounds the wait for the control plane's answer
	// to an MCP request on the node's hop (the gateway's own bound on the
	// upstream's answer, and some).
	RelayMCPHeaderTimeout = mcpgw.DefaultTimeout + 30*time.Second
)

// relayRoute checks a relayed route: one of RelayRoutes, no dot segments.
func relayRoute(p string) error {
	ok := false
	for _, r := range RelayRoutes {
		ok = ok || strings.HasPrefix(p, r)
	}
	if !ok {
		return fmt.Errorf("route %q: only %s are relayed", p, strings.Join(RelayRoutes, " and "))
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "." || seg == ".." {
			return fmt.Errorf("route %q: dot segments are refused", p)
		}
	}
	return nil
}

// validSandboxID: lowercase letters, digits, - and _ (at most 128).
func validSandboxID(id string) bool {
	return id != "" && len(id) <= 128 && !strings.ContainsFunc(id, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	})
}

func relayError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	b, _ := json.Marshal(map[string]string{"error": msg})
	_, _ = w.Write(append(b, '\n'))
}

// counter bounds requests in flight by key.
type counter struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *counter) enter(key string, max int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	if c.n[key] >= max {
		return false
	}
	c.n[key]++
	return true
}

func (c *counter) leave(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[key]--; c.n[key] <= 0 {
		delete(c.n, key)
	}
}

// Relay is the control plane's side: serve it on the fleet listener at
// RelayPrefix (behind ControlServerTLS).
type Relay struct {
	// NodeOf is the node sandbox id is placed on ("" if none).
	NodeOf func(id string) string
	// Caller is sandbox id as a metadata caller if it runs (else an error
	// saying why not).
	Caller func(ctx context.Context, id string) (metadata.Sandbox, error)
	// Admit admits the node whose verified certificate is leaf
	// (Fleet.AdmitCert: not removed, its current certificate or the
	// superseded one before its deadline): checked on every request, so a
	// removed node, or an old certificate, keeping a connection open gets
	// nothing, even for a sandbox still recorded on it. The request runs
	// in the context it returns (ended when the certificate is accepted
	// no more); cancel when it ends. Required.
	Admit func(ctx context.Context, leaf *x509.Certificate) (context.Context, context.CancelFunc, error)
	// Handler serves the routes (paths /mcp/..., /api/...) for the caller
	// metadata.CallerFrom names.
	Handler http.Handler
	Log     *slog.Logger

	inflight counter
}

func (rl *Relay) log() *slog.Logger {
	if rl.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return rl.Log
}

func (rl *Relay) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	peer := ""
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		peer = NodeIDOf(r.TLS.VerifiedChains[0][0])
	}
	if peer == "" {
		relayError(w, http.StatusUnauthorized, "relay: a node certificate is required")
		return
	}
	if rl.Admit == nil {
		relayError(w, http.StatusInternalServerError, "relay: no certificate check configured")
		return
	}
	ctx, cancel, err := rl.Admit(r.Context(), r.TLS.VerifiedChains[0][0])
	if err != nil {
		relayError(w, http.StatusForbidden, "relay: "+err.Error())
		return
	}
	defer cancel()
	r = r.WithContext(ctx)
	id, route, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, RelayPrefix), "/")
	route = "/" + route
	if !validSandboxID(id) {
		relayError(w, http.StatusBadRequest, fmt.Sprintf("relay: sandbox id %q: want lowercase letters, digits, - and _", id))
		return
	}
	if err := relayRoute(route); err != nil {
		relayError(w, http.StatusNotFound, "relay: "+err.Error())
		return
	}
	if on := rl.NodeOf(id); on != peer {
		rl.log().Warn("fleet: relay for a sandbox not on the node refused", "node", peer, "sandbox", id, "route", route)
		relayError(w, http.StatusForbidden, fmt.Sprintf("relay: sandbox %q is not placed on node %q", id, peer))
		return
	}
	if !rl.inflight.enter(peer, MaxRelaysPerNode) {
		relayError(w, http.StatusTooManyRequests, fmt.Sprintf("relay: node %s has %d requests in flight", peer, MaxRelaysPerNode))
		return
	}
	defer rl.inflight.leave(peer)
	sb, err := rl.Caller(r.Context(), id)
	if err != nil {
		relayError(w, http.StatusForbidden, "relay: "+err.Error())
		return
	}
	if strings.HasPrefix(route, "/mcp/") {
		r.Body = http.MaxBytesReader(w, r.Body, MaxRelayMCPBody+1)
	}
	out := r.WithContext(metadata.WithCaller(r.Context(), sb))
	u := *r.URL
	u.Path, u.RawPath = route, ""
	out.URL = &u
	out.RequestURI = u.RequestURI()
	rl.Handler.ServeHTTP(w, out)
}

type headerTimer struct{}

var errHeaderTimeout = errors.New("relay: no answer from the control plane in time")

// RelayClient is a node's side: the handler of RelayRoutes on its metadata
// service, relaying each request of an identified sandbox to the control
// plane.
type RelayClient struct {
	// MCPHeaderTimeout bounds the wait for the answer to an MCP request
	// (default RelayMCPHeaderTimeout).
	MCPHeaderTimeout time.Duration

	proxy    *httputil.ReverseProxy
	inflight counter
}

// NewRelayClient relays to the control plane at controlURL as node id.
func NewRelayClient(id *NodeIdentity, controlURL string, log *slog.Logger) (*RelayClient, error) {
	return NewRelayClientOver(id, []string{controlURL}, nil, log)
}

// NewRelayClientOver relays to one of several control-plane replicas as
// node id: each request goes to urls[current()] (the replica the node's
// fleet client reached last, CurrentReplica), or to the first with a nil
// current. A request is not retried at another replica (its body is
// streamed); the next one goes to where the heartbeats moved.
func NewRelayClientOver(id *NodeIdentity, urls []string, current func() int, log *slog.Logger) (*RelayClient, error) {
	if len(urls) == 0 {
		return nil, fmt.Errorf("relay: no control plane URL")
	}
	bases := make([]*url.URL, len(urls))
	for i, u := range urls {
		b, err := url.Parse(u)
		if err != nil || b.Scheme != "https" || b.Host == "" {
			return nil, fmt.Errorf("relay: control plane URL %q: want https://host:port", u)
		}
		bases[i] = b
	}
	pick := func() *url.URL {
		if current == nil {
			return bases[0]
		}
		if i := current(); i >= 0 && i < len(bases) {
			return bases[i]
		}
		return bases[0]
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &RelayClient{MCPHeaderTimeout: RelayMCPHeaderTimeout}
	c.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			sb, _ := metadata.CallerFrom(pr.In.Context())
			base := pick()
			pr.Out.URL = &url.URL{Scheme: base.Scheme, Host: base.Host, Path: RelayPrefix + sb.ID + pr.In.URL.Path, RawQuery: pr.In.URL.RawQuery}
			pr.Out.Host = base.Host
			// Nothing the sandbox sends says who it is or where it came
			// from: the path names it, from the node's identification.
			for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip", "Cookie"} {
				pr.Out.Header.Del(h)
			}
		},
		Transport: nodeTransport(id, NodeClientTLS(id)), // new connections after a renewal
		ModifyResponse: func(res *http.Response) error {
			if t, ok := res.Request.Context().Value(headerTimer{}).(*time.Timer); ok {
				t.Stop()
			}
			return nil
		},
		FlushInterval: -1, // every write as it comes: SSE events one by one
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
				if _, mcp := r.Context().Value(headerTimer{}).(*time.Timer); mcp && context.Cause(r.Context()) == errHeaderTimeout {
					relayError(w, http.StatusGatewayTimeout, "the control plane did not answer in time")
				}
				return // the sandbox went away
			}
			if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
				w.Header().Set("Connection", "close")
				relayError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", MaxRelayMCPBody))
				return
			}
			// The details (the control plane's address) go to the node's
			// log, not to the sandbox.
			log.Warn("fleet: relay to the control plane", "path", r.URL.Path, "err", err)
			relayError(w, http.StatusBadGateway, "the control plane cannot be reached from this node")
		},
	}
	return c, nil
}

func (c *RelayClient) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	sb, ok := metadata.CallerFrom(r.Context())
	if !ok || !sb.Running || !validSandboxID(sb.ID) {
		relayError(w, http.StatusForbidden, "request does not come from a running sandbox")
		return
	}
	if err := relayRoute(r.URL.Path); err != nil {
		relayError(w, http.StatusNotFound, err.Error())
		return
	}
	if r.Header.Get("Upgrade") != "" {
		relayError(w, http.StatusBadRequest, "protocol upgrades are not relayed")
		return
	}
	if !c.inflight.enter(sb.ID, MaxRelaysPerSandbox) {
		w.Header().Set("Connection", "close")
		relayError(w, http.StatusTooManyRequests, fmt.Sprintf("sandbox %s has %d requests in flight to the control plane", sb.ID, MaxRelaysPerSandbox))
		return
	}
	defer c.inflight.leave(sb.ID)
	if strings.HasPrefix(r.URL.Path, "/mcp/") {
		if r.ContentLength > MaxRelayMCPBody {
			w.Header().Set("Connection", "close")
			relayError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", MaxRelayMCPBody))
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, MaxRelayMCPBody+1)
		// The answer's headers within RelayMCPHeaderTimeout (a stream's
		// events are then bounded by the gateway's idle limit).
		ctx, cancel := context.WithCancelCause(r.Context())
		defer cancel(nil)
		t := time.AfterFunc(c.MCPHeaderTimeout, func() { cancel(errHeaderTimeout) })
		defer t.Stop()
		r = r.WithContext(context.WithValue(ctx, headerTimer{}, t))
	}
	c.proxy.ServeHTTP(w, r)
}
