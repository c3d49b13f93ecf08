package daemon

import (
	"context"
	"fmt"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
)

// pushFleetSnapshot is the control plane's half of a snapshot in fleet mode
// (noderpc/snapshot.go): the node took the layer and streamed it here; the
// sandbox's image is this registry's (nodes pull every image from it), so
// the snapshot image is its image plus the layer, pushed here, with the
// credential no node holds.
func (d *Daemon) pushFleetSnapshot(ctx context.Context, req node.SnapshotRequest, layerPath string) (*imagebuild.SnapshotResult, error) {
	base, err := d.fleetBase(req.ImageRef, req.ImageDigest)
	if err != nil {
		return nil, fmt.Errorf("sandbox %q image: %w", req.ID, err)
	}
	res, err := imagebuild.PushSnapshot(ctx, d.Registry, base, layerPath, func(cur, total int64) {
		if req.Progress != nil {
			req.Progress("push", cur, total)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("sandbox %q snapshot: %w", req.ID, err)
	}
	return res, nil
}

// fleetBase is the image a node recorded as ref (its view of this
// registry: "<address as the node reaches it>/<repository>") at digest, in
// this registry: the same repository, by digest.
func (d *Daemon) fleetBase(ref, digest string) (name.Reference, error) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %v: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	if _, err := name.NewDigest("x@"+digest, name.Insecure); err != nil {
		return nil, fmt.Errorf("image digest %q: %v: %w", digest, err, errdefs.ErrInvalidArgument)
	}
	return d.Registry.LocalRef(d.Registry.Addr() + "/" + r.Context().RepositoryStr() + "@" + digest)
}
