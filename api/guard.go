package api

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
)

// Bounds of request bodies on the API (Config.Limits; zero fields take the
// defaults below).
type Limits struct {
	// InFlightPerCaller bounds the request body bytes one caller (a user
	// token's subject, or a sandbox) has in flight; more is refused with
	// resource_exhausted (HTTP 429) before a byte is read. Default: twice
	// the largest message.
	InFlightPerCaller int64
	// InFlightTotal bounds them across callers (default 1 GiB).
	InFlightTotal int64
	// BodyRate: a body must arrive within Grace plus its size at PerSecond
	// (defaults 30 s, 64 KiB/s).
	BodyRate reqlimit.Rate
}

func (l *Limits) defaults(maxMessage int64) {
	if l.InFlightPerCaller == 0 {
		l.InFlightPerCaller = 2 * maxMessage
	}
	if l.InFlightTotal == 0 {
		l.InFlightTotal = 1 << 30
	}
	if l.BodyRate.Grace == 0 {
		l.BodyRate.Grace = 30 * time.Second
	}
	if l.BodyRate.PerSecond == 0 {
		l.BodyRate.PerSecond = 64 << 10
	}
}

// maxMessage is the largest request message the API reads.
func (s *Server) maxMessage() int64 { return s.cfg.MaxWriteFile + 1<<20 }

// SandboxOf names the sandbox a request was relayed from (by the metadata
// service, which knows it from the connection's source address).
type SandboxOf func(r *http.Request) (sandboxID string, ok bool)

// guard authenticates a request from its headers alone, then admits its body
// against the caller's in-flight budget: nothing of the body is read before
// both pass (Connect's interceptors run only after a unary body is read).
// With from set, the request was relayed from a sandbox, and a workload
// token is accepted only for that very sandbox.
func (s *Server) guard(next http.Handler, from SandboxOf) http.Handler {
	errw := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Answers are data, never to be sniffed into HTML or script by a browser.
		w.Header().Set("X-Content-Type-Options", "nosniff")
		// A console session cookie authenticates only on the API's own
		// listeners, never through a sandbox's metadata /api route.
		p, err := s.authenticateRequest(r.Context(), r, from == nil)
		if err == nil && from != nil {
			err = boundTo(p, r, from)
		}
		if err != nil {
			s.refuse(errw, w, r, err)
			return
		}
		release, err := s.budget.Admit(p.Subject, r, s.maxMessage())
		if err != nil {
			s.refuse(errw, w, r, err)
			return
		}
		defer release()
		reqlimit.BodyDeadline(w, r, s.cfg.Limits.BodyRate)
		next.ServeHTTP(w, r.WithContext(WithPrincipal(r.Context(), p)))
	})
}

// boundTo refuses a workload token relayed from another sandbox than its own
// (one copied out of the sandbox it was issued to).
func boundTo(p *Principal, r *http.Request, from SandboxOf) error {
	id, ok := from(r)
	if !ok {
		return fmt.Errorf("unknown calling sandbox: %w", errdefs.ErrUnauthenticated)
	}
	if p.IsWorkload() && p.SandboxID != id {
		return fmt.Errorf("workload token of sandbox %s used from sandbox %s: a sandbox's token is valid only from that sandbox: %w", p.SandboxID, id, errdefs.ErrUnauthenticated)
	}
	return nil
}

// refuse answers in the request's protocol without reading its body, and
// closes the connection rather than drain what the client still sends.
func (s *Server) refuse(errw *connect.ErrorWriter, w http.ResponseWriter, r *http.Request, err error) {
	w.Header().Set("Connection", "close")
	if errw.IsSupported(r) {
		_ = errw.Write(w, r, toConnect(err))
		return
	}
	code := http.StatusUnauthorized
	switch {
	case errors.Is(err, errdefs.ErrResourceExhausted):
		code = http.StatusTooManyRequests
	case errors.Is(err, errdefs.ErrPermissionDenied):
		code = http.StatusForbidden
	}
	http.Error(w, err.Error(), code)
}

// RequireAdmin serves h only to callers with an admin API token or an
// admin's console session (e.g. /metrics); others get 401/403 before
// anything else happens.
func (s *Server) RequireAdmin(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, err := s.authenticateRequest(r.Context(), r, true)
		if err == nil && (p.IsWorkload() || !p.Admin) {
			err = fmt.Errorf("%s needs an admin token: %w", r.URL.Path, errdefs.ErrPermissionDenied)
		}
		if err != nil {
			w.Header().Set("Connection", "close")
			code := http.StatusUnauthorized
			if errors.Is(err, errdefs.ErrPermissionDenied) {
				code = http.StatusForbidden
			}
			http.Error(w, err.Error(), code)
			return
		}
		h.ServeHTTP(w, r.WithContext(WithPrincipal(r.Context(), p)))
	})
}
