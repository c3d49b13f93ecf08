// Package imagebuild executes image specs (package imagespec) into images in
// the embedded registry, one cached image per step: config steps change the
// config only; copy steps make a layer from uploaded content; run steps run
// under runc (through the sandbox runtime, with the same hardening as any
// sandbox) on an overlay of the previous layers, and the overlay's upper dir
// becomes the layer. Every step's image is tagged with its cache key, so a
// build starts from the longest cached prefix, and a spec whose hash exists is
// returned without building. The same layer code turns a frozen sandbox's
// upper dir into a snapshot image (snapshot.go).
package imagebuild

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagespec"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// Version is the builder version hashed into every key.
const Version = "chalk-builder/1"

// buildRepo is where step images are tagged (by cache key) in the registry.
const buildRepo = "chalk.local/build"

// Network gives run steps a network namespace.
type Network interface {
	Attach(ctx context.Context, id string) (Attachment, error)
}

// Attachment is a run step's network: its namespace, resolv.conf, the user
// namespace owning the network namespace (nil: none) and how to let it go.
type Attachment struct {
	NetnsPath  string
	ResolvConf []byte
	UserNS     *sandbox.UserNS
	Detach     func()
}

// Config wires a Builder.
type Config struct {
	Registry *registry.Registry
	Cache    *nodecache.Cache
	Runtime  *sandbox.Runtime
	Blobs    *Blobs
	Network  Network
	Env      []string // added to run steps (e.g. PIP_INDEX_URL); not hashed
	Defaults imagespec.Defaults
	Platform string // default linux/<arch> of the registry
	// MemoryMB is the memory limit of RUN steps, which their disk quota
	// (a tmpfs charged to it) equals; 0: none, and the runtime's default quota.
	MemoryMB int64
	Logger   *slog.Logger
}

// Builder builds image specs.
type Builder struct {
	cfg    Config
	log    *slog.Logger
	flight singleflight.Group
}

// New returns a Builder.
func New(cfg Config) (*Builder, error) {
	if cfg.Registry == nil || cfg.Cache == nil || cfg.Runtime == nil || cfg.Blobs == nil {
		return nil, fmt.Errorf("image builder: Registry, Cache, Runtime and Blobs are required: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Platform == "" {
		p := registry.Platform()
		cfg.Platform = p.OS + "/" + p.Architecture
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Builder{cfg: cfg, log: cfg.Logger}, nil
}

// Event reports build progress.
type Event struct {
	Step   int // 1-based; 0 for the base
	Kind   string
	Key    string
	Cached bool
	Line   string // a line of a run step's output
}

// Result is a built (or cached) image.
type Result struct {
	Ref        string // where it lives in the embedded registry (pullable)
	Hash       string // the spec's content hash
	Digest     string // manifest digest
	Cached     bool   // nothing was built
	StepsBuilt int
	Mounts     []imagespec.Mount
}

func (b *Builder) tagRef(key string) (name.Reference, error) {
	return b.cfg.Registry.LocalRef(buildRepo + ":" + strings.TrimPrefix(key, "sha256:"))
}

// RefForHash returns the pullable reference of a built image hash.
func (b *Builder) RefForHash(ctx context.Context, hash string) (string, bool) {
	ref, err := b.tagRef(hash)
	if err != nil {
		return "", false
	}
	if _, err := remote.Head(ref, b.cfg.Registry.RemoteOptions(ctx)...); err != nil {
		return "", false
	}
	return ref.String(), true
}

// Plan canonicalises spec and computes its keys (resolving the base).
func (b *Builder) Plan(ctx context.Context, spec imagespec.Spec) (*imagespec.Canonical, []string, name.Reference, error) {
	c, err := imagespec.Canonicalize(spec, b.cfg.Defaults)
	if err != nil {
		return nil, nil, nil, err
	}
	baseRef, baseDigest, err := b.cfg.Registry.Resolve(ctx, c.Base)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("base image %q: %w", c.Base, err)
	}
	return c, c.Keys(baseDigest.String(), b.cfg.Platform, Version), baseRef.Context().Digest(baseDigest.String()), nil
}

// Build builds spec (or finds it built). Concurrent builds of the same spec
// build once.
func (b *Builder) Build(ctx context.Context, spec imagespec.Spec, force bool, events func(Event)) (*Result, error) {
	if events == nil {
		events = func(Event) {}
	}
	c, keys, base, err := b.Plan(ctx, spec)
	if err != nil {
		return nil, err
	}
	final := keys[len(keys)-1]
	flightKey := final
	if force {
		flightKey += "+force"
	}
	v, err, _ := b.flight.Do(flightKey, func() (any, error) {
		return b.build(context.WithoutCancel(ctx), c, keys, base, force, events)
	})
	if err != nil {
		return nil, err
	}
	res := *v.(*Result)
	res.Mounts = c.Mounts
	return &res, nil
}

func (b *Builder) exists(ctx context.Context, key string) bool {
	ref, err := b.tagRef(key)
	if err != nil {
		return false
	}
	_, err = remote.Head(ref, b.cfg.Registry.RemoteOptions(ctx)...)
	return err == nil
}

func (b *Builder) build(ctx context.Context, c *imagespec.Canonical, keys []string, base name.Reference, force bool, events func(Event)) (*Result, error) {
	n := len(c.Steps)
	// The first step that must run: after the longest cached prefix, and no
	// later than the first forced step.
	limit := n
	if force {
		limit = -1
	}
	for i, f := range c.Force {
		if f && i < limit {
			limit = i
		}
	}
	start := 0 // steps [0,start) are cached; keys[start] exists
	for i := n; i >= 0; i-- {
		if i <= limit && b.exists(ctx, keys[i]) {
			start = i
			break
		}
		if i == 0 {
			start = -1
		}
	}
	opts := b.cfg.Registry.RemoteOptions(ctx)
	var img v1.Image
	var err error
	if start < 0 {
		if img, err = remote.Image(base, opts...); err != nil {
			return nil, fmt.Errorf("base image %s: %w", base, registry.WrapRemoteError("base image", err))
		}
		if img, err = b.push(ctx, keys[0], img, false); err != nil {
			return nil, err
		}
		start = 0
	} else {
		ref, _ := b.tagRef(keys[start])
		if img, err = remote.Image(ref, opts...); err != nil {
			return nil, fmt.Errorf("cached step image: %w", err)
		}
	}
	for i := 0; i < start; i++ {
		events(Event{Step: i + 1, Kind: c.Steps[i].Kind, Key: keys[i+1], Cached: true})
	}
	// Build args set by earlier (cached) steps still apply to later run steps.
	args := map[string]string{}
	for _, st := range c.Steps[:start] {
		if st.Kind == imagespec.KindArg && st.Value != nil {
			args[st.Name] = *st.Value
		}
	}
	built := 0
	for i := start; i < n; i++ {
		st := c.Steps[i]
		events(Event{Step: i + 1, Kind: st.Kind, Key: keys[i+1]})
		img, err = b.step(ctx, img, keys[i], st, args, func(line string) { events(Event{Step: i + 1, Kind: st.Kind, Line: line}) })
		if err != nil {
			return nil, fmt.Errorf("step %d (%s): %w", i+1, st.Kind, err)
		}
		// Steps from limit on are forced: what they push replaces the cache.
		if img, err = b.push(ctx, keys[i+1], img, i >= limit); err != nil {
			return nil, err
		}
		built++
	}
	final := keys[n]
	ref, err := b.tagRef(final)
	if err != nil {
		return nil, err
	}
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	return &Result{Ref: ref.String(), Hash: final, Digest: d.String(), Cached: built == 0, StepsBuilt: built}, nil
}

// push tags img as key and returns the image key names. Build cache tags
// are immutable in the registry: if key already names another image (a
// concurrent build of another spec with the same prefix wrote it first), that
// image is the cached one and is returned, unless replace (a forced step)
// says to delete the old tag and push img.
func (b *Builder) push(ctx context.Context, key string, img v1.Image, replace bool) (v1.Image, error) {
	ref, err := b.tagRef(key)
	if err != nil {
		return nil, err
	}
	opts := b.cfg.Registry.RemoteOptions(ctx)
	err = remote.Write(ref, img, opts...)
	if err == nil {
		return img, nil
	}
	err = registry.WrapRemoteError(ref.String(), err)
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		return nil, fmt.Errorf("push %s: %w", ref, err)
	}
	if !replace {
		b.log.Info("build cache key written meanwhile; using that image", "key", key)
		cached, err := remote.Image(ref, opts...)
		if err != nil {
			return nil, fmt.Errorf("cached step image %s: %w", ref, registry.WrapRemoteError(ref.String(), err))
		}
		return cached, nil
	}
	if err := remote.Delete(ref, opts...); err != nil && !errdefs.Is(registry.WrapRemoteError(ref.String(), err), errdefs.ErrNotFound) {
		return nil, fmt.Errorf("replace %s: %w", ref, registry.WrapRemoteError(ref.String(), err))
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		return nil, fmt.Errorf("push %s: %w", ref, registry.WrapRemoteError(ref.String(), err))
	}
	return img, nil
}

// step applies one step to img.
func (b *Builder) step(ctx context.Context, img v1.Image, prevKey string, st imagespec.Step, args map[string]string, logLine func(string)) (v1.Image, error) {
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cfg := &cf.Config
	// Variables in values take what was in force before this step (see expand.go).
	before := append([]string(nil), cfg.Env...)
	expand := func(v string) (string, error) {
		out, err := imagespec.ExpandVars(v, before, args)
		if err != nil {
			return "", fmt.Errorf("substitute variables: %w", err)
		}
		return out, nil
	}
	switch st.Kind {
	case imagespec.KindEnv:
		keys := make([]string, 0, len(st.Env))
		for k := range st.Env {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v, err := expand(st.Env[k])
			if err != nil {
				return nil, err
			}
			cfg.Env = setEnv(cfg.Env, k, v)
		}
	case imagespec.KindWorkdir:
		wd, err := expand(st.Path)
		if err != nil {
			return nil, err
		}
		if !strings.HasPrefix(wd, "/") {
			return nil, fmt.Errorf("workdir %q (%q once substituted) must be absolute: %w", st.Path, wd, errdefs.ErrInvalidArgument)
		}
		cfg.WorkingDir = path.Clean(wd)
	case imagespec.KindUser:
		u, err := expand(st.User)
		if err != nil {
			return nil, err
		}
		if !imagespec.ValidUser(u) {
			return nil, fmt.Errorf("user %q (%q once substituted): want name, uid, or user:group: %w", st.User, u, errdefs.ErrInvalidArgument)
		}
		cfg.User = u
	case imagespec.KindEntrypoint:
		cfg.Entrypoint = st.Argv
	case imagespec.KindCmd:
		cfg.Cmd = st.Argv
	case imagespec.KindLabel:
		if cfg.Labels == nil {
			cfg.Labels = map[string]string{}
		}
		for k, v := range st.Labels {
			if cfg.Labels[k], err = expand(v); err != nil {
				return nil, err
			}
		}
	case imagespec.KindExpose:
		if cfg.ExposedPorts == nil {
			cfg.ExposedPorts = map[string]struct{}{}
		}
		for _, p := range st.Ports {
			if !strings.Contains(p, "/") {
				p += "/tcp"
			}
			cfg.ExposedPorts[p] = struct{}{}
		}
	case imagespec.KindArg:
		if st.Value != nil {
			args[st.Name] = *st.Value
		}
		return img, nil
	case imagespec.KindCopy:
		rc, err := b.cfg.Blobs.Open(st.Src)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		var tarBytes []byte
		if len(st.Paths) > 0 { // a Dockerfile's COPY/ADD: its destination takes variables
			dst, xerr := expand(st.Dst)
			if xerr != nil {
				return nil, xerr
			}
			if !strings.HasPrefix(dst, "/") {
				return nil, fmt.Errorf("copy destination %q (%q once substituted) must be absolute: %w", st.Dst, dst, errdefs.ErrInvalidArgument)
			}
			tarBytes, err = contextLayer(rc, st.Paths, dst)
		} else {
			tarBytes, err = copyLayer(rc, st.Dst, st.IsDir, st.Mode)
		}
		if err != nil {
			return nil, fmt.Errorf("copy to %s: %v: %w", st.Dst, err, errdefs.ErrInvalidArgument)
		}
		return appendLayer(img, tarBytes, "COPY "+st.Src+" "+st.Dst)
	default:
		if imagespec.Executes(st.Kind) {
			tarBytes, err := b.run(ctx, prevKey, cfg, imagespec.ShellCommand(st), args, logLine)
			if err != nil {
				return nil, err
			}
			return appendLayer(img, tarBytes, "RUN "+imagespec.ShellCommand(st))
		}
		return nil, fmt.Errorf("step kind %q: %w", st.Kind, errdefs.ErrInvalidArgument)
	}
	return mutate.ConfigFile(img, cf)
}

func setEnv(env []string, k, v string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if name, _, _ := strings.Cut(kv, "="); name != k {
			out = append(out, kv)
		}
	}
	return append(out, k+"="+v)
}

func appendLayer(img v1.Image, tarBytes []byte, createdBy string) (v1.Image, error) {
	l, err := layerFromBytes(tarBytes)
	if err != nil {
		return nil, err
	}
	return appendLayerOf(img, l, createdBy)
}

func appendLayerOf(img v1.Image, l v1.Layer, createdBy string) (v1.Image, error) {
	return mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{CreatedBy: createdBy, Created: v1.Time{Time: epoch}}})
}

// run executes cmd in a build container over the image tagged prevKey and
// returns the layer of what it changed.
func (b *Builder) run(ctx context.Context, prevKey string, cfg *v1.Config, cmd string, args map[string]string, logLine func(string)) ([]byte, error) {
	ref, err := b.tagRef(prevKey)
	if err != nil {
		return nil, err
	}
	lower, err := b.cfg.Cache.Ensure(ctx, ref, nil)
	if err != nil {
		return nil, fmt.Errorf("prepare layers: %w", err)
	}
	release := b.cfg.Cache.Acquire(lower)
	defer release()
	idb := make([]byte, 6)
	_, _ = rand.Read(idb)
	id := "build-" + hex.EncodeToString(idb)
	spec := sandbox.Spec{
		ID: id, LowerDirs: lower.LowerDirs(), Entrypoint: []string{"/bin/sh", "-c", cmd},
		Workdir: cfg.WorkingDir, User: cfg.User, Pids: 4096,
		Memory: b.cfg.MemoryMB << 20, DiskMB: b.cfg.MemoryMB,
	}
	env := append([]string(nil), cfg.Env...)
	argNames := make([]string, 0, len(args))
	for k := range args {
		argNames = append(argNames, k)
	}
	sort.Strings(argNames)
	for _, k := range argNames {
		env = append(env, k+"="+args[k])
	}
	spec.Env = append(env, b.cfg.Env...)
	if b.cfg.Network != nil {
		att, err := b.cfg.Network.Attach(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("build network: %w", err)
		}
		defer att.Detach()
		spec.NetnsPath, spec.ResolvConf, spec.UserNS = att.NetnsPath, att.ResolvConf, att.UserNS
	}
	defer func() {
		if err := b.cfg.Runtime.Destroy(context.WithoutCancel(ctx), id); err != nil {
			b.log.Warn("remove build container", "id", id, "err", err)
		}
		_ = os.Remove(b.cfg.Runtime.LogPath(id))
		_ = os.Remove(b.cfg.Runtime.LogPath(id) + ".1")
	}()
	pid, err := b.cfg.Runtime.Start(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("start build container: %w", err)
	}
	done := make(chan struct{})
	var tailWG sync.WaitGroup
	tailWG.Add(1)
	var out tailBuf
	go func() {
		defer tailWG.Done()
		followLog(b.cfg.Runtime.LogPath(id), done, func(l string) { out.add(l); logLine(l) })
	}()
	ex, err := b.cfg.Runtime.Wait(ctx, id, pid)
	close(done)
	tailWG.Wait()
	if err != nil {
		return nil, err
	}
	if ex.Code != 0 || ex.Signal != "" {
		return nil, fmt.Errorf("command %q failed with exit code %d%s; last output:\n%s: %w", cmd, ex.Code, signalNote(ex), out.String(), errdefs.ErrFailedPrecondition)
	}
	var buf bytes.Buffer
	// Under a user namespace the upper dir holds host ids; the layer gets
	// the ids the build saw.
	var shift idShift
	if spec.UserNS != nil {
		shift = idShift{base: spec.UserNS.HostID, size: spec.UserNS.Size}
	}
	if err := diffUpper(b.cfg.Runtime.Dir(id)+"/upper", shift, &buf); err != nil {
		return nil, fmt.Errorf("layer of %q: %w", cmd, err)
	}
	return buf.Bytes(), nil
}

func signalNote(ex sandbox.Exit) string {
	if ex.OOM {
		return " (out of memory)"
	}
	if ex.Signal != "" {
		return " (" + ex.Signal + ")"
	}
	return ""
}

// tailBuf keeps the last 4 KiB of output.
type tailBuf struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuf) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, line...)
	t.b = append(t.b, '\n')
	if len(t.b) > 4096 {
		t.b = t.b[len(t.b)-4096:]
	}
}

func (t *tailBuf) String() string { t.mu.Lock(); defer t.mu.Unlock(); return string(t.b) }

// followLog calls fn for each line appended to path until done, then for the rest.
// maxLine bounds one line of build output handed to the callback.
const maxLine = 64 << 10

func followLog(path string, done <-chan struct{}, fn func(string)) {
	var f *os.File
	var pending []byte
	buf := make([]byte, 32<<10)
	flush := func(final bool) {
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			fn(string(pending[:i]))
			pending = pending[i+1:]
		}
		// A line is at most maxLine bytes: the build's output is not ours to buffer.
		if (final && len(pending) > 0) || len(pending) > maxLine {
			fn(string(pending))
			pending = nil
		}
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if f == nil {
			f, _ = os.Open(path)
		}
		if f != nil {
			for {
				n, err := f.Read(buf)
				pending = append(pending, buf[:n]...)
				if n == 0 || err != nil {
					break
				}
			}
			// chalk-init empties the log when it rotates it at its cap.
			if off, err := f.Seek(0, io.SeekCurrent); err == nil && off > 0 {
				if st, err := f.Stat(); err == nil && st.Size() < off {
					_, _ = f.Seek(0, io.SeekStart)
				}
			}
			flush(false)
		}
		select {
		case <-done:
			if f != nil {
				for {
					n, err := f.Read(buf)
					pending = append(pending, buf[:n]...)
					if n == 0 || errors.Is(err, io.EOF) || err != nil {
						break
					}
				}
				f.Close()
			}
			flush(true)
			return
		case <-tick.C:
		}
	}
}
