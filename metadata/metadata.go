// Package metadata is the service every sandbox reaches at
// http://169.254.169.254: its workload identity tokens today, tunnel
// configuration and the MCP gateway later.
//
// The daemon binds Server to the node service address; sandboxnet DNATs
// 169.254.169.254:80 of each sandbox to it. The caller is identified only by
// the source address of its connection (r.RemoteAddr), which the sandbox's
// network namespace fixes, mapped to a sandbox by an injected Resolver —
// never by anything in the request. Requests that went through a proxy
// (X-Forwarded-For, Forwarded) are refused, and identity routes require the
// header "Metadata-Flavor: chalk" so that a sandboxed application tricked
// into fetching a URL (SSRF) cannot read tokens.
//
// The package also keeps token files fresh for sandboxes (StartTokenFile)
// and describes the files and environment variables that let AWS and GCP
// SDKs federate with our issuer (AWSFederation, GCPFederation).
package metadata

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
)

const (
	// Address is where sandboxes reach the service.
	Address = "169.254.169.254"
	// URL is the service's base URL inside a sandbox.
	URL = "http://" + Address
	// FlavorHeader and FlavorValue form the header identity routes require.
	FlavorHeader = "Metadata-Flavor"
	FlavorValue  = "chalk"
)

// Sandbox is what the service knows about a caller.
type Sandbox struct {
	ID            string
	OrgID         string
	ImageDigest   string
	NetworkPolicy string
	// PolicyNow, if set, computes the network_policy claim at the moment a
	// token or the identity is asked for (it replaces NetworkPolicy then):
	// resolving a caller stays cheap for routes that need no claim (the
	// MCP gateway), and every token carries the policy in force.
	PolicyNow func(context.Context) (string, error)
	CreatedBy string
	Running   bool
	Tunnels   any // filled later
}

// Subject returns the identity subject of the sandbox.
func (s Sandbox) Subject() identity.Subject {
	return identity.Subject{OrgID: s.OrgID, SandboxID: s.ID, ImageDigest: s.ImageDigest, NetworkPolicy: s.NetworkPolicy, CreatedBy: s.CreatedBy}
}

// withPolicy returns s with NetworkPolicy computed now (PolicyNow).
func (s Sandbox) withPolicy(ctx context.Context) (Sandbox, error) {
	if s.PolicyNow == nil {
		return s, nil
	}
	p, err := s.PolicyNow(ctx)
	if err != nil {
		return Sandbox{}, err
	}
	s.NetworkPolicy, s.PolicyNow = p, nil
	return s, nil
}

// Resolver maps the source address of a connection to the sandbox whose
// network namespace owns that address.
type Resolver interface {
	SandboxByAddr(ctx context.Context, addr netip.Addr) (Sandbox, bool)
}

// Minter mints the tokens the service hands out: the identity issuer
// (*identity.Issuer), or on a fleet node its link to the control plane's
// issuer.
type Minter interface {
	Mint(ctx context.Context, s identity.Subject, audience string, ttl time.Duration) (string, time.Time, error)
	Now() time.Time
	URL() string
}

// Config configures a Server. Issuer and Resolver are required.
type Config struct {
	Issuer   Minter
	Resolver Resolver
	Logger   *slog.Logger // nil discards
	// DefaultAudience is used when a token request names no audience; with
	// none configured such requests are refused.
	DefaultAudience string
	// DisableTokenCache mints a new token on every request. By default a
	// token is reused for identical requests while at least 3/4 of its
	// lifetime remains.
	DisableTokenCache bool
	// Limits bound connections, headers and bodies per sandbox.
	Limits Limits
}

// Server is the metadata service. It is safe for concurrent use.
type Server struct {
	cfg   Config
	log   *slog.Logger
	mux   *http.ServeMux
	cache *tokenCache
	// budget counts request body bytes in flight per sandbox.
	budget *reqlimit.Budget
}

var _ http.Handler = (*Server)(nil)

// New returns a Server with the identity routes installed.
func New(cfg Config) (*Server, error) {
	if cfg.Issuer == nil || cfg.Resolver == nil {
		return nil, fmt.Errorf("metadata: Issuer and Resolver are required: %w", errdefs.ErrInvalidArgument)
	}
	cfg.Limits.defaults()
	s := &Server{cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), budget: reqlimit.NewBudget(cfg.Limits.InFlightPerSandbox, 0)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if !cfg.DisableTokenCache {
		s.cache = newTokenCache(maxCachedTokens)
	}
	s.Handle("GET "+TokenPath, http.HandlerFunc(s.serveToken))
	s.Handle("GET "+IdentityPath, http.HandlerFunc(s.serveIdentity))
	return s, nil
}

// RouteOption adjusts how Handle guards a route.
type RouteOption func(*route)

type route struct{ flavor bool }

// WithoutFlavorHeader lets a route be called without the Metadata-Flavor
// header (for clients that cannot set it, such as an MCP client reaching the
// gateway). The caller is still identified by its source address.
func WithoutFlavorHeader() RouteOption { return func(r *route) { r.flavor = false } }

// Handle adds a route (an http.ServeMux pattern, e.g. "GET /v1/tunnels" or
// "/mcp/"). Every route only sees identified, running sandboxes: the
// handler reads the caller with CallerFrom(r.Context()). Routes require
// the Metadata-Flavor header unless WithoutFlavorHeader is given.
func (s *Server) Handle(pattern string, h http.Handler, opts ...RouteOption) {
	rt := route{flavor: true}
	for _, o := range opts {
		o(&rt)
	}
	s.mux.Handle(pattern, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rt.flavor && r.Header.Get(FlavorHeader) != FlavorValue {
			writeError(w, http.StatusForbidden, "missing header "+FlavorHeader+": "+FlavorValue)
			return
		}
		h.ServeHTTP(w, r)
	}))
}

type callerKey struct{}

// CallerFrom returns the sandbox that made the request, for handlers added
// with Handle.
func CallerFrom(ctx context.Context) (Sandbox, bool) {
	sb, ok := ctx.Value(callerKey{}).(Sandbox)
	return sb, ok
}

// WithCaller returns ctx naming sb as the caller (CallerFrom): for a
// request relayed by a fleet node, whose caller the control plane
// identified from the node's certificate and the sandbox's placement.
func WithCaller(ctx context.Context, sb Sandbox) context.Context {
	return context.WithValue(ctx, callerKey{}, sb)
}

// ServeHTTP identifies the caller by its source address and dispatches.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	for _, h := range []string{"X-Forwarded-For", "Forwarded", "X-Real-Ip"} {
		if _, ok := r.Header[h]; ok {
			s.log.WarnContext(r.Context(), "metadata: refused proxied request", "remote", r.RemoteAddr, "header", h)
			writeError(w, http.StatusForbidden, "proxied requests are refused ("+h+")")
			return
		}
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		writeError(w, http.StatusForbidden, "unknown caller")
		return
	}
	sb, ok := s.cfg.Resolver.SandboxByAddr(r.Context(), ap.Addr().Unmap())
	if !ok {
		s.log.WarnContext(r.Context(), "metadata: request from an unknown address", "remote", r.RemoteAddr)
		writeError(w, http.StatusForbidden, "unknown caller")
		return
	}
	if !sb.Running {
		writeError(w, http.StatusForbidden, "sandbox "+sb.ID+" is not running")
		return
	}
	// Identified: now its body may be admitted (not read yet: the route
	// decides, after its own checks).
	release, err := s.budget.Admit(sb.ID, r, 0)
	if err != nil {
		w.Header().Set("Connection", "close")
		writeError(w, http.StatusTooManyRequests, err.Error())
		return
	}
	defer release()
	reqlimit.BodyDeadline(w, r, s.cfg.Limits.BodyRate)
	s.mux.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, sb)))
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	b, _ := json.Marshal(map[string]string{"error": msg})
	w.Write(append(b, '\n'))
}
