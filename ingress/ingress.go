package ingress

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Limits bound what clients and sandbox servers can hold of chalkd. Zero
// fields take the defaults below.
type Limits struct {
	MaxConns          int           // open client connections in all (default 4096)
	MaxConnsPerClient int           // open connections per client IP (default 64)
	MaxPerRoute       int           // requests (and WebSockets) in flight per route (default 256)
	DialTimeout       time.Duration // to connect to the sandbox (default 5 s)
	ResponseHeader    time.Duration // for the sandbox's response headers (default 60 s)
	ReadHeaderTimeout time.Duration // for a client's request headers (default 10 s)
	IdleTimeout       time.Duration // keep-alive between client requests (default 120 s)
	MaxHeaderBytes    int           // client request headers (default 32 KiB)
}

func (l *Limits) defaults() {
	set := func(p *int, v int) {
		if *p <= 0 {
			*p = v
		}
	}
	setD := func(p *time.Duration, v time.Duration) {
		if *p <= 0 {
			*p = v
		}
	}
	set(&l.MaxConns, 4096)
	set(&l.MaxConnsPerClient, 64)
	set(&l.MaxPerRoute, 256)
	set(&l.MaxHeaderBytes, 32<<10)
	setD(&l.DialTimeout, 5*time.Second)
	setD(&l.ResponseHeader, 60*time.Second)
	setD(&l.ReadHeaderTimeout, 10*time.Second)
	setD(&l.IdleTimeout, 120*time.Second)
}

// Config configures a Server.
type Config struct {
	// BaseURL is the listener as clients reach it (scheme://host[:port]);
	// URLs handed out are built from it.
	BaseURL string
	// Domain enables host routing: <port>-<sandbox>.<Domain>. Empty: path
	// routing only (the URLs handed out are then path URLs).
	Domain string
	// Key signs and verifies tokens (at least 32 bytes).
	Key []byte
	// Authenticate resolves an Authorization header to the caller's org; an
	// error refuses it.
	Authenticate func(ctx context.Context, authorization string) (org string, err error)
	// Live reports whether a sandbox still runs; a route of one that does
	// not is never forwarded to (its address may belong to another
	// sandbox by now). Nil: routes are trusted to be removed in time.
	Live   func(id string) bool
	Limits Limits
	Logger *slog.Logger
	now    func() time.Time
}

// Route is one exposed port as the API recorded it.
type Route struct {
	SandboxID string
	Port      uint16
	OrgID     string
	Public    bool
	Addr      netip.Addr // the sandbox's address
}

type key struct {
	id   string
	port uint16
}

// route is a Route in force: its in-flight requests can be cut.
type route struct {
	Route
	sem    chan struct{}
	mu     sync.Mutex
	active map[*int]context.CancelFunc
	closed bool
}

// Server is the ingress: an http.Handler and the routes it serves.
type Server struct {
	cfg   Config
	log   *slog.Logger
	proxy *httputil.ReverseProxy
	tr    *http.Transport

	mu     sync.Mutex
	routes map[key]*route
	// dial, if set (DialVia), connects to sandbox ports instead of their
	// addresses.
	dial func(ctx context.Context, id string, port uint16) (net.Conn, error)
}

// dialHost is the host of a proxied request's URL under DialVia: it names
// the sandbox, so that a kept-alive connection serves only its sandbox
// and port (addresses of sandboxes on different nodes may be the same).
const dialHost = ".sandbox.invalid"

// DialVia makes the server reach sandbox ports with dial (in a fleet, the
// control plane through the sandbox's node) rather than by the routes'
// addresses. Call it before serving.
func (s *Server) DialVia(dial func(ctx context.Context, id string, port uint16) (net.Conn, error)) {
	s.dial = dial
	s.tr.DialContext = func(ctx context.Context, _, addr string) (net.Conn, error) {
		host, ps, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		id, ok := strings.CutSuffix(host, dialHost)
		port, perr := parsePort(ps)
		if !ok || !validID(id) || perr != nil {
			return nil, fmt.Errorf("ingress: dial %q: not a sandbox port", addr)
		}
		ctx, cancel := context.WithTimeout(ctx, s.cfg.Limits.DialTimeout)
		defer cancel()
		return dial(ctx, id, port)
	}
}

// CookieName is the cookie a signed URL's token is kept in.
const CookieName = "chalk_ingress"

// TokenParam is the query parameter of signed URLs.
const TokenParam = "chalk_token"

// New returns a Server with no routes.
func New(cfg Config) (*Server, error) {
	if len(cfg.Key) < 32 {
		return nil, errors.New("ingress: signing key shorter than 32 bytes")
	}
	if cfg.Authenticate == nil {
		return nil, errors.New("ingress: no Authenticate")
	}
	if _, err := url.Parse(cfg.BaseURL); err != nil || cfg.BaseURL == "" {
		return nil, fmt.Errorf("ingress: base URL %q: %v", cfg.BaseURL, err)
	}
	cfg.BaseURL = strings.TrimSuffix(cfg.BaseURL, "/")
	cfg.Domain = strings.ToLower(strings.Trim(cfg.Domain, "."))
	cfg.Limits.defaults()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	s := &Server{cfg: cfg, log: cfg.Logger, routes: map[key]*route{}}
	d := &net.Dialer{Timeout: cfg.Limits.DialTimeout}
	s.tr = &http.Transport{
		Proxy:                 nil,
		DialContext:           d.DialContext,
		ResponseHeaderTimeout: cfg.Limits.ResponseHeader,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		DisableCompression:    true, // bytes pass as the sandbox sent them
	}
	s.proxy = &httputil.ReverseProxy{
		Rewrite:       s.rewrite,
		Transport:     s.tr,
		FlushInterval: -1, // stream: server-sent events and chunked bodies are never held back
		ErrorLog:      slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.log.Debug("ingress upstream", "url", r.URL.String(), "err", err)
			http.Error(w, "sandbox port not answering", http.StatusBadGateway)
		},
	}
	return s, nil
}

// Sign mints a token for port of sandbox id valid until exp.
func (s *Server) Sign(id string, port uint16, exp time.Time) string {
	return Sign(s.cfg.Key, id, port, exp)
}

// URLs are the host-routed URL (the path URL without a domain) and the
// path-routed URL of port of sandbox id.
func (s *Server) URLs(id string, port uint16) (host, path string) {
	path = fmt.Sprintf("%s/s/%s/%d/", s.cfg.BaseURL, id, port)
	if s.cfg.Domain == "" {
		return path, path
	}
	u, _ := url.Parse(s.cfg.BaseURL)
	h := fmt.Sprintf("%d-%s.%s", port, id, s.cfg.Domain)
	if p := u.Port(); p != "" {
		h = net.JoinHostPort(h, p)
	}
	return u.Scheme + "://" + h + "/", path
}

// Add serves r (replacing a route of the same sandbox and port, whose
// connections are cut if its access changed).
func (s *Server) Add(r Route) {
	s.mu.Lock()
	old := s.routes[key{r.SandboxID, r.Port}]
	if old != nil && old.Route == r {
		s.mu.Unlock()
		return
	}
	s.routes[key{r.SandboxID, r.Port}] = &route{Route: r, sem: make(chan struct{}, s.cfg.Limits.MaxPerRoute), active: map[*int]context.CancelFunc{}}
	s.mu.Unlock()
	if old != nil {
		old.cut()
	}
}

// Remove stops serving port of sandbox id (port 0: all its ports) and cuts
// the routes' open requests and WebSockets.
func (s *Server) Remove(id string, port uint16) {
	var gone []*route
	s.mu.Lock()
	for k, r := range s.routes {
		if k.id == id && (port == 0 || k.port == port) {
			delete(s.routes, k)
			gone = append(gone, r)
		}
	}
	s.mu.Unlock()
	for _, r := range gone {
		r.cut()
	}
	s.tr.CloseIdleConnections()
}

func (r *route) cut() {
	r.mu.Lock()
	r.closed = true
	for _, cancel := range r.active {
		cancel()
	}
	r.mu.Unlock()
}

// enter registers a request on r; false if r was removed meanwhile.
func (r *route) enter(cancel context.CancelFunc) (leave func(), ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, false
	}
	id := new(int)
	r.active[id] = cancel
	return func() {
		r.mu.Lock()
		delete(r.active, id)
		r.mu.Unlock()
	}, true
}

func (s *Server) lookup(k key) *route {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.routes[k]
}

type targetKey struct{}

// target is what rewrite needs from ServeHTTP.
type target struct {
	addr string // sandbox ip:port
	path string // the path to forward ("" for host routing: unchanged)
	raw  string
}

func (s *Server) rewrite(pr *httputil.ProxyRequest) {
	t := pr.In.Context().Value(targetKey{}).(*target)
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = t.addr
	if t.path != "" {
		pr.Out.URL.Path, pr.Out.URL.RawPath = t.path, t.raw
	}
	pr.Out.Host = pr.In.Host
	pr.SetXForwarded()
}

// ServeHTTP routes, authorises and proxies one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	k, t, prefix, ok := s.parse(r)
	if !ok {
		http.Error(w, "no such route: use <port>-<sandbox>."+s.cfg.Domain+" or /s/<sandbox>/<port>/", http.StatusNotFound)
		return
	}
	if t.path == "" && prefix != "/" {
		// /s/<id>/<port> without the slash: relative links need it.
		http.Redirect(w, r, prefix+queryOf(r), http.StatusPermanentRedirect)
		return
	}
	rt := s.lookup(k)
	if rt != nil && s.cfg.Live != nil && !s.cfg.Live(k.id) {
		rt = nil
	}
	if rt == nil {
		http.Error(w, "no such route", http.StatusNotFound)
		return
	}
	if !rt.Public {
		if code, msg := s.authorise(w, r, rt, prefix); code != 0 {
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="chalk ingress"`)
			}
			http.Error(w, msg, code)
			return
		}
	}
	stripToken(r)
	select {
	case rt.sem <- struct{}{}:
		defer func() { <-rt.sem }()
	default:
		http.Error(w, "too many requests in flight to this sandbox port", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	leave, ok := rt.enter(cancel)
	if !ok {
		http.Error(w, "no such route", http.StatusNotFound)
		return
	}
	defer leave()
	t.addr = netip.AddrPortFrom(rt.Addr, rt.Port).String()
	if s.dial != nil {
		t.addr = net.JoinHostPort(k.id+dialHost, strconv.Itoa(int(k.port)))
	}
	s.proxy.ServeHTTP(w, r.WithContext(context.WithValue(ctx, targetKey{}, t)))
}

func queryOf(r *http.Request) string {
	if r.URL.RawQuery == "" {
		return ""
	}
	return "?" + r.URL.RawQuery
}

// parse finds the route: by host name under the domain, else by path.
// prefix is the path prefix the route owns ("/" for host routing).
func (s *Server) parse(r *http.Request) (key, *target, string, bool) {
	if s.cfg.Domain != "" {
		host := strings.ToLower(r.Host)
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		if label, ok := strings.CutSuffix(host, "."+s.cfg.Domain); ok && !strings.Contains(label, ".") {
			ps, id, ok := strings.Cut(label, "-")
			if port, err := parsePort(ps); ok && err == nil && validID(id) {
				return key{id, port}, &target{}, "/", true
			}
			return key{}, nil, "", false
		}
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/s/")
	if !ok {
		return key{}, nil, "", false
	}
	id, rest, _ := strings.Cut(rest, "/")
	ps, rest, slash := strings.Cut(rest, "/")
	port, err := parsePort(ps)
	if err != nil || !validID(id) {
		return key{}, nil, "", false
	}
	prefix := "/s/" + id + "/" + ps + "/"
	if !slash {
		return key{id, port}, &target{}, prefix, true
	}
	t := &target{path: "/" + rest}
	if raw := r.URL.RawPath; raw != "" {
		t.raw = "/" + strings.TrimPrefix(raw, prefix)
	}
	return key{id, port}, t, prefix, true
}

func parsePort(s string) (uint16, error) {
	if s == "" || s[0] == '0' || len(s) > 5 {
		return 0, errors.New("bad port")
	}
	p, err := strconv.ParseUint(s, 10, 16)
	if err != nil || p == 0 {
		return 0, errors.New("bad port")
	}
	return uint16(p), nil
}

// validID accepts sandbox ids as the API makes them (sb-<hex>).
func validID(id string) bool {
	if len(id) < 4 || len(id) > 64 || !strings.HasPrefix(id, "sb-") {
		return false
	}
	for _, c := range id[3:] {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// authorise admits a request to a private route: an API key of the
// route's org (Authorization: Bearer), or a token for this route in the
// query (then also kept in a cookie scoped to the route), the cookie or
// the Authorization header. It returns 0 or the refusal.
func (s *Server) authorise(w http.ResponseWriter, r *http.Request, rt *route, prefix string) (int, string) {
	now := s.cfg.now()
	if tok := r.URL.Query().Get(TokenParam); tok != "" {
		if !Verify(s.cfg.Key, tok, rt.SandboxID, rt.Port, now) {
			return http.StatusUnauthorized, "invalid or expired token"
		}
		exp, _ := strconv.ParseInt(tok[:strings.IndexByte(tok, '.')], 10, 64)
		http.SetCookie(w, &http.Cookie{
			Name: CookieName, Value: tok, Path: prefix, Expires: time.Unix(exp, 0),
			HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteLaxMode,
		})
		return 0, ""
	}
	if c, err := r.Cookie(CookieName); err == nil && Verify(s.cfg.Key, c.Value, rt.SandboxID, rt.Port, now) {
		return 0, ""
	}
	if h := r.Header.Get("Authorization"); h != "" {
		tok, _ := strings.CutPrefix(h, "Bearer ")
		if Verify(s.cfg.Key, strings.TrimSpace(tok), rt.SandboxID, rt.Port, now) {
			r.Header.Del("Authorization")
			return 0, ""
		}
		org, err := s.cfg.Authenticate(r.Context(), h)
		if err != nil {
			return http.StatusUnauthorized, "invalid API key"
		}
		if org != rt.OrgID {
			return http.StatusForbidden, "this key's org does not own the sandbox"
		}
		r.Header.Del("Authorization")
		return 0, ""
	}
	return http.StatusUnauthorized, "private sandbox port: send an API key of its org (Authorization: Bearer) or use a signed URL"
}

// stripToken removes the ingress's token from the query and its cookie
// from the request: the sandbox never sees them.
func stripToken(r *http.Request) {
	if q := r.URL.Query(); q.Has(TokenParam) {
		q.Del(TokenParam)
		r.URL.RawQuery = q.Encode()
	}
	cs := r.Cookies()
	if len(cs) == 0 {
		return
	}
	r.Header.Del("Cookie")
	var keep []string
	for _, c := range cs {
		if c.Name != CookieName {
			keep = append(keep, c.String())
		}
	}
	if len(keep) > 0 {
		r.Header.Set("Cookie", strings.Join(keep, "; "))
	}
}

// HTTPServer is an http.Server for the ingress listener with its timeouts
// and header bound (no read or write timeout: streams last).
func (s *Server) HTTPServer() *http.Server {
	l := s.cfg.Limits
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    l.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

// Close cuts every route's requests and closes idle sandbox connections.
func (s *Server) Close() {
	s.mu.Lock()
	rs := s.routes
	s.routes = map[key]*route{}
	s.mu.Unlock()
	for _, r := range rs {
		r.cut()
	}
	s.tr.CloseIdleConnections()
}
