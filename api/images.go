package api

import (
	"context"
	"fmt"
	"strings"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/store"
)

// BuildResult is a built (or cached) image spec.
type BuildResult struct {
	Ref        string // pullable reference in the embedded registry
	Hash       string // content hash of the spec
	Digest     string
	Mounts     []store.Mount
	Cached     bool
	StepsBuilt int
}

// ImageBackend builds image specs and stores uploaded file content.
type ImageBackend interface {
	Build(ctx context.Context, specJSON []byte, force bool, events func(*v1.ImageProgress)) (*BuildResult, error)
	// RefForHash returns where the image with content hash h lives, if built.
	RefForHash(ctx context.Context, h string) (string, bool)
	HasBlob(digest string) bool
	PutBlob(ctx context.Context, digest string, data []byte) error
}

// ImageStore lists and removes images in the registry.
type ImageStore interface {
	List(ctx context.Context) ([]*v1.Image, error)
	Inspect(ctx context.Context, ref string) (*v1.InspectImageResponse, error)
	Remove(ctx context.Context, ref string) error
}

type imageService struct{ s *Server }

var _ computev1connect.ImageServiceHandler = (*imageService)(nil)

func progressSender(stream *connect.ServerStream[v1.ImageProgress]) func(nodecache.Progress) {
	return func(p nodecache.Progress) {
		_ = stream.Send(&v1.ImageProgress{Phase: p.Phase, Layer: p.Layer, Current: p.Current, Total: p.Total})
	}
}

// ensure makes ref warm on the node and, with prestart set, sets how many
// sandboxes of it are kept pre-started and waits for them.
func (h *imageService) ensure(ctx context.Context, ref string, prestart *int32, stream *connect.ServerStream[v1.ImageProgress]) error {
	if _, err := user(ctx); err != nil {
		return err
	}
	if strings.TrimSpace(ref) == "" {
		return invalid("image: a reference is required")
	}
	if strings.HasPrefix(ref, "sha256:") && h.s.cfg.Images != nil {
		if r, ok := h.s.cfg.Images.RefForHash(ctx, ref); ok {
			ref = r
		}
	}
	if prestart != nil && *prestart < 0 {
		return invalid("sandboxes: %d: want 0 or more", *prestart)
	}
	img, err := h.s.node.EnsureImage(ctx, ref, progressSender(stream))
	if err != nil {
		return err
	}
	if prestart != nil {
		err := h.s.node.SetPrestarted(ctx, img, int(*prestart), func(ready, want int) {
			_ = stream.Send(&v1.ImageProgress{Phase: "prestart", Layer: img.Digest, Current: int64(ready), Total: int64(want)})
		})
		if err != nil {
			return err
		}
	}
	var size int64
	for _, l := range img.Layers {
		size += l.Size
	}
	return stream.Send(&v1.ImageProgress{Phase: "done", BytesPulled: img.BytesPulled,
		Image: &v1.Image{Ref: ref, Digest: img.Digest, Size: size, Warm: true, LocalRef: img.Ref}})
}

func (h *imageService) Pull(ctx context.Context, req *connect.Request[v1.PullImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	return h.ensure(ctx, req.Msg.Ref, nil, stream)
}

func (h *imageService) Warm(ctx context.Context, req *connect.Request[v1.WarmImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	return h.ensure(ctx, req.Msg.Image, req.Msg.Sandboxes, stream)
}

func (h *imageService) Build(ctx context.Context, req *connect.Request[v1.BuildImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	if _, err := user(ctx); err != nil {
		return err
	}
	if h.s.cfg.Images == nil {
		return fmt.Errorf("image builds are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	res, err := h.s.cfg.Images.Build(ctx, []byte(req.Msg.SpecJson), req.Msg.Force, func(p *v1.ImageProgress) { _ = stream.Send(p) })
	if err != nil {
		return err
	}
	return stream.Send(&v1.ImageProgress{Phase: "done", Cached: res.Cached, Step: int32(res.StepsBuilt),
		Image: &v1.Image{Ref: res.Hash, Digest: res.Digest, LocalRef: res.Ref}})
}

func (h *imageService) List(ctx context.Context, _ *connect.Request[v1.ListImagesRequest]) (*connect.Response[v1.ListImagesResponse], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	if h.s.cfg.ImageStore == nil {
		return nil, fmt.Errorf("image listing is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	imgs, err := h.s.cfg.ImageStore.List(ctx)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.ListImagesResponse{Images: imgs}), nil
}

func (h *imageService) Inspect(ctx context.Context, req *connect.Request[v1.InspectImageRequest]) (*connect.Response[v1.InspectImageResponse], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	if h.s.cfg.ImageStore == nil {
		return nil, fmt.Errorf("image inspection is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	ref := req.Msg.Ref
	if strings.HasPrefix(ref, "sha256:") && h.s.cfg.Images != nil {
		if r, ok := h.s.cfg.Images.RefForHash(ctx, ref); ok {
			ref = r
		}
	}
	out, err := h.s.cfg.ImageStore.Inspect(ctx, ref)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(out), nil
}

func (h *imageService) Remove(ctx context.Context, req *connect.Request[v1.RemoveImageRequest]) (*connect.Response[v1.RemoveImageResponse], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	if h.s.cfg.ImageStore == nil {
		return nil, fmt.Errorf("image removal is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	if err := h.s.cfg.ImageStore.Remove(ctx, req.Msg.Ref); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RemoveImageResponse{}), nil
}

func (h *imageService) HasBlobs(ctx context.Context, req *connect.Request[v1.HasBlobsRequest]) (*connect.Response[v1.HasBlobsResponse], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	if h.s.cfg.Images == nil {
		return nil, fmt.Errorf("uploads are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	out := &v1.HasBlobsResponse{}
	for _, d := range req.Msg.Digests {
		if !h.s.cfg.Images.HasBlob(d) {
			out.Missing = append(out.Missing, d)
		}
	}
	return connect.NewResponse(out), nil
}

func (h *imageService) UploadBlob(ctx context.Context, req *connect.Request[v1.UploadBlobRequest]) (*connect.Response[v1.UploadBlobResponse], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	if h.s.cfg.Images == nil {
		return nil, fmt.Errorf("uploads are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	if err := h.s.cfg.Images.PutBlob(ctx, req.Msg.Digest, req.Msg.Data); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.UploadBlobResponse{Digest: req.Msg.Digest, Size: int64(len(req.Msg.Data))}), nil
}
