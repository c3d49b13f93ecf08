package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/imagespec"
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
	// Release lets the upload GC remove the Mounts' content again (nil:
	// nothing held): a create calls it once its record (which refers to
	// them) exists, any other caller at once.
	Release func()
}

// ImageBackend builds image specs and stores uploaded file content.
type ImageBackend interface {
	Build(ctx context.Context, specJSON []byte, force bool, events func(*v1.ImageProgress)) (*BuildResult, error)
	// BaseDigest resolves the manifest digest of a spec's base image
	// ("": none to check), so that a build on another org's image (a
	// snapshot) is refused before it starts.
	BaseDigest(ctx context.Context, specJSON []byte) (string, error)
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
func (h *imageService) ensure(ctx context.Context, ref string, prestart *int32, nodes []string, warm bool, stream *connect.ServerStream[v1.ImageProgress]) error {
	p, err := user(ctx)
	if err != nil {
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
	if prestart != nil && !p.NodeAdmin {
		// The pools are the node's, shared by every org's creates.
		return fmt.Errorf("sandboxes: pre-started pools are node-wide; only the node admin sets them: %w", errdefs.ErrPermissionDenied)
	}
	if len(nodes) > 0 && h.s.cfg.Fleet == nil {
		return fmt.Errorf("nodes: this chalkd is not the control plane of a fleet (chalkd control): %w", errdefs.ErrInvalidArgument)
	}
	var img *nodecache.Image
	var fleet []*v1.NodeWarm
	if warm && h.s.cfg.Fleet != nil {
		// Every eligible node (or the named ones), each with its progress.
		res, err := h.s.cfg.Fleet.WarmImage(ctx, ref, nodes, func(node string, p nodecache.Progress) {
			_ = stream.Send(&v1.ImageProgress{Phase: p.Phase, Layer: p.Layer, Current: p.Current, Total: p.Total, Node: node})
		})
		if err != nil {
			return err
		}
		var errs []error
		for _, r := range res {
			nw := &v1.NodeWarm{Node: r.Name, Id: r.ID}
			if r.Err != nil {
				nw.Error = r.Err.Error()
				errs = append(errs, fmt.Errorf("node %s: %w", r.Name, r.Err))
			} else {
				nw.Digest, nw.BytesPulled = r.Image.Digest, r.Image.BytesPulled
				if img == nil {
					img = r.Image
				}
			}
			fleet = append(fleet, nw)
		}
		if img == nil {
			return errors.Join(errs...)
		}
	} else {
		var err error
		if img, err = h.s.node.EnsureImage(ctx, ref, progressSender(stream)); err != nil {
			return err
		}
	}
	// The same image by another name: its digest decides.
	if err := h.s.imageVisible(ctx, p.OrgID, img.Digest); err != nil {
		return fmt.Errorf("image %q: %w", ref, errdefs.ErrNotFound)
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
	return stream.Send(&v1.ImageProgress{Phase: "done", BytesPulled: img.BytesPulled, Nodes: fleet,
		Image: &v1.Image{Ref: ref, Digest: img.Digest, Size: size, Warm: true, LocalRef: img.Ref}})
}

func (h *imageService) Pull(ctx context.Context, req *connect.Request[v1.PullImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	return h.ensure(ctx, req.Msg.Ref, nil, nil, false, stream)
}

func (h *imageService) Warm(ctx context.Context, req *connect.Request[v1.WarmImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	return h.ensure(ctx, req.Msg.Image, req.Msg.Sandboxes, req.Msg.Nodes, true, stream)
}

func (h *imageService) Build(ctx context.Context, req *connect.Request[v1.BuildImageRequest], stream *connect.ServerStream[v1.ImageProgress]) error {
	p, err := user(ctx)
	if err != nil {
		return err
	}
	if h.s.cfg.Images == nil {
		return fmt.Errorf("image builds are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	if err := h.s.specVisible(ctx, p.OrgID, []byte(req.Msg.SpecJson)); err != nil {
		return err
	}
	res, err := h.s.cfg.Images.Build(ctx, []byte(req.Msg.SpecJson), req.Msg.Force, func(p *v1.ImageProgress) { _ = stream.Send(p) })
	if err != nil {
		return err
	}
	if res.Release != nil {
		res.Release() // no sandbox of this build yet: its mounts are held by none
	}
	// The built image is in this org's view (and, if another org built the
	// same content, in both: the blobs are shared, the views are not).
	if err := h.s.store.AddOrgImages(ctx, p.OrgID, res.Hash, res.Digest, res.Ref); err != nil {
		return err
	}
	setAuditObject(ctx, res.Hash)
	return stream.Send(&v1.ImageProgress{Phase: "done", Cached: res.Cached, Step: int32(res.StepsBuilt),
		Image: &v1.Image{Ref: res.Hash, Digest: res.Digest, LocalRef: res.Ref}})
}

// specVisible refuses a spec whose base image is not in org's view (another
// org's build or snapshot), or which reads uploaded content org did not
// upload itself (another org's file, known by its digest): not found, as
// for a create naming it.
func (s *Server) specVisible(ctx context.Context, org string, specJSON []byte) error {
	spec, err := imagespec.Parse(specJSON)
	if err != nil {
		return err
	}
	ups, err := spec.Uploads()
	if err != nil {
		return err
	}
	for _, u := range ups {
		mine, err := s.orgUploaded(ctx, org, u)
		if err != nil {
			return err
		}
		if !mine {
			return fmt.Errorf("uploaded content %s: not uploaded by this org (upload it first): %w", u, errdefs.ErrNotFound)
		}
	}
	d, err := s.cfg.Images.BaseDigest(ctx, specJSON)
	if err != nil || d == "" {
		return err
	}
	if err := s.imageVisible(ctx, org, d); err != nil {
		return fmt.Errorf("base image: %w", err)
	}
	return nil
}

// MaxHasBlobs bounds the digests of one HasBlobs call: each is a store
// query and a file's mtime set, and a request may be as large as the
// largest upload (MaxWriteFile: ~900,000 digests). An image spec names a
// few; the SDKs ask once per spec.
const MaxHasBlobs = 4096

// uploadRef is how an org's upload of content d is recorded in its view
// (store org_images; no image reference has this form).
func uploadRef(d string) string { return store.UploadRef(d) }

// orgUploaded says whether org uploaded content d (UploadBlob). Uploaded
// content is shared on disk across orgs but each org sees only what it
// uploaded itself: unlike images, content nobody recorded (uploaded before
// uploads were recorded) is no org's, and is uploaded again.
func (s *Server) orgUploaded(ctx context.Context, org, d string) (bool, error) {
	owners, err := s.store.ImageOwners(ctx, uploadRef(d))
	if err != nil {
		return false, err
	}
	return slices.Contains(owners, org), nil
}

func (h *imageService) List(ctx context.Context, _ *connect.Request[v1.ListImagesRequest]) (*connect.Response[v1.ListImagesResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.ImageStore == nil {
		return nil, fmt.Errorf("image listing is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	imgs, err := h.s.cfg.ImageStore.List(ctx)
	if err != nil {
		return nil, err
	}
	out := &v1.ListImagesResponse{}
	for _, img := range imgs {
		if h.s.imageVisible(ctx, p.OrgID, img.Digest) == nil && h.s.imageVisible(ctx, p.OrgID, img.Ref) == nil {
			out.Images = append(out.Images, img)
		}
	}
	return connect.NewResponse(out), nil
}

func (h *imageService) Inspect(ctx context.Context, req *connect.Request[v1.InspectImageRequest]) (*connect.Response[v1.InspectImageResponse], error) {
	p, err := user(ctx)
	if err != nil {
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
	if out.Image != nil && h.s.imageVisible(ctx, p.OrgID, out.Image.Digest) != nil {
		return nil, fmt.Errorf("image %q: %w", req.Msg.Ref, errdefs.ErrNotFound)
	}
	return connect.NewResponse(out), nil
}

// Remove takes an image out of the caller's org's view; the registry drops
// it when no org holds it any more. Images no org holds (seeded by the node,
// or from before teams) are shared: only the node admin removes them.
func (h *imageService) Remove(ctx context.Context, req *connect.Request[v1.RemoveImageRequest]) (*connect.Response[v1.RemoveImageResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.ImageStore == nil {
		return nil, fmt.Errorf("image removal is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	ref, iref := req.Msg.Ref, req.Msg.Ref
	if strings.HasPrefix(ref, "sha256:") && h.s.cfg.Images != nil {
		if r, ok := h.s.cfg.Images.RefForHash(ctx, ref); ok {
			iref = r
		}
	}
	in, err := h.s.cfg.ImageStore.Inspect(ctx, iref)
	if err != nil {
		return nil, err
	}
	digest := in.GetImage().GetDigest()
	owners, err := h.s.store.ImageOwners(ctx, digest)
	if err != nil {
		return nil, err
	}
	mine := false
	for _, o := range owners {
		mine = mine || o == p.OrgID
	}
	switch {
	case len(owners) > 0 && !mine:
		return nil, fmt.Errorf("image %q: %w", ref, errdefs.ErrNotFound)
	case len(owners) == 0 && !p.NodeAdmin:
		return nil, fmt.Errorf("image %q is shared by every org (seeded by the node); only the node admin removes it: %w", ref, errdefs.ErrPermissionDenied)
	}
	if mine {
		refs := []string{digest, ref, iref}
		if err := h.s.store.RemoveOrgImages(ctx, p.OrgID, refs...); err != nil {
			return nil, err
		}
		if len(owners) > 1 {
			return connect.NewResponse(&v1.RemoveImageResponse{}), nil // still in another org's view
		}
	}
	if err := h.s.cfg.ImageStore.Remove(ctx, ref); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RemoveImageResponse{}), nil
}

func (h *imageService) HasBlobs(ctx context.Context, req *connect.Request[v1.HasBlobsRequest]) (*connect.Response[v1.HasBlobsResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.Images == nil {
		return nil, fmt.Errorf("uploads are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	if n := len(req.Msg.Digests); n > MaxHasBlobs {
		return nil, invalid("has blobs: %d digests (at most %d, api.MaxHasBlobs)", n, MaxHasBlobs)
	}
	// Content another org uploaded is missing to this one (it is only
	// here once this org uploaded it too): HasBlobs is no oracle of other
	// orgs' files, and asking does not restart their content's grace.
	out := &v1.HasBlobsResponse{}
	for _, d := range req.Msg.Digests {
		mine, err := h.s.orgUploaded(ctx, p.OrgID, d)
		if err != nil {
			return nil, err
		}
		if !mine || !h.s.cfg.Images.HasBlob(d) {
			out.Missing = append(out.Missing, d)
		}
	}
	return connect.NewResponse(out), nil
}

func (h *imageService) UploadBlob(ctx context.Context, req *connect.Request[v1.UploadBlobRequest]) (*connect.Response[v1.UploadBlobResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.Images == nil {
		return nil, fmt.Errorf("uploads are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	// The content must hash to the digest (also when another org's copy is
	// here already): the org proved it has the content, so the content is
	// in its view from now on. Checked before anything is recorded.
	d, data := req.Msg.Digest, req.Msg.Data
	if sum := sha256.Sum256(data); d != "sha256:"+hex.EncodeToString(sum[:]) {
		return nil, invalid("upload of %q: content hashes to sha256:%x", d, sum)
	}
	// The org's upload budget is charged before the content is written
	// (counted one upload of the org at a time); a write that fails takes a
	// new record back.
	q, err := h.s.quotaOf(ctx, p.OrgID)
	if err != nil {
		return nil, err
	}
	added, err := h.s.store.AddOrgUpload(ctx, p.OrgID, d, int64(len(data)), q.MaxUploadBytes)
	if err != nil {
		return nil, err
	}
	// The content is written and the record made again under the upload
	// lock of the digest, which the upload GC (of any replica) holds from
	// its look at the content to its removal with every org's record of
	// it: content or a record it removed before the write is stored and
	// recorded again (no charge beyond the one just checked), and it
	// removes neither after it.
	err = h.s.store.CommitUpload(ctx, p.OrgID, d, int64(len(data)), func() error {
		return h.s.cfg.Images.PutBlob(ctx, d, data)
	})
	if err != nil {
		if added {
			if rerr := h.s.store.RemoveOrgImages(context.WithoutCancel(ctx), p.OrgID, uploadRef(d)); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return nil, err
	}
	return connect.NewResponse(&v1.UploadBlobResponse{Digest: req.Msg.Digest, Size: int64(len(req.Msg.Data))}), nil
}
