// Package console is chalkd's web console: plain HTML/JS pages embedded in
// the binary and served under /console on the API's listeners, which call
// the Connect API from the browser (JSON) with a console session cookie, and
// a terminal (xterm.js) relayed over a WebSocket to an exec in a sandbox.
//
// Sessions, CSRF and the same-origin rule live in the api package (the
// guard authenticates a session like a bearer key); this package serves the
// pages with a strict Content-Security-Policy, signs browsers in and out,
// and relays terminals through the API's services in-process.
package console

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Prefix is where the console is served.
const Prefix = "/console/"

// CSP is the Content-Security-Policy of every console response: scripts,
// connections and everything else only from chalkd itself, no inline
// scripts, no framing. Inline styles are allowed because xterm.js' renderer
// sizes its rows with a generated <style> element; no script can be
// injected through them.
const CSP = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// API is what the console needs from the API server (*api.Server).
type API interface {
	SignIn(w http.ResponseWriter, r *http.Request) (*api.ConsoleSession, error)
	SignOut(w http.ResponseWriter, r *http.Request) error
	Session(r *http.Request, csrf bool) (*api.ConsoleSession, error)
	LocalTransport() http.RoundTripper
}

var _ API = (*api.Server)(nil)

// Config configures the console.
type Config struct {
	API    API
	Logger *slog.Logger
}

// Handler serves the console.
type Handler struct {
	api API
	log *slog.Logger
	mux *http.ServeMux
}

var _ http.Handler = (*Handler)(nil)

// New returns the console's handler, to be mounted at Prefix (and at
// "/console", which redirects).
func New(cfg Config) *Handler {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Handler{api: cfg.API, log: cfg.Logger, mux: http.NewServeMux()}
	h.mux.Handle("GET /console/{$}", serveAsset("index.html"))
	h.mux.Handle("GET /console/static/", http.StripPrefix("/console/static/", assetServer()))
	h.mux.HandleFunc("POST /console/session", h.signIn)
	h.mux.HandleFunc("GET /console/session", h.whoami)
	h.mux.HandleFunc("DELETE /console/session", h.signOut)
	h.mux.HandleFunc("GET /console/terminal", h.terminal)
	h.mux.Handle("/console", http.RedirectHandler(Prefix, http.StatusFound))
	return h
}

// ServeHTTP sets the security headers of every console response and routes it.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	SecurityHeaders(w.Header())
	h.mux.ServeHTTP(w, r)
}

// SecurityHeaders sets the console's response headers: the CSP, nosniff,
// no referrer, no framing.
func SecurityHeaders(hd http.Header) {
	hd.Set("Content-Security-Policy", CSP)
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("Referrer-Policy", "no-referrer")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("Cross-Origin-Opener-Policy", "same-origin")
}

// sessionInfo is the answer of sign-in and of GET /console/session.
type sessionInfo struct {
	CSRF      string `json:"csrf"`
	CSRFName  string `json:"csrf_header"`
	User      string `json:"user"`
	Org       string `json:"org"`
	Role      string `json:"role"`
	KeyPrefix string `json:"key_prefix"`
	NodeAdmin bool   `json:"node_admin"`
}

func info(cs *api.ConsoleSession) sessionInfo {
	p := cs.Principal
	return sessionInfo{CSRF: cs.CSRF, CSRFName: api.CSRFHeader, User: p.User, Org: p.OrgID, Role: string(p.Role), KeyPrefix: p.KeyPrefix, NodeAdmin: p.NodeAdmin}
}

// signIn: POST /console/session with "Authorization: Bearer <key>" and no
// body; answers the session's CSRF token and sets its cookie.
func (h *Handler) signIn(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	cs, err := h.api.SignIn(w, r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, info(cs))
}

// whoami: GET /console/session answers the signed-in session (and its CSRF
// token, which only a same-origin page can read) or 401.
func (h *Handler) whoami(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	cs, err := h.api.Session(r, false)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, info(cs))
}

func (h *Handler) signOut(w http.ResponseWriter, r *http.Request) {
	if err := h.api.SignOut(w, r); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// fail answers err as JSON {"error": "..."} with its HTTP status.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, errdefs.ErrUnauthenticated):
		code = http.StatusUnauthorized
	case errors.Is(err, errdefs.ErrPermissionDenied):
		code = http.StatusForbidden
	case errors.Is(err, errdefs.ErrInvalidArgument):
		code = http.StatusBadRequest
	case errors.Is(err, errdefs.ErrNotFound):
		code = http.StatusNotFound
	}
	if code == http.StatusInternalServerError {
		h.log.Error("console", "path", r.URL.Path, "err", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": userMessage(err)})
}

// userMessage is err without the error class %w appended to it: users see
// the sentence.
func userMessage(err error) string {
	msg := err.Error()
	for _, class := range []error{errdefs.ErrUnauthenticated, errdefs.ErrPermissionDenied, errdefs.ErrInvalidArgument, errdefs.ErrNotFound} {
		if m, ok := strings.CutSuffix(msg, ": "+class.Error()); ok {
			return m
		}
	}
	return msg
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
