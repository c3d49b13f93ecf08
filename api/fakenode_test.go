package api

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// fakeNode is a Node that runs nothing: a started sandbox "runs" until it
// is destroyed. It lets the control plane (authorisation, quotas, the
// audit trail) be tested without root; the real node is tested in daemon/.
type fakeNode struct {
	mu      sync.Mutex
	digests map[string]string        // image ref -> digest (default: "sha256:d-" + ref)
	running map[string]chan struct{} // closed at Destroy
	paused  map[string]bool
}

var _ Node = (*fakeNode)(nil)

func newFakeNode() *fakeNode {
	return &fakeNode{digests: map[string]string{}, running: map[string]chan struct{}{}}
}

func (f *fakeNode) MaxSlot() int { return 200 }

func (f *fakeNode) EnsureImage(_ context.Context, ref string, _ func(nodecache.Progress)) (*nodecache.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.digests[ref]
	if !ok {
		d = "sha256:d-" + ref
	}
	return &nodecache.Image{Ref: ref, Digest: d, Warm: true}, nil
}

func (f *fakeNode) Start(_ context.Context, req node.StartRequest) (node.Started, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running[req.ID] = make(chan struct{})
	return node.Started{Pid: 4242}, nil
}

func (f *fakeNode) Wait(ctx context.Context, id string, _ int) (sandbox.Exit, error) {
	f.mu.Lock()
	ch := f.running[id]
	f.mu.Unlock()
	if ch == nil {
		return sandbox.Exit{Known: true}, nil
	}
	select {
	case <-ch:
		return sandbox.Exit{Code: 137, Signal: "SIGKILL", Known: true}, nil
	case <-ctx.Done():
		return sandbox.Exit{}, ctx.Err()
	}
}

func (f *fakeNode) Running(_ context.Context, id string) (int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.running[id]
	return 4242, ok
}

func (f *fakeNode) Destroy(_ context.Context, id string, _ int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if ch := f.running[id]; ch != nil {
		close(ch)
		delete(f.running, id)
	}
	return nil
}

func (f *fakeNode) Exec(context.Context, string, procapi.ExecRequest, io.Writer, io.Writer) (*procapi.Process, error) {
	return nil, errors.New("fake node: no exec")
}
func (f *fakeNode) Files(string) *procapi.Client { return nil }
func (f *fakeNode) Logs(string) (*os.File, *os.File, error) {
	return nil, nil, errdefs.ErrNotFound
}
func (f *fakeNode) Leftovers(context.Context, map[string]int) ([]string, error) { return nil, nil }
func (f *fakeNode) Adopt(string, string)                                        {}
func (f *fakeNode) Claim(node.StartRequest) (string, int, bool)                 { return "", 0, false }
func (f *fakeNode) Unclaim(string)                                              {}
func (f *fakeNode) ReapPool(context.Context, map[string]int) error              { return nil }
func (f *fakeNode) SetPrestarted(context.Context, *nodecache.Image, int, func(int, int)) error {
	return nil
}

func (f *fakeNode) SetPaused(_ context.Context, id string, paused bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running[id] == nil {
		return errdefs.ErrFailedPrecondition
	}
	if f.paused == nil {
		f.paused = map[string]bool{}
	}
	f.paused[id] = paused
	return nil
}

// Snapshot "pushes" an image whose digest depends on the sandbox's image
// only (the fake has no filesystem): digest "sha256:snap-" + image digest.
func (f *fakeNode) Snapshot(_ context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running[req.ID] == nil {
		return nil, errdefs.ErrFailedPrecondition
	}
	d := "sha256:snap-" + strings.TrimPrefix(req.ImageDigest, "sha256:")
	ref := imagebuild.SnapshotRepo + ":" + strings.TrimPrefix(d, "sha256:")
	f.digests[ref] = d
	return &imagebuild.SnapshotResult{Ref: ref, LocalRef: "local/" + ref, Digest: d}, nil
}

// fakeImages is an ImageStore and ImageBackend over a fixed set of images.
type fakeImages struct {
	mu     sync.Mutex
	images map[string]*v1.Image // by ref
	hashes map[string]string    // content hash -> ref
}

var (
	_ ImageStore   = (*fakeImages)(nil)
	_ ImageBackend = (*fakeImages)(nil)
)

func (f *fakeImages) List(context.Context) ([]*v1.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*v1.Image
	for _, i := range f.images {
		out = append(out, i)
	}
	return out, nil
}

func (f *fakeImages) Inspect(_ context.Context, ref string) (*v1.InspectImageResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := f.images[ref]
	if i == nil {
		return nil, errdefs.ErrNotFound
	}
	return &v1.InspectImageResponse{Image: i}, nil
}

func (f *fakeImages) Remove(_ context.Context, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.images[ref] == nil {
		return errdefs.ErrNotFound
	}
	delete(f.images, ref)
	return nil
}

func (f *fakeImages) Build(context.Context, []byte, bool, func(*v1.ImageProgress)) (*BuildResult, error) {
	return nil, errors.New("fake images: no builds")
}

func (f *fakeImages) BaseDigest(context.Context, []byte) (string, error) { return "", nil }

func (f *fakeImages) RefForHash(_ context.Context, h string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.hashes[h]
	return r, ok
}
func (f *fakeImages) HasBlob(string) bool                           { return false }
func (f *fakeImages) PutBlob(context.Context, string, []byte) error { return nil }
