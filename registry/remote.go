package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/fresh"
)

// Fleets (issue #17): the control plane serves its embedded registry to the
// nodes on a second, TLS-only listener (ServeTLS), and each node resolves
// and pulls through a client-mode Registry (NewRemote) holding only the
// read-only pull credential. The control plane's own clients keep using the
// loopback listener.

// ServeTLS serves the registry (the same handler: every request needs one
// of its credentials) on l over TLS with cert, until Close. It never speaks
// plain HTTP.
func (r *Registry) ServeTLS(l net.Listener, cert tls.Certificate) error {
	return r.ServeTLSConfig(l, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil)
}

// ServeTLSConfig is ServeTLS with the listener's TLS configuration (client
// certificates, say) and, if gate is set, a check of every request before
// the registry's own (a refusal is answered 403).
func (r *Registry) ServeTLSConfig(l net.Listener, cfg *tls.Config, gate func(*http.Request) error) error {
	if r.app == nil {
		return fmt.Errorf("registry: a remote registry serves nothing: %w", errdefs.ErrFailedPrecondition)
	}
	h := r.srv.Handler
	if gate != nil {
		inner := h
		h = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if err := gate(req); err != nil {
				r.log.Warn("registry: TLS listener: request refused", "remote", req.RemoteAddr, "err", err)
				http.Error(w, "refused: "+err.Error(), http.StatusForbidden)
				return
			}
			inner.ServeHTTP(w, req)
		})
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 30 * time.Second,
		BaseContext:       r.srv.BaseContext,
		ErrorLog:          r.srv.ErrorLog,
		TLSConfig:         cfg,
	}
	r.connMu.Lock()
	r.extra = append(r.extra, srv)
	r.connMu.Unlock()
	go func() {
		if err := srv.ServeTLS(l, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			r.log.Error("registry: TLS listener", "addr", l.Addr().String(), "err", err)
		}
	}()
	r.log.Info("embedded registry serving over TLS", "addr", l.Addr().String())
	return nil
}

// RemoteConfig is a registry served by another chalkd (a fleet node's view
// of its control plane's registry).
type RemoteConfig struct {
	// Addr is host:port of the registry's TLS listener.
	Addr string
	// Pull is the read-only pull credential; nothing else is accepted.
	Pull Credential
	// TLS verifies the registry (RemotePullOptionsTLS); required.
	TLS    *tls.Config
	Logger *slog.Logger
	// Alternates are other host:port serving the same registry (control-
	// plane replicas sharing its storage): a connection to Addr that
	// cannot be made is made to them in turn, and the one that answered
	// is tried first next time. References keep naming Addr. TLS checks
	// each the same way.
	Alternates []string
	// Generation, if set, is checked at every request: when it changes,
	// the requests from then on go over new connections (internal/fresh):
	// a fleet node's renewed certificate is presented at once.
	Generation func() uint64
}

// NewRemote returns a client-mode Registry for the registry at cfg.Addr:
// Resolve, LocalRef and PullOptions work as on an embedded registry (the
// same repository layout: "<addr>/<registry-host>/<path>"), over HTTPS
// only, with the pull credential. It serves nothing and cannot push, pull
// through upstreams, list or delete.
func NewRemote(cfg RemoteConfig) (*Registry, error) {
	if cfg.TLS == nil {
		return nil, fmt.Errorf("registry %s: a TLS configuration is required: %w", cfg.Addr, errdefs.ErrInvalidArgument)
	}
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("registry address %q: want host:port: %w", cfg.Addr, errdefs.ErrInvalidArgument)
	}
	host, err := name.NewRegistry(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("registry address %q: %v: %w", cfg.Addr, err, errdefs.ErrInvalidArgument)
	}
	opts, tr, err := remotePullOptionsTLS(cfg.Pull, cfg.TLS)
	if err != nil {
		return nil, err
	}
	if len(cfg.Alternates) > 0 {
		tr.DialContext = (&failoverDialer{addr: cfg.Addr, addrs: append([]string{cfg.Addr}, cfg.Alternates...),
			dialer: tr.DialContext}).DialContext
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	r := &Registry{
		log: log, addr: cfg.Addr, host: host, creds: Credentials{Pull: cfg.Pull},
		transport: tr, roundTripper: httpsOnly{tr}, remotePull: opts,
	}
	if cfg.Generation != nil {
		r.fresh = fresh.New(tr, cfg.Generation)
		r.roundTripper = httpsOnly{r.fresh}
		r.remotePull = []remote.Option{remote.WithTransport(r.roundTripper), remote.WithAuth(cfg.Pull.Authenticator())}
		opts = r.remotePull
	}
	r.puller, err = remote.NewPuller(opts...)
	if err != nil {
		return nil, fmt.Errorf("registry client: %w", err)
	}
	return r, nil
}

// IsRemote says whether r is a client of another chalkd's registry (NewRemote).
func (r *Registry) IsRemote() bool { return r.app == nil }

// checkLocal refuses what only an embedded registry does.
func (r *Registry) checkLocal(what string) error {
	if r.app != nil {
		return nil
	}
	return fmt.Errorf("registry %s: %s needs the control plane's registry, not a node's pull-only view of it: %w", r.addr, what, errdefs.ErrFailedPrecondition)
}

// closeRemote releases a remote registry's connections.
func (r *Registry) closeRemote() {
	r.transport.CloseIdleConnections()
	if r.fresh != nil {
		r.fresh.CloseIdleConnections()
	}
}

// closeExtra stops the listeners ServeTLS added.
func (r *Registry) closeExtra(ctx context.Context) error {
	r.connMu.Lock()
	extra := r.extra
	r.extra = nil
	r.connMu.Unlock()
	var errs []error
	for _, s := range extra {
		if err := s.Shutdown(ctx); err != nil {
			errs = append(errs, err, s.Close())
		}
	}
	return errors.Join(errs...)
}
