package node

import (
	"context"
	"fmt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// SnapshotLayer takes the snapshot layer of running sandbox req.ID (frozen
// while it is taken, as Snapshot does) and returns the path of the layer
// tar, which the caller removes; nothing is pushed. A fleet node hands the
// layer to its control plane this way (noderpc: SnapshotLayer), which
// pushes the image with a credential the node never holds.
func (a *Agent) SnapshotLayer(ctx context.Context, req SnapshotRequest) (string, error) {
	if req.Stopped {
		return "", fmt.Errorf("sandbox %q: a stopped sandbox's layer is not kept on a fleet node: %w", req.ID, errdefs.ErrFailedPrecondition)
	}
	progress := req.Progress
	if progress == nil {
		progress = func(string, int64, int64) {}
	}
	return a.snapshotLayer(ctx, req, progress)
}
