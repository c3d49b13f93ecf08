package node

import "context"

// SnapshotLayer takes the snapshot layer of sandbox req.ID (a running one
// frozen while it is taken; a stopped one's kept layer, as Snapshot does)
// and returns the path of the layer
// tar, which the caller removes; nothing is pushed. A fleet node hands the
// layer to its control plane this way (noderpc: SnapshotLayer), which
// pushes the image with a credential the node never holds.
func (a *Agent) SnapshotLayer(ctx context.Context, req SnapshotRequest) (string, error) {
	progress := req.Progress
	if progress == nil {
		progress = func(string, int64, int64) {}
	}
	return a.snapshotLayer(ctx, req, progress)
}
