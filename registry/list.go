package registry

import (
	"bytes"
	"context"
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// ImageInfo describes one tagged image in the embedded registry.
type ImageInfo struct {
	// Ref is the user-facing reference, e.g. "docker.io/library/busybox:latest"
	// (the repository name in the embedded registry plus the tag).
	Ref string
	// Digest is the manifest digest of the image for this node's Platform
	// (the same digest Resolve returns).
	Digest string
	// Size is the manifest, config and (compressed) layer bytes of that image.
	Size int64
	// IndexDigest is the digest of the multi-platform index the tag points
	// at, or "" when it points at an image manifest.
	IndexDigest string
}

// List returns every tagged image in the embedded registry, found through
// the catalog and tags APIs, sorted by repository and tag.
func (r *Registry) List(ctx context.Context) ([]ImageInfo, error) {
	if err := r.checkLocal("listing images"); err != nil {
		return nil, err
	}
	opts := r.RemoteOptions(ctx)
	repos, err := remote.Catalog(ctx, r.host, opts...)
	if err != nil {
		return nil, WrapRemoteError("catalog", err)
	}
	var out []ImageInfo
	for _, repoName := range repos {
		repo := r.host.Repo(repoName)
		tags, err := remote.List(repo, opts...)
		if err != nil {
			if errdefs.Is(classify(err), errdefs.ErrNotFound) {
				continue // deleted meanwhile
			}
			return nil, WrapRemoteError("tags of "+repoName, err)
		}
		for _, tag := range tags {
			info, err := r.describe(ctx, repo.Tag(tag), opts)
			if errdefs.Is(err, errdefs.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			info.Ref = repoName + ":" + tag
			out = append(out, info)
		}
	}
	return out, nil
}

func (r *Registry) describe(ctx context.Context, ref name.Reference, opts []remote.Option) (ImageInfo, error) {
	desc, err := remote.Get(ref, opts...)
	if err != nil {
		return ImageInfo{}, WrapRemoteError(ref.String(), err)
	}
	var info ImageInfo
	manifest := desc.Manifest
	if desc.MediaType.IsIndex() {
		info.IndexDigest = desc.Digest.String()
		h, err := descPlatformDigest(desc)
		if err != nil {
			return ImageInfo{}, err
		}
		child, err := remote.Get(ref.Context().Digest(h.String()), opts...)
		if err != nil {
			return ImageInfo{}, WrapRemoteError(ref.String()+"@"+h.String(), err)
		}
		desc, manifest = child, child.Manifest
	}
	if !desc.MediaType.IsImage() {
		return ImageInfo{}, fmt.Errorf("%s: unsupported media type %s: %w", ref, desc.MediaType, errdefs.ErrInvalidArgument)
	}
	m, err := v1.ParseManifest(bytes.NewReader(manifest))
	if err != nil {
		return ImageInfo{}, fmt.Errorf("%s: manifest: %v: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	info.Digest = desc.Digest.String()
	info.Size = int64(len(manifest)) + m.Config.Size
	for _, l := range m.Layers {
		info.Size += l.Size
	}
	return info, nil
}

// Delete removes ref from the embedded registry. A tag reference removes
// only that tag; a digest reference removes the manifest and every tag that
// points at it. Blobs stay on disk until the registry is garbage collected.
// A reference that is not there gives errdefs.ErrNotFound.
func (r *Registry) Delete(ctx context.Context, ref string) error {
	if err := r.checkLocal("deleting an image"); err != nil {
		return err
	}
	local, err := r.LocalRef(ref)
	if err != nil {
		return err
	}
	if err := remote.Delete(local, r.RemoteOptions(ctx)...); err != nil {
		return fmt.Errorf("delete image %q: %w", ref, WrapRemoteError(local.String(), err))
	}
	r.log.Info("deleted image", "ref", ref, "local", local.String())
	return nil
}

// trimLocal strips the embedded registry's address from a reference string.
// UserRef is a reference to this registry ("<addr>/chalk.local/x:t") as
// any chalk registry client resolves it ("chalk.local/x:t"), wherever it
// reaches the registry: what a fleet's control plane hands its nodes.
func (r *Registry) UserRef(ref string) string { return r.trimLocal(ref) }

func (r *Registry) trimLocal(s string) string { return strings.TrimPrefix(s, r.addr+"/") }
