// Package builder executes image specs (package images) into images in the
// embedded registry, one cached image per step.
//
// Every step's result is tagged in the registry with its cache key
// (Repository:<key hex>), so a build starts from the longest cached prefix of
// its key chain: a spec whose hash exists returns at once, and changing the
// last step rebuilds only that step. Config steps (ENV, WORKDIR, USER, CMD,
// ENTRYPOINT, LABEL, EXPOSE, ARG) change the image config only. COPY steps
// make a layer from uploaded content. RUN, pip_install and apt_install steps
// run under runc (go-runc) on an overlay whose lower dirs are the previous
// image's extracted layers (from the node cache); the overlay's upper dir
// becomes the layer. Layers are reproducible: entries sorted, mtimes clamped
// to SOURCE_DATE_EPOCH, no owner names. Concurrent builds of the same spec
// build once. A step fails as a whole: nothing is tagged for it.
//
// The builder needs root (overlay mounts, runc).
package builder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/images"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
)

// Version is the builder version hashed into every key. Bump it when what a
// step produces changes. (chalk-builder/1 was package imagebuild's: its
// images share Repository but never a key with this builder's.)
const Version = "chalk-builder/2"

// Repository is where step images are tagged, by the hex of their cache key,
// in the embedded registry (through Registry.LocalRef).
const Repository = "chalk.local/build"

// Registry resolves base references and names where images live. It is
// satisfied by *registry.Registry. If it also has a method
// RemoteOptions(ctx) []remote.Option, those options are used for every
// registry request (the embedded registry's transport).
type Registry interface {
	Resolve(ctx context.Context, ref string) (name.Reference, v1.Hash, error)
	LocalRef(ref string) (name.Reference, error)
}

// Layers makes an image's layers available extracted on this node. It is
// satisfied by *nodecache.Cache. If it also has a method
// Acquire(*nodecache.Image) func(), the builder holds the layers it runs on.
type Layers interface {
	Ensure(ctx context.Context, ref name.Reference, progress func(nodecache.Progress)) (*nodecache.Image, error)
}

// Network gives RUN steps network. Attach returns the path of a network
// namespace for the build container id, the resolv.conf to show in it, and
// detach to call when the step is done.
type Network interface {
	Attach(ctx context.Context, id string) (netnsPath string, resolvConf []byte, detach func(), err error)
}

// Blobs opens uploaded content (copy sources) by digest ("sha256:<hex>").
// A missing digest must give an error wrapping errdefs.ErrNotFound.
type Blobs interface {
	Open(ctx context.Context, digest string) (io.ReadCloser, error)
}

var (
	_ Registry = (*registry.Registry)(nil)
	_ Layers   = (*nodecache.Cache)(nil)
)

// Config wires a Builder. Registry and Layers are required; the rest has
// defaults.
type Config struct {
	Registry Registry
	Layers   Layers
	// Network gives RUN steps network; nil runs them in an empty network
	// namespace (loopback only, down).
	Network Network
	// Blobs serves copy sources; nil makes copy steps fail.
	Blobs Blobs
	// WorkDir holds per-step overlay dirs and bundles; default
	// $TMPDIR/chalk-build. It must not be on overlayfs.
	WorkDir string
	// RuncRoot is runc's state directory; default /run/chalk/build-runc.
	RuncRoot string
	// Runc is the runc binary; default "runc" from PATH.
	Runc string
	// Env is added to every RUN step's environment before the image's own
	// (e.g. PIP_INDEX_URL, PIP_TRUSTED_HOST, http_proxy). It is node
	// configuration: not part of any key.
	Env []string
	// Defaults resolves what specs leave open (debian_slim's version).
	Defaults images.Defaults
	// Platform is hashed into keys; default the registry's node platform,
	// e.g. "linux/amd64".
	Platform string
	// SourceDateEpoch is the time every layer entry's mtime is clamped to;
	// zero means $SOURCE_DATE_EPOCH, or the Unix epoch if unset.
	SourceDateEpoch time.Time
	// Logger receives the builder's logs; nil discards them.
	Logger *slog.Logger
}

// Event reports build progress. Steps are numbered from 1 in canonical
// order (a Dockerfile's instructions first). For each step there is one event
// with Cached set (it was found in the cache), or a start event, Line events
// with the step's output, and an event with Done set when it is built.
type Event struct {
	Step   int
	Kind   string
	Key    string
	Cached bool
	Line   string
	Done   bool
}

// Result is a built (or found) image.
type Result struct {
	// Ref is where the image lives in the embedded registry, by digest:
	// pullable, e.g. by nodecache.Ensure.
	Ref string
	// Digest is the image manifest digest.
	Digest string
	// Key is the image hash: the last key of the spec's chain.
	Key string
	// Cached is true if nothing was built.
	Cached bool
	// StepsBuilt counts the steps executed by this build (0 when cached).
	StepsBuilt int
	// Mounts are the spec's mount-strategy files (canonical), to bind at
	// sandbox start.
	Mounts []images.Mount
}

// Builder builds image specs. It is safe for concurrent use.
type Builder struct {
	cfg   Config
	log   *slog.Logger
	epoch time.Time
	runc  runcRunner

	mu       sync.Mutex
	flights  map[string]*flight
	inflight sync.WaitGroup // builds running (they outlive callers that left)
}

// New returns a Builder.
func New(cfg Config) (*Builder, error) {
	if cfg.Registry == nil || cfg.Layers == nil {
		return nil, fmt.Errorf("image builder: Registry and Layers are required: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Platform == "" {
		p := registry.Platform()
		cfg.Platform = p.OS + "/" + p.Architecture
		if p.Variant != "" {
			cfg.Platform += "/" + p.Variant
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = filepath.Join(os.TempDir(), "chalk-build")
	}
	if cfg.RuncRoot == "" {
		cfg.RuncRoot = "/run/chalk/build-runc"
	}
	if cfg.Runc == "" {
		cfg.Runc = "runc"
	}
	epoch := cfg.SourceDateEpoch
	if epoch.IsZero() {
		epoch = time.Unix(0, 0)
		if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("SOURCE_DATE_EPOCH %q: %w", s, errdefs.ErrInvalidArgument)
			}
			epoch = time.Unix(n, 0)
		}
	}
	for _, d := range []string{cfg.WorkDir, cfg.RuncRoot} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("image builder: %w", err)
		}
	}
	b := &Builder{cfg: cfg, log: cfg.Logger, epoch: epoch.UTC(), flights: map[string]*flight{}}
	b.runc = newRunc(cfg.Runc, cfg.RuncRoot)
	b.cleanupLeftovers(context.Background())
	return b, nil
}

func (b *Builder) remoteOptions(ctx context.Context) []remote.Option {
	if ro, ok := b.cfg.Registry.(interface {
		RemoteOptions(context.Context) []remote.Option
	}); ok {
		return ro.RemoteOptions(ctx)
	}
	return []remote.Option{remote.WithContext(ctx)}
}

// RefForKey returns where the image of a cache key (an image hash,
// "sha256:<hex>") is tagged in the embedded registry.
func (b *Builder) RefForKey(key string) (name.Reference, error) {
	hex, ok := strings.CutPrefix(key, "sha256:")
	if !ok || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
		return nil, fmt.Errorf("image hash %q: want sha256:<64 hex>: %w", key, errdefs.ErrInvalidArgument)
	}
	return b.cfg.Registry.LocalRef(Repository + ":" + hex)
}

// plan is a canonical spec with its keys and resolved base.
type plan struct {
	canon images.Spec
	keys  []string
	base  name.Digest // the base image by digest
}

// Plan canonicalises spec, resolves its base and computes its keys.
func (b *Builder) plan(ctx context.Context, spec images.Spec) (*plan, error) {
	canon, err := images.Canonical(spec, b.cfg.Defaults)
	if err != nil {
		return nil, err
	}
	ref, digest, err := b.cfg.Registry.Resolve(ctx, canon.Base)
	if err != nil {
		return nil, fmt.Errorf("base image %q: %w", canon.Base, err)
	}
	keys, err := images.Keys(canon, digest.String(), b.cfg.Platform, Version)
	if err != nil {
		return nil, err
	}
	return &plan{canon: canon, keys: keys, base: ref.Context().Digest(digest.String())}, nil
}

// Keys canonicalises spec and returns its key chain (keys[0] the base,
// the last the image hash) without looking anything up but the base.
func (b *Builder) Keys(ctx context.Context, spec images.Spec) ([]string, error) {
	p, err := b.plan(ctx, spec)
	if err != nil {
		return nil, err
	}
	return p.keys, nil
}

// lookupKey returns the digest ref of the image tagged with key, or ok=false
// if there is none.
func (b *Builder) lookupKey(ctx context.Context, key string) (name.Digest, bool, error) {
	ref, err := b.RefForKey(key)
	if err != nil {
		return name.Digest{}, false, err
	}
	desc, err := remote.Head(ref, b.remoteOptions(ctx)...)
	if err != nil {
		var terr *transport.Error
		if errors.As(err, &terr) && terr.StatusCode == 404 {
			return name.Digest{}, false, nil
		}
		return name.Digest{}, false, registry.WrapRemoteError(ref.String(), err)
	}
	return ref.Context().Digest(desc.Digest.String()), true, nil
}

// Lookup reports whether spec is already built, without building: the
// cache-hit check. It resolves the base (a moved tag changes the hash).
func (b *Builder) Lookup(ctx context.Context, spec images.Spec) (*Result, bool, error) {
	p, err := b.plan(ctx, spec)
	if err != nil {
		return nil, false, err
	}
	key := p.keys[len(p.keys)-1]
	d, ok, err := b.lookupKey(ctx, key)
	if err != nil || !ok {
		return nil, false, err
	}
	return &Result{Ref: d.String(), Digest: d.DigestStr(), Key: key, Cached: true, Mounts: p.canon.Mounts}, true, nil
}

// Build builds spec, or returns at once if its hash is in the registry.
// events (may be nil) receives progress; concurrent Builds of the same
// spec share one build and all receive its events from when they joined.
// A cancelled ctx stops waiting; the shared build stops when every caller
// waiting for it has gone. A failing RUN returns an error wrapping
// errdefs.ErrFailedPrecondition with the command, its exit code and the tail
// of its output.
func (b *Builder) Build(ctx context.Context, spec images.Spec, events func(Event)) (*Result, error) {
	if events == nil {
		events = func(Event) {}
	}
	p, err := b.plan(ctx, spec)
	if err != nil {
		return nil, err
	}
	key := p.keys[len(p.keys)-1]
	forced := false
	for _, st := range p.canon.Steps {
		forced = forced || st.Force
	}
	if !forced {
		if d, ok, err := b.lookupKey(ctx, key); err != nil {
			return nil, err
		} else if ok {
			for i, st := range p.canon.Steps {
				events(Event{Step: i + 1, Kind: st.Kind, Key: p.keys[i+1], Cached: true})
			}
			return &Result{Ref: d.String(), Digest: d.DigestStr(), Key: key, Cached: true, Mounts: p.canon.Mounts}, nil
		}
	}
	fkey := key
	if forced {
		fkey += "+force"
	}
	res, err := b.join(ctx, fkey, events, func(bctx context.Context, emit func(Event)) (*Result, error) {
		return b.build(bctx, p, emit)
	})
	if err != nil {
		return nil, err
	}
	out := *res
	out.Mounts = p.canon.Mounts
	return &out, nil
}

// flight is one build in progress that callers share.
type flight struct {
	done    chan struct{}
	res     *Result
	err     error
	cancel  context.CancelFunc
	waiters int
	subs    map[int]func(Event)
	nextSub int
}

// join runs fn once per key at a time; every caller gets its result.
func (b *Builder) join(ctx context.Context, key string, events func(Event), fn func(context.Context, func(Event)) (*Result, error)) (*Result, error) {
	b.mu.Lock()
	f, ok := b.flights[key]
	if !ok {
		bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel, subs: map[int]func(Event){}}
		b.flights[key] = f
		emit := func(e Event) {
			b.mu.Lock()
			subs := make([]func(Event), 0, len(f.subs))
			for _, s := range f.subs {
				subs = append(subs, s)
			}
			b.mu.Unlock()
			for _, s := range subs {
				s(e)
			}
		}
		b.inflight.Add(1)
		go func() {
			defer b.inflight.Done()
			res, err := fn(bctx, emit)
			b.mu.Lock()
			f.res, f.err = res, err
			delete(b.flights, key)
			b.mu.Unlock()
			cancel()
			close(f.done)
		}()
	}
	f.waiters++
	id := f.nextSub
	f.nextSub++
	f.subs[id] = events
	b.mu.Unlock()

	leave := func() {
		b.mu.Lock()
		delete(f.subs, id)
		f.waiters--
		if f.waiters == 0 {
			f.cancel()
		}
		b.mu.Unlock()
	}
	select {
	case <-f.done:
		leave()
		return f.res, f.err
	case <-ctx.Done():
		leave()
		return nil, fmt.Errorf("build: %w", ctxErr(ctx))
	}
}
