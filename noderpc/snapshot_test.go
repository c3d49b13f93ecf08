package noderpc

import (
	"bytes"
	"context"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
)

// TestRouterSnapshot: a snapshot through the router takes the layer from
// the sandbox's node over the node API (several chunks, progress passed
// on) and hands it, complete, to the control plane's push; without
// SetSnapshots it is refused; a stopped sandbox's comes from the node its
// teardown kept it on, while kept; a layer over the bound is cut off as
// resource exhausted and nothing is pushed.
func TestRouterSnapshot(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	r := newRouter(t, c)
	clk := useFakeClock(r, nil)
	if _, err := r.Start(ctx, node.StartRequest{ID: "sb", Slot: 1}); err != nil {
		t.Fatal(err)
	}
	req := node.SnapshotRequest{ID: "sb", Slot: 1, ImageRef: "10.0.0.1:7452/docker.io/library/busybox", ImageDigest: "sha256:b", Exclude: []string{"/m"}}
	if _, err := r.Snapshot(ctx, req); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("snapshot without SetSnapshots: %v, want failed precondition", err)
	}
	layer := bytes.Repeat([]byte("layer-bytes-"), 100_000) // 1.2 MB: several chunks
	a.fake.layer = layer
	var pushed []byte
	var pushedReq node.SnapshotRequest
	dir := t.TempDir()
	if err := r.SetSnapshots(dir, func(_ context.Context, req node.SnapshotRequest, path string) (*imagebuild.SnapshotResult, error) {
		pushedReq = req
		var err error
		pushed, err = os.ReadFile(path)
		return &imagebuild.SnapshotResult{Ref: "chalk.local/snapshot:x", Size: int64(len(pushed))}, err
	}); err != nil {
		t.Fatal(err)
	}
	var phases []string
	req.Progress = func(phase string, _, _ int64) { phases = append(phases, phase) }
	res, err := r.Snapshot(ctx, req)
	if err != nil || res.Ref != "chalk.local/snapshot:x" {
		t.Fatalf("snapshot: %+v %v", res, err)
	}
	if !bytes.Equal(pushed, layer) {
		t.Fatalf("pushed %d bytes, want the node's layer of %d", len(pushed), len(layer))
	}
	if pushedReq.ImageRef != req.ImageRef || pushedReq.ImageDigest != req.ImageDigest || !slices.Contains(phases, "freeze") {
		t.Fatalf("push got %+v, phases %v", pushedReq, phases)
	}
	if !slices.Contains(a.fake.calls, "SnapshotLayer sb 1 10.0.0.1:7452/docker.io/library/busybox sha256:b [/m]") {
		t.Fatalf("node calls %v", a.fake.calls)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("layer files left on the control plane: %v", ents)
	}
	// Stopped: taken from the node its teardown kept the layer on, while
	// it keeps it; a sandbox whose layer was not kept is refused.
	stopped := req
	stopped.Stopped = true
	if _, err := r.Snapshot(ctx, stopped); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("snapshot of a stopped sandbox never kept: %v, want failed precondition", err)
	}
	if _, err := r.Teardown("sb", 1, node.KeepUpper{For: time.Minute, MaxBytes: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	pushed = nil
	if _, err := r.Snapshot(ctx, stopped); err != nil || !bytes.Equal(pushed, layer) {
		t.Fatalf("snapshot of a stopped sandbox whose layer is kept: %v (%d bytes pushed)", err, len(pushed))
	}
	clk.Add(2 * time.Minute)
	if _, err := r.Snapshot(ctx, stopped); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("snapshot of a stopped sandbox past its keep: %v, want failed precondition", err)
	}
	clk.Add(-2 * time.Minute)
	// Over the bound: cut off.
	r.mu.Lock()
	m := r.members[a.id.ID]
	r.mu.Unlock()
	var buf bytes.Buffer
	if _, err := m.client.(layerSource).SnapshotLayer(ctx, req, &buf, int64(len(layer)-1)); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("a layer over the bound: %v, want resource exhausted", err)
	}
	if buf.Len() >= len(layer) {
		t.Fatalf("%d bytes taken past the bound", buf.Len())
	}
}
