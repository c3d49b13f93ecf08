package daemon

import (
	"context"
	"encoding/json"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/api"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
)

// imageStore serves image listing, inspection and removal from the embedded
// registry, marking which images are warm in the node cache.
type imageStore struct {
	reg   *registry.Registry
	cache *nodecache.Cache
}

var _ api.ImageStore = imageStore{}

func (s imageStore) List(ctx context.Context) ([]*v1.Image, error) {
	infos, err := s.reg.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]*v1.Image, 0, len(infos))
	for _, i := range infos {
		_, warm := s.cache.Lookup(i.Digest)
		out = append(out, &v1.Image{Ref: i.Ref, Digest: i.Digest, Size: i.Size, Warm: warm})
	}
	return out, nil
}

func (s imageStore) Inspect(ctx context.Context, ref string) (*v1.InspectImageResponse, error) {
	r, digest, err := s.reg.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	img, err := remote.Image(r, s.reg.RemoteOptions(ctx)...)
	if err != nil {
		return nil, err
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return nil, err
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return nil, err
	}
	var size int64
	if m, err := img.Manifest(); err == nil {
		for _, l := range m.Layers {
			size += l.Size
		}
	}
	_, warm := s.cache.Lookup(digest.String())
	var pretty json.RawMessage = cfg
	return &v1.InspectImageResponse{
		Image:        &v1.Image{Ref: ref, Digest: digest.String(), Size: size, Warm: warm, LocalRef: r.String()},
		ConfigJson:   string(pretty),
		ManifestJson: string(manifest),
	}, nil
}

func (s imageStore) Remove(ctx context.Context, ref string) error { return s.reg.Delete(ctx, ref) }
