package chalkcompute

import (
	"context"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Progress is one progress report of a pull, warm or build.
type Progress = v1.ImageProgress

func drainProgress(stream *connect.ServerStreamForClient[v1.ImageProgress], progress func(*Progress)) (*v1.ImageProgress, error) {
	defer stream.Close()
	var last *v1.ImageProgress
	for stream.Receive() {
		last = stream.Msg()
		if progress != nil {
			progress(last)
		}
	}
	if err := stream.Err(); err != nil {
		return nil, fromConnect(err)
	}
	return last, nil
}

// PullImage pulls ref into the node cache, reporting progress.
func (c *Client) PullImage(ctx context.Context, ref string, progress func(*Progress)) (*v1.ImageProgress, error) {
	stream, err := c.images.Pull(ctx, connect.NewRequest(&v1.PullImageRequest{Ref: ref}))
	if err != nil {
		return nil, fromConnect(err)
	}
	return drainProgress(stream, progress)
}

// WarmOption modifies a WarmImage call.
type WarmOption func(*v1.WarmImageRequest)

// WithPrestarted keeps n sandboxes of the image pre-started on the node from
// now on (0: none), in place of the node's automatic count: creating a
// sandbox of it then claims one instead of starting a container. WarmImage
// returns once n are ready.
func WithPrestarted(n int) WarmOption {
	return func(r *v1.WarmImageRequest) { k := int32(n); r.Sandboxes = &k }
}

// OnNodes warms the image on these fleet nodes (names or ids) only; by
// default a fleet's control plane warms it on every healthy node in state
// ready. The final message's Nodes says how it went on each.
func OnNodes(nodes ...string) WarmOption {
	return func(r *v1.WarmImageRequest) { r.Nodes = append(r.Nodes, nodes...) }
}

// WarmImage makes an image (reference or image hash) warm on the node ahead of sandbox creation.
func (c *Client) WarmImage(ctx context.Context, image string, progress func(*Progress), opts ...WarmOption) (*v1.ImageProgress, error) {
	req := &v1.WarmImageRequest{Image: image}
	for _, o := range opts {
		o(req)
	}
	stream, err := c.images.Warm(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, fromConnect(err)
	}
	return drainProgress(stream, progress)
}

// BuildImage builds img (skipped when its content hash is already built),
// streaming build logs to progress. The final report's Image.Ref is the hash.
func (c *Client) BuildImage(ctx context.Context, img *Image, force bool, progress func(*Progress)) (*v1.ImageProgress, error) {
	spec, err := img.Spec()
	if err != nil {
		return nil, err
	}
	if err := checkSpec("spec_json", spec); err != nil {
		return nil, err // before any upload
	}
	if err := c.uploadAll(ctx, img.uploads); err != nil {
		return nil, err
	}
	stream, err := c.images.Build(ctx, connect.NewRequest(&v1.BuildImageRequest{SpecJson: string(spec), Force: force}))
	if err != nil {
		return nil, fromConnect(err)
	}
	return drainProgress(stream, progress)
}

// ListImages lists the images in the registry.
func (c *Client) ListImages(ctx context.Context) ([]*v1.Image, error) {
	resp, err := c.images.List(ctx, connect.NewRequest(&v1.ListImagesRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Images, nil
}

// InspectImage returns an image's manifest and config.
func (c *Client) InspectImage(ctx context.Context, ref string) (*v1.InspectImageResponse, error) {
	resp, err := c.images.Inspect(ctx, connect.NewRequest(&v1.InspectImageRequest{Ref: ref}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// RemoveImage removes an image from the registry.
func (c *Client) RemoveImage(ctx context.Context, ref string) error {
	_, err := c.images.Remove(ctx, connect.NewRequest(&v1.RemoveImageRequest{Ref: ref}))
	return err
}

// uploadAll uploads local content the server does not have yet.
func (c *Client) uploadAll(ctx context.Context, ups []upload) error {
	if len(ups) == 0 {
		return nil
	}
	digests := make([]string, 0, len(ups))
	for _, u := range ups {
		digests = append(digests, u.digest)
	}
	resp, err := c.images.HasBlobs(ctx, connect.NewRequest(&v1.HasBlobsRequest{Digests: digests}))
	if err != nil {
		return err
	}
	missing := map[string]bool{}
	for _, d := range resp.Msg.Missing {
		missing[d] = true
	}
	for _, u := range ups {
		if !missing[u.digest] {
			continue
		}
		if _, err := c.images.UploadBlob(ctx, connect.NewRequest(&v1.UploadBlobRequest{Digest: u.digest, Data: u.data})); err != nil {
			return err
		}
		delete(missing, u.digest)
	}
	return nil
}
