// Package registry embeds an OCI registry (distribution/distribution v3 with
// its filesystem storage driver) in chalkd and maps user image references to
// where they live in it.
//
// Images are stored under the repository "<registry-host>/<path>", so
// docker.io/library/busybox:latest lives at
// 127.0.0.1:PORT/docker.io/library/busybox:latest. Resolve finds an image
// there, or pulls it through from a configured upstream and caches it.
//
// Every request needs a credential (auth.go): the push credential for
// writes, the push or the read-only pull credential for reads. Tags are
// immutable once written (immutable.go).
package registry

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem" // the "filesystem" storage driver
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/fresh"
)

// Config configures an embedded registry. The zero value is not usable:
// RootDir is required.
type Config struct {
	// RootDir is the root of the filesystem storage driver.
	RootDir string
	// Addr is the listen address; default "127.0.0.1:0".
	Addr string
	// Logger receives the registry's logs (distribution's request logs at
	// debug level). nil discards them.
	Logger *slog.Logger
	// CredentialsFile is where the registry's credentials are kept (created
	// 0600 with random ones on first use; LoadOrCreateCredentials). "" gives
	// fresh random credentials that live as long as the Registry.
	CredentialsFile string
	// Upstreams maps a registry host (e.g. "docker.io", "nvcr.io") to an
	// upstream base URL for pull-through, e.g.
	// {"docker.io": "https://registry-1.docker.io"}. An http:// URL is
	// accessed without TLS.
	Upstreams map[string]string
	// TLSCertFile and TLSKeyFile, if set, make the registry serve HTTPS
	// with that certificate (PEM; the chain clients verify, naming the
	// address they dial). Needed whenever the registry is reached over the
	// network: clients then use RemotePullOptions (tls.go).
	TLSCertFile, TLSKeyFile string
	// CacheTags lets Resolve remember what a reference named (tagCache),
	// invalidated by every write that comes through this Registry's
	// listeners. Only for storage no other process writes: not for
	// control-plane replicas sharing RootDir.
	CacheTags bool
}

// Registry is an embedded OCI registry serving over HTTP on a local address
// (HTTPS with Config.TLSCertFile).
type Registry struct {
	cfg       Config
	log       *slog.Logger
	id        string
	addr      string
	host      name.Registry
	creds     Credentials
	app       *handlers.App
	oci       *ociHandler
	srv       *http.Server
	serveErr  chan error
	transport *http.Transport
	// fresh, for a remote registry given a Generation, carries its
	// requests over transport and the clones that replace it.
	fresh *fresh.Transport
	// roundTripper is transport, https only when the registry serves TLS.
	roundTripper http.RoundTripper
	puller       *remote.Puller
	pusher       *remote.Pusher
	upstreams    map[string]upstream
	pulls        singleflight.Group
	// tags is Resolve's cache (Config.CacheTags); nil: none.
	tags *tagCache

	closeOnce sync.Once
	closeErr  error

	connMu   sync.Mutex
	newConns map[net.Conn]struct{} // accepted, no request read yet
	extra    []*http.Server        // ServeTLS listeners

	// remotePull are the options of a remote registry (NewRemote): the pull
	// credential over HTTPS only. nil for an embedded registry.
	remotePull []remote.Option
}

// New starts an embedded registry storing its data under cfg.RootDir and
// serving on cfg.Addr. Close stops it.
func New(ctx context.Context, cfg Config) (*Registry, error) {
	if cfg.RootDir == "" {
		return nil, fmt.Errorf("registry: RootDir is required: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	ups, err := parseUpstreams(cfg.Upstreams)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.RootDir, 0o700); err != nil {
		return nil, fmt.Errorf("registry root %s: %w", cfg.RootDir, err)
	}
	// Not world-readable, also when an older version made it so.
	if err := os.Chmod(cfg.RootDir, 0o700); err != nil {
		return nil, fmt.Errorf("registry root %s: %w", cfg.RootDir, err)
	}
	var creds Credentials
	if cfg.CredentialsFile != "" {
		creds, err = LoadOrCreateCredentials(cfg.CredentialsFile)
	} else {
		creds, err = NewCredentials()
	}
	if err != nil {
		return nil, err
	}

	var idb [16]byte
	if _, err := rand.Read(idb[:]); err != nil {
		return nil, fmt.Errorf("registry: instance id: %w", err)
	}
	id := fmt.Sprintf("chalk-registry-%x", idb)
	installLogrusHook()
	registerLogger(id, log)

	// The App lives as long as the Registry, not as long as ctx: New's ctx
	// only bounds start-up.
	appCtx := instanceContext{Context: context.WithoutCancel(ctx), id: id}
	app, err := newApp(appCtx, distributionConfig(cfg.RootDir))
	if err != nil {
		unregisterLogger(id)
		return nil, err
	}

	var serverTLS *tls.Config
	if cfg.TLSCertFile != "" || cfg.TLSKeyFile != "" {
		if serverTLS, err = loadServerTLS(cfg.TLSCertFile, cfg.TLSKeyFile); err != nil {
			_ = app.Shutdown()
			unregisterLogger(id)
			return nil, err
		}
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", cfg.Addr)
	if err != nil {
		_ = app.Shutdown()
		unregisterLogger(id)
		return nil, fmt.Errorf("registry listen %s: %w", cfg.Addr, errdefs.ErrUnavailable)
	}
	addr := ln.Addr().String()
	var nameOpts []name.Option
	if serverTLS == nil {
		nameOpts = append(nameOpts, name.Insecure)
	}
	host, err := name.NewRegistry(addr, nameOpts...)
	if err != nil {
		_ = ln.Close()
		_ = app.Shutdown()
		unregisterLogger(id)
		return nil, fmt.Errorf("registry address %s: %w", addr, errdefs.ErrInvalidArgument)
	}

	oci := &ociHandler{next: app, log: log, dir: filepath.Join(cfg.RootDir, "chalk-oci"), os: Platform().OS, arch: Platform().Architecture}
	oci.maxReferrers.Store(defaultMaxReferrers)
	var tags *tagCache
	var inner http.Handler = &immutableTags{next: oci}
	if cfg.CacheTags {
		tags = newTagCache()
		inner = tags.watch(inner)
	}
	handler := &recoverHandler{next: newAuthHandler(creds, log, inner), log: log}
	r := &Registry{
		cfg:       cfg,
		log:       log,
		id:        id,
		addr:      addr,
		host:      host,
		creds:     creds,
		app:       app,
		oci:       oci,
		upstreams: ups,
		tags:      tags,
		serveErr:  make(chan error, 1),
		transport: &http.Transport{
			Proxy:               nil, // loopback: never through a proxy
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConns:        64,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		},
		srv: &http.Server{
			Handler:           handler,
			ReadHeaderTimeout: 30 * time.Second,
			BaseContext:       func(net.Listener) context.Context { return appCtx },
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
		newConns: map[net.Conn]struct{}{},
	}
	r.srv.ConnState = r.trackConn
	var rt http.RoundTripper = r.transport
	if serverTLS != nil {
		r.transport.TLSClientConfig = pinnedClientTLS(serverTLS.Certificates[0])
		rt = httpsOnly{r.transport}
		ln = tls.NewListener(ln, serverTLS)
	}
	r.roundTripper = rt
	own := []remote.Option{remote.WithTransport(rt), remote.WithAuth(creds.Push.Authenticator())}
	r.puller, err = remote.NewPuller(own...)
	if err == nil {
		r.pusher, err = remote.NewPusher(own...)
	}
	if err != nil {
		_ = ln.Close()
		_ = app.Shutdown()
		unregisterLogger(id)
		return nil, fmt.Errorf("registry client: %w", err)
	}
	go func() {
		err := r.srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		r.serveErr <- err
	}()
	log.Info("embedded registry serving", "addr", addr, "root", cfg.RootDir)
	return r, nil
}

// newApp builds the distribution App, turning its configuration panics into
// errors.
func newApp(ctx context.Context, c *configuration.Configuration) (app *handlers.App, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("registry configuration: %v: %w", p, errdefs.ErrInvalidArgument)
		}
	}()
	return handlers.NewApp(ctx, c), nil
}

func distributionConfig(root string) *configuration.Configuration {
	c := &configuration.Configuration{}
	c.Version = "0.1"
	// The defaults the YAML parser would fill in.
	c.Catalog.MaxEntries = 1000
	c.Tags.MaxTags = 1000
	c.Storage = configuration.Storage{
		"filesystem": configuration.Parameters{"rootdirectory": root},
		"delete":     configuration.Parameters{"enabled": true},
		"cache":      configuration.Parameters{"blobdescriptor": "inmemory"},
		// Blobs are served by the registry itself, never redirected.
		"redirect": configuration.Parameters{"disable": true},
	}
	var secret [32]byte
	_, _ = rand.Read(secret[:])
	c.HTTP.Secret = fmt.Sprintf("%x", secret)
	// distribution's check of an index's children panics on a child
	// without a platform (an index of indexes); ociHandler checks them
	// instead (only the node's platform and platform-less children must
	// exist: pull-through caches only the node's platform).
	c.Validation.Manifests.Indexes.Platforms = "none"
	// Foreign (non-distributable) layer URLs are accepted over https only;
	// distribution refuses every URL by default, with a 500. Nothing in
	// chalkd fetches them: see docs/SECURITY.md.
	c.Validation.Manifests.URLs.Allow = []string{"^https://"}
	return c
}

// Addr returns the address the registry serves on, e.g. "127.0.0.1:PORT".
func (r *Registry) Addr() string { return r.addr }

// Close stops serving and releases the registry's resources. Data on disk
// stays. Close is idempotent.
func (r *Registry) Close() error {
	r.closeOnce.Do(func() {
		r.transport.CloseIdleConnections()
		if r.app == nil {
			r.closeRemote()
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- r.srv.Shutdown(ctx) }()
		// http.Server.Shutdown waits up to 5s for connections on which no
		// request has arrived yet (clients dial spare connections); nothing
		// is lost by closing those now.
		r.closeNewConns()
		err := <-done
		if err != nil {
			err = errors.Join(err, r.srv.Close())
		}
		err = errors.Join(err, r.closeExtra(ctx))
		err = errors.Join(err, <-r.serveErr, r.app.Shutdown())
		r.transport.CloseIdleConnections()
		unregisterLogger(r.id)
		r.closeErr = err
	})
	return r.closeErr
}

func (r *Registry) trackConn(c net.Conn, s http.ConnState) {
	r.connMu.Lock()
	defer r.connMu.Unlock()
	if s == http.StateNew {
		r.newConns[c] = struct{}{}
	} else {
		delete(r.newConns, c)
	}
}

func (r *Registry) closeNewConns() {
	r.connMu.Lock()
	defer r.connMu.Unlock()
	for c := range r.newConns {
		_ = c.Close()
		delete(r.newConns, c)
	}
}

// RemoteOptions returns go-containerregistry options for talking to the
// embedded registry as chalkd (the push credential, its loopback transport,
// reused connections), with ctx.
func (r *Registry) RemoteOptions(ctx context.Context) []remote.Option {
	if r.app == nil {
		return []remote.Option{remote.WithContext(ctx), remote.Reuse(r.puller)}
	}
	return []remote.Option{remote.WithContext(ctx), remote.Reuse(r.puller), remote.Reuse(r.pusher)}
}

// PullOptions returns go-containerregistry options that read from the
// embedded registry with the read-only pull credential: what a node's image
// cache uses.
func (r *Registry) PullOptions() []remote.Option {
	if r.app == nil {
		return r.remotePull
	}
	opts := []remote.Option{remote.WithAuth(r.creds.Pull.Authenticator())}
	if r.cfg.TLSCertFile != "" {
		opts = append(opts, remote.WithTransport(r.roundTripper))
	}
	return opts
}

// Credentials returns the registry's credentials.
func (r *Registry) Credentials() Credentials { return r.creds }
