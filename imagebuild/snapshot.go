package imagebuild

import (
	"context"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// SnapshotRepo is where sandbox snapshots are tagged in the embedded
// registry, each by the hex of its own manifest digest: the tag is content
// addressed, so the same filesystem on the same image is the same reference.
const SnapshotRepo = "chalk.local/snapshot"

// SnapshotLayer writes the layer of a running sandbox's writable layer (its
// overlay upper dir) to a new temporary file in dir and returns its path.
// The caller must keep the sandbox frozen while it runs: the tree is hostile
// and must not change under the walk (which never follows a link, carries no
// device node, fifo or socket, and drops setuid/setgid bits). userns maps the
// upper's host ids back to the ids the sandbox saw (nil: none). exclude
// lists further paths (absolute, in the sandbox) left out, such as the
// destinations of bind mounts; chalkd's own mount points (/.chalk,
// /run/chalk, /etc/{hosts,hostname,resolv.conf}, /usr/local/bin/chalk) are
// always left out, whiteouts of them too.
func SnapshotLayer(upper string, userns *sandbox.UserNS, exclude []string, dir string) (string, error) {
	var shift idShift
	if userns != nil {
		shift = idShift{base: userns.HostID, size: userns.Size}
	}
	extra := map[string]bool{}
	for _, p := range exclude {
		if p = strings.TrimPrefix(path.Clean("/"+p), "/"); p != "" {
			extra[p] = true
		}
	}
	f, err := os.CreateTemp(dir, "snapshot-*.tar")
	if err != nil {
		return "", err
	}
	if err := diffUpperExcluding(upper, shift, extra, true, f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return "", fmt.Errorf("snapshot layer: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// SnapshotResult is a pushed snapshot image.
type SnapshotResult struct {
	Ref      string // user-facing: SnapshotRepo:<hex of Digest>
	LocalRef string // the same in the embedded registry (pullable)
	Digest   string // manifest digest
	DiffID   string // the snapshot layer's diff id
	Size     int64  // the snapshot layer's size (uncompressed tar)
}

// PushSnapshot appends the layer tar at layerPath to the image base (in the
// embedded registry) and pushes the result as SnapshotRepo:<hex digest>.
// The image config is base's, with one history entry more; created times
// are the layer epoch, so the digest depends only on base and the layer.
// progress (nil: none) is told bytes pushed of total.
func PushSnapshot(ctx context.Context, reg *registry.Registry, base name.Reference, layerPath string, progress func(cur, total int64)) (_ *SnapshotResult, err error) {
	opts := reg.RemoteOptions(ctx)
	img, err := remote.Image(base, opts...)
	if err != nil {
		return nil, fmt.Errorf("snapshot base image %s: %w", base, registry.WrapRemoteError("base image", err))
	}
	layer, err := tarball.LayerFromFile(layerPath)
	if err != nil {
		return nil, err
	}
	img, err = appendLayerOf(img, layer, "chalk snapshot")
	if err != nil {
		return nil, err
	}
	d, err := img.Digest()
	if err != nil {
		return nil, err
	}
	diffID, err := layer.DiffID()
	if err != nil {
		return nil, err
	}
	user := SnapshotRepo + ":" + d.Hex
	ref, err := reg.LocalRef(user)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(layerPath)
	if err != nil {
		return nil, err
	}
	if progress != nil {
		progress(0, st.Size())
		defer func() {
			if err == nil {
				progress(st.Size(), st.Size())
			}
		}()
		ch := make(chan v1.Update, 16)
		done := make(chan struct{})
		go func() {
			defer close(done)
			for u := range ch {
				progress(u.Complete, u.Total)
			}
		}()
		opts = append(opts, remote.WithProgress(ch))
		defer func() { <-done }()
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		return nil, fmt.Errorf("push snapshot %s: %w", ref, registry.WrapRemoteError(ref.String(), err))
	}
	return &SnapshotResult{Ref: user, LocalRef: ref.String(), Digest: d.String(), DiffID: diffID.String(), Size: st.Size()}, nil
}
