package baseimage

import (
	"context"
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/registry"
)

// Seed pushes img to the embedded registry under ref (e.g.
// "docker.io/library/busybox:latest") and returns its manifest digest. It is
// idempotent: if ref already names img, nothing is uploaded. If ref names
// another image (say the host's busybox was upgraded), the tag is deleted
// first: tags in the embedded registry are immutable, and seeding is how an
// administrator replaces a base image on purpose.
func Seed(ctx context.Context, reg *registry.Registry, ref string, img v1.Image) (string, error) {
	local, err := reg.LocalRef(ref)
	if err != nil {
		return "", err
	}
	want, err := img.Digest()
	if err != nil {
		return "", fmt.Errorf("seed %s: digest: %w", ref, err)
	}
	opts := reg.RemoteOptions(ctx)
	if d, err := remote.Head(local, opts...); err == nil {
		if d.Digest == want {
			return want.String(), nil
		}
		if err := remote.Delete(local, opts...); err != nil {
			return "", fmt.Errorf("seed %s: replace %s: %w", ref, d.Digest, registry.WrapRemoteError(local.String(), err))
		}
	}
	if err := remote.Write(local, img, opts...); err != nil {
		return "", fmt.Errorf("seed %s: %w", ref, registry.WrapRemoteError(local.String(), err))
	}
	return want.String(), nil
}
