package builder

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/images"
	"github.com/chalkcompute/chalkcompute/registry"
)

// build runs the steps of p that are not cached.
func (b *Builder) build(ctx context.Context, p *plan, emit func(Event)) (*Result, error) {
	steps := p.canon.Steps
	n := len(steps)
	// Steps from the first forced one on are rebuilt whatever the cache has.
	limit := n
	for i, st := range steps {
		if st.Force {
			limit = i
			break
		}
	}
	start, cur := 0, p.base
	for i := limit; i >= 1; i-- {
		d, ok, err := b.lookupKey(ctx, p.keys[i])
		if err != nil {
			return nil, err
		}
		if ok {
			start, cur = i, d
			break
		}
	}
	opts := b.remoteOptions(ctx)
	img, err := remote.Image(cur, opts...)
	if err != nil {
		return nil, registry.WrapRemoteError(cur.String(), err)
	}
	if n == 0 {
		// The image is the base: tag it with its key so the hash resolves.
		if cur, err = b.push(ctx, p.keys[0], img); err != nil {
			return nil, err
		}
		return &Result{Ref: cur.String(), Digest: cur.DigestStr(), Key: p.keys[0], Cached: true}, nil
	}
	for i := 0; i < start; i++ {
		emit(Event{Step: i + 1, Kind: steps[i].Kind, Key: p.keys[i+1], Cached: true})
	}
	// ARGs of earlier steps (cached or not) are in the environment of RUNs.
	args := map[string]string{}
	for _, st := range steps[:start] {
		setArg(args, st)
	}
	built := 0
	for i := start; i < n; i++ {
		st, key := steps[i], p.keys[i+1]
		emit(Event{Step: i + 1, Kind: st.Kind, Key: key})
		b.log.Debug("build step", "step", i+1, "kind", st.Kind, "key", key)
		next, cleanup, err := b.step(ctx, img, cur, st, args, func(line string) {
			emit(Event{Step: i + 1, Kind: st.Kind, Key: key, Line: line})
		})
		if err != nil {
			return nil, fmt.Errorf("step %d (%s): %w", i+1, describe(st), err)
		}
		d, err := b.push(ctx, key, next)
		cleanup()
		if err != nil {
			return nil, err
		}
		// Continue from the pushed image, so later steps reference
		// registry layers rather than local files.
		if img, err = remote.Image(d, opts...); err != nil {
			return nil, registry.WrapRemoteError(d.String(), err)
		}
		cur = d
		built++
		emit(Event{Step: i + 1, Kind: st.Kind, Key: key, Done: true})
	}
	return &Result{Ref: cur.String(), Digest: cur.DigestStr(), Key: p.keys[n], StepsBuilt: built, Cached: built == 0}, nil
}

// describe names a step in errors: its kind and what it runs or changes.
func describe(st images.Step) string {
	s := st.Kind
	switch {
	case images.Executes(st.Kind):
		s += " " + truncate(images.ShellCommand(st), 200)
	case st.Kind == images.KindCopy:
		s += " " + st.Src + " " + st.Dst
	}
	return s
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// push writes img and tags it with key; it returns the image by digest.
func (b *Builder) push(ctx context.Context, key string, img v1.Image) (name.Digest, error) {
	ref, err := b.RefForKey(key)
	if err != nil {
		return name.Digest{}, err
	}
	if err := remote.Write(ref, img, b.remoteOptions(ctx)...); err != nil {
		return name.Digest{}, fmt.Errorf("push %s: %w", ref, registry.WrapRemoteError(ref.String(), err))
	}
	d, err := img.Digest()
	if err != nil {
		return name.Digest{}, err
	}
	return ref.Context().Digest(d.String()), nil
}

func setArg(args map[string]string, st images.Step) {
	if st.Kind == images.KindArg {
		if st.Value != nil {
			args[st.Name] = *st.Value
		} else if _, ok := args[st.Name]; !ok {
			args[st.Name] = ""
		}
	}
}

// step applies one canonical step to img (whose digest ref is cur). cleanup
// removes local files the returned image still reads; call it after pushing.
func (b *Builder) step(ctx context.Context, img v1.Image, cur name.Digest, st images.Step, args map[string]string, line func(string)) (v1.Image, func(), error) {
	nop := func() {}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, nop, err
	}
	cf = cf.DeepCopy()
	cfg := &cf.Config
	createdBy := ""
	switch st.Kind {
	case images.KindEnv:
		for _, k := range slices.Sorted(maps.Keys(st.Env)) {
			cfg.Env = setEnv(cfg.Env, k, st.Env[k])
		}
		createdBy = "ENV " + strings.Join(envPairs(st.Env), " ")
	case images.KindWorkdir:
		cfg.WorkingDir = resolvePath(cfg.WorkingDir, st.Path)
		createdBy = "WORKDIR " + cfg.WorkingDir
	case images.KindUser:
		cfg.User = st.User
		createdBy = "USER " + st.User
	case images.KindEntrypoint:
		// As in a Dockerfile, setting the entrypoint clears an inherited CMD.
		cfg.Entrypoint, cfg.Cmd = slices.Clone(st.Argv), nil
		createdBy = fmt.Sprintf("ENTRYPOINT %q", st.Argv)
	case images.KindCmd:
		cfg.Cmd = slices.Clone(st.Argv)
		createdBy = fmt.Sprintf("CMD %q", st.Argv)
	case images.KindLabel:
		if cfg.Labels == nil {
			cfg.Labels = map[string]string{}
		}
		maps.Copy(cfg.Labels, st.Labels)
		createdBy = "LABEL " + strings.Join(envPairs(st.Labels), " ")
	case images.KindExpose:
		if cfg.ExposedPorts == nil {
			cfg.ExposedPorts = map[string]struct{}{}
		}
		for _, p := range st.Ports {
			if !strings.Contains(p, "/") {
				p += "/tcp"
			}
			cfg.ExposedPorts[p] = struct{}{}
		}
		createdBy = "EXPOSE " + strings.Join(st.Ports, " ")
	case images.KindArg:
		setArg(args, st)
		createdBy = "ARG " + st.Name
		if st.Value != nil {
			createdBy += "=" + *st.Value
		}
	case images.KindCopy:
		return b.copyStep(ctx, img, cfg.WorkingDir, st)
	default:
		if !images.Executes(st.Kind) {
			return nil, nop, fmt.Errorf("step kind %q: %w", st.Kind, errdefs.ErrInvalidArgument)
		}
		layerPath, err := b.run(ctx, cur, *cfg, images.ShellCommand(st), args, line)
		if err != nil {
			return nil, nop, err
		}
		cleanup := func() { _ = os.Remove(layerPath) }
		next, err := b.appendLayer(img, layerPath, "RUN /bin/sh -c "+images.ShellCommand(st))
		if err != nil {
			cleanup()
			return nil, nop, err
		}
		return next, cleanup, nil
	}
	cf.History = append(cf.History, v1.History{Created: v1.Time{Time: b.epoch}, CreatedBy: createdBy, EmptyLayer: true})
	cf.Created = v1.Time{Time: b.epoch}
	next, err := mutate.ConfigFile(img, cf)
	return next, nop, err
}

func (b *Builder) appendLayer(img v1.Image, layerPath, createdBy string) (v1.Image, error) {
	l, err := tarball.LayerFromFile(layerPath)
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	next, err := mutate.Append(img, mutate.Addendum{Layer: l, History: v1.History{Created: v1.Time{Time: b.epoch}, CreatedBy: createdBy}})
	if err != nil {
		return nil, err
	}
	cf, err := next.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Created = v1.Time{Time: b.epoch}
	return mutate.ConfigFile(next, cf)
}

// copyStep makes the layer of a copy step from uploaded content.
func (b *Builder) copyStep(ctx context.Context, img v1.Image, workdir string, st images.Step) (v1.Image, func(), error) {
	nop := func() {}
	if b.cfg.Blobs == nil {
		return nil, nop, fmt.Errorf("copy %s: no blob store configured: %w", st.Src, errdefs.ErrFailedPrecondition)
	}
	rc, err := b.cfg.Blobs.Open(ctx, st.Src)
	if err != nil {
		return nil, nop, fmt.Errorf("copy source %s: %w", st.Src, err)
	}
	defer rc.Close()
	dst := resolvePath(workdir, st.Dst)
	f, err := os.CreateTemp(b.cfg.WorkDir, "copy-*.tar")
	if err != nil {
		return nil, nop, err
	}
	cleanup := func() { _ = os.Remove(f.Name()) }
	err = writeCopyLayer(f, rc, dst, st.IsDir, st.Mode, b.epoch, b.cfg.WorkDir)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		cleanup()
		return nil, nop, fmt.Errorf("copy %s to %s: %w", st.Src, dst, err)
	}
	next, err := b.appendLayer(img, f.Name(), "COPY "+st.Src+" "+dst)
	if err != nil {
		cleanup()
		return nil, nop, err
	}
	return next, cleanup, nil
}

// resolvePath makes p absolute against the working directory wd ("" = /).
func resolvePath(wd, p string) string {
	if path.IsAbs(p) {
		return path.Clean(p)
	}
	if wd == "" {
		wd = "/"
	}
	return path.Join(wd, p)
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

func envPairs(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, k+"="+m[k])
	}
	return out
}
