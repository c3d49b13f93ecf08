package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/imagespec"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/untar"
)

// buildSlots is how many network slots at the top of the range are kept for
// build containers (the node's allocator hands out the others to sandboxes).
const buildSlots = 64

// images connects the builder and the blob store to the API.
type images struct {
	b     *imagebuild.Builder
	blobs *imagebuild.Blobs
	dir   string // extracted directory mounts
	mu    sync.Mutex
}

var _ api.ImageBackend = (*images)(nil)

func (im *images) Build(ctx context.Context, specJSON []byte, force bool, events func(*v1.ImageProgress)) (*api.BuildResult, error) {
	spec, err := imagespec.Parse(specJSON)
	if err != nil {
		return nil, err
	}
	var ev func(imagebuild.Event)
	if events != nil {
		ev = func(e imagebuild.Event) {
			events(&v1.ImageProgress{Phase: "build", Step: int32(e.Step), Layer: e.Kind, Cached: e.Cached, Line: e.Line})
		}
	}
	// The upload GC removes nothing the build reads (its copy sources that
	// are here: a cached step needs none) while it runs.
	var srcs []string
	for _, st := range spec.Steps {
		if st.Src != "" {
			srcs = append(srcs, st.Src)
		}
	}
	defer im.blobs.PinPresent(srcs...)()
	res, err := im.b.Build(ctx, spec, force, ev)
	if err != nil {
		return nil, err
	}
	out := &api.BuildResult{Ref: res.Ref, Hash: res.Hash, Digest: res.Digest, Cached: res.Cached, StepsBuilt: res.StepsBuilt}
	var mounts []string
	for _, m := range res.Mounts {
		if !im.blobs.Has(m.Src) {
			return nil, fmt.Errorf("mount %s: content %s was not uploaded: %w", m.Dst, m.Src, errdefs.ErrFailedPrecondition)
		}
		mounts = append(mounts, m.Src)
		out.Mounts = append(out.Mounts, store.Mount{Digest: m.Src, Dst: m.Dst, IsDir: m.IsDir})
	}
	// Held until the caller's sandbox record refers to them (Release); Pin
	// checks under the GC's lock that they are still here.
	release, err := im.blobs.Pin(mounts...)
	if err != nil {
		return nil, fmt.Errorf("mounts: %w", err)
	}
	out.Release = release
	return out, nil
}

func (im *images) BaseDigest(ctx context.Context, specJSON []byte) (string, error) {
	spec, err := imagespec.Parse(specJSON)
	if err != nil {
		return "", err
	}
	_, _, base, err := im.b.Plan(ctx, spec)
	if err != nil {
		return "", err
	}
	if d, ok := base.(name.Digest); ok {
		return d.DigestStr(), nil
	}
	return "", nil
}

func (im *images) RefForHash(ctx context.Context, h string) (string, bool) {
	return im.b.RefForHash(ctx, h)
}
func (im *images) HasBlob(d string) bool                               { return im.blobs.Touch(d) } // told it is here: its grace restarts
func (im *images) PutBlob(_ context.Context, d string, b []byte) error { return im.blobs.Put(d, b) }

// binds turns a sandbox's mount-strategy files into read-only bind mounts:
// files straight from the blob store, directories extracted once per digest.
func (im *images) binds(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
	for _, m := range sb.Mounts {
		src := im.blobs.Path(m.Digest)
		if m.IsDir {
			var err error
			if src, err = im.extracted(m.Digest); err != nil {
				return fmt.Errorf("mount %s: %w", m.Dst, err)
			}
		}
		req.Binds = append(req.Binds, sandbox.Bind{Source: src, Dest: m.Dst, ReadOnly: true})
	}
	return nil
}

// extracted returns the directory holding a directory upload's content.
func (im *images) extracted(digest string) (string, error) {
	if !im.blobs.Has(digest) { // also checks digest is sha256:<hex>
		return "", fmt.Errorf("directory content %s was not uploaded: %w", digest, errdefs.ErrFailedPrecondition)
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	dst := filepath.Join(im.dir, strings.TrimPrefix(digest, "sha256:"))
	if _, err := os.Stat(dst); err == nil {
		return dst, nil
	}
	rc, err := im.blobs.Open(digest)
	if err != nil {
		return "", err
	}
	defer rc.Close()
	tmp, err := os.MkdirTemp(im.dir, ".extract-*")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	// The archive is the API user's: untar confines every write to tmp.
	// A plain tar holds its files' bytes, so content larger than the blob
	// can only come from sparse entries: refused.
	lim := untar.Limits{}
	if st, err := os.Stat(im.blobs.Path(digest)); err == nil {
		lim.MaxBytes = min(st.Size(), untar.DefaultMaxBytes)
	}
	if err := untar.Extract(rc, tmp, lim); err != nil {
		return "", fmt.Errorf("directory content %s: %w", digest, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", err
	}
	return dst, nil
}

// buildNet gives build containers network namespaces from the build slots
// of the node's allocator (the top of the range, see node.Slots), with the
// host's resolvers (builds are not subject to sandbox policies).
type buildNet struct {
	net   *sandboxnet.Manager
	slots *node.Slots
}

var _ imagebuild.Network = (*buildNet)(nil)

func newBuildNet(n *sandboxnet.Manager, slots *node.Slots) *buildNet {
	return &buildNet{net: n, slots: slots}
}

func (bn *buildNet) Attach(ctx context.Context, id string) (imagebuild.Attachment, error) {
	slot, err := bn.slots.Take(node.SlotBuild, id)
	if err != nil {
		return imagebuild.Attachment{}, fmt.Errorf("too many concurrent builds (%d): %w", bn.slots.Size(node.SlotBuild), errdefs.ErrResourceExhausted)
	}
	release := func() {
		_ = bn.net.Teardown(context.WithoutCancel(ctx), id, slot)
		bn.net.Refill()
		bn.slots.Release(id)
	}
	n, err := bn.net.Setup(ctx, id, slot)
	if err != nil {
		release()
		return imagebuild.Attachment{}, err
	}
	return imagebuild.Attachment{NetnsPath: n.NetnsPath, ResolvConf: node.HostResolvConf(), UserNS: node.SandboxUserNS(n), Detach: release}, nil
}
