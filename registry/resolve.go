package registry

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"runtime"
	"strings"

	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Platform returns the platform this node runs: when a reference names a
// multi-platform index, Resolve (and nodecache) use this platform's image.
func Platform() v1.Platform { return v1.Platform{OS: "linux", Architecture: runtime.GOARCH} }

// dockerHubHost is how references to Docker Hub are keyed, both in the
// embedded registry's repository names and in Config.Upstreams.
const dockerHubHost = "docker.io"

// upstream is a parsed Config.Upstreams entry.
type upstream struct {
	registry name.Registry
	prefix   string // repository prefix from the URL path, "" or "a/b/"
}

func parseUpstreams(m map[string]string) (map[string]upstream, error) {
	out := make(map[string]upstream, len(m))
	for host, raw := range m {
		u, err := url.Parse(raw)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			return nil, fmt.Errorf("upstream %q for %s: want http(s)://host[:port][/prefix]: %w", raw, host, errdefs.ErrInvalidArgument)
		}
		var opts []name.Option
		if u.Scheme == "http" {
			opts = append(opts, name.Insecure)
		}
		reg, err := name.NewRegistry(u.Host, opts...)
		if err != nil {
			return nil, fmt.Errorf("upstream %q for %s: %v: %w", raw, host, err, errdefs.ErrInvalidArgument)
		}
		prefix := strings.Trim(u.Path, "/")
		if prefix != "" {
			prefix += "/"
		}
		out[normalizeHost(host)] = upstream{registry: reg, prefix: prefix}
	}
	return out, nil
}

// normalizeHost maps go-containerregistry's name for Docker Hub
// ("index.docker.io") to the conventional "docker.io".
func normalizeHost(h string) string {
	h = strings.ToLower(h)
	if h == name.DefaultRegistry || h == "registry-1.docker.io" {
		return dockerHubHost
	}
	return h
}

// parseRef parses a user image reference: "busybox", "python:3.11-slim",
// "ghcr.io/org/x:tag", "x@sha256:...".
func parseRef(ref string) (name.Reference, error) {
	if strings.TrimSpace(ref) != ref || ref == "" {
		return nil, fmt.Errorf("image reference %q: %w", ref, errdefs.ErrInvalidArgument)
	}
	// distribution's grammar is the stricter one (it rejects "a//b", which
	// go-containerregistry lets through); check against it first.
	if _, err := reference.ParseNormalizedNamed(ref); err != nil {
		return nil, fmt.Errorf("image reference %q: %v: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	r, err := name.ParseReference(ref, name.WeakValidation)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %v: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	return r, nil
}

// LocalRef returns where ref lives (or would live) in the embedded registry:
// "<addr>/<registry-host>/<path>" with ref's tag or digest. A reference that
// already points at the embedded registry is returned unchanged.
func (r *Registry) LocalRef(ref string) (name.Reference, error) {
	user, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	return r.localFor(user)
}

func (r *Registry) localFor(user name.Reference) (name.Reference, error) {
	if user.Context().RegistryStr() == r.addr {
		return withIdentifier(r.host.Repo(user.Context().RepositoryStr()), user)
	}
	// A port is not valid in a repository path component: "host:5000" is
	// stored as "host_5000".
	host := strings.ReplaceAll(normalizeHost(user.Context().RegistryStr()), ":", "_")
	repo, err := name.NewRepository(r.addr+"/"+host+"/"+user.Context().RepositoryStr(), name.Insecure)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %v: %w", user.String(), err, errdefs.ErrInvalidArgument)
	}
	return withIdentifier(repo, user)
}

func withIdentifier(repo name.Repository, like name.Reference) (name.Reference, error) {
	switch v := like.(type) {
	case name.Digest:
		return repo.Digest(v.DigestStr()), nil
	case name.Tag:
		return repo.Tag(v.TagStr()), nil
	default:
		return nil, fmt.Errorf("image reference %q: neither tag nor digest: %w", like.String(), errdefs.ErrInvalidArgument)
	}
}

// Resolve maps a user image reference to the reference to pull it from and
// the digest of the image manifest for this node's Platform (for a
// multi-platform index, the digest of the matching child, not of the index).
//
// If the image is in the embedded registry, its local reference is returned
// (with Config.CacheTags, from what an earlier Resolve found, while no
// write has come to the registry since).
// Otherwise, if Config.Upstreams has the reference's registry host, the image
// (for an index: the index and the Platform's image) is copied from the
// upstream into the embedded registry first. Otherwise the error wraps
// errdefs.ErrNotFound; a malformed reference gives errdefs.ErrInvalidArgument.
func (r *Registry) Resolve(ctx context.Context, ref string) (name.Reference, v1.Hash, error) {
	user, err := parseRef(ref)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	local, err := r.localFor(user)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	key := local.String()
	var gen uint64
	if r.tags != nil {
		if h, ok := r.tags.get(key); ok {
			return local, h, nil
		}
		gen = r.tags.generation()
	}
	h, err := r.platformDigest(ctx, local, r.RemoteOptions(ctx))
	if err == nil {
		if r.tags != nil {
			r.tags.put(key, gen, h)
		}
		return local, h, nil
	}
	if !errdefs.Is(err, errdefs.ErrNotFound) {
		return nil, v1.Hash{}, fmt.Errorf("image %q: %w", ref, err)
	}
	host := normalizeHost(user.Context().RegistryStr())
	if r.IsRemote() {
		return nil, v1.Hash{}, fmt.Errorf("image %q: not in the control plane's registry (%s): %w", ref, r.addr, errdefs.ErrNotFound)
	}
	up, ok := r.upstreams[host]
	if !ok || user.Context().RegistryStr() == r.addr {
		return nil, v1.Hash{}, fmt.Errorf("image %q: not in the embedded registry and no upstream for %s: %w", ref, host, errdefs.ErrNotFound)
	}
	upRepo := up.registry.Repo(up.prefix + user.Context().RepositoryStr())
	upRef, err := withIdentifier(upRepo, user)
	if err != nil {
		return nil, v1.Hash{}, err
	}
	ch := r.pulls.DoChan(local.String(), func() (any, error) {
		return r.pullThrough(ctx, upRef, local)
	})
	select {
	case <-ctx.Done():
		return nil, v1.Hash{}, fmt.Errorf("image %q: %w", ref, ctxErr(ctx))
	case res := <-ch:
		if res.Err != nil {
			return nil, v1.Hash{}, fmt.Errorf("image %q: %w", ref, res.Err)
		}
		return local, res.Val.(v1.Hash), nil
	}
}

// pullThrough copies upRef into the embedded registry at local and returns
// the Platform image's manifest digest.
func (r *Registry) pullThrough(ctx context.Context, upRef, local name.Reference) (v1.Hash, error) {
	r.log.Info("pull-through", "upstream", upRef.String(), "local", local.String())
	upOpts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithPlatform(Platform()),
	}
	desc, err := remote.Get(upRef, upOpts...)
	if err != nil {
		return v1.Hash{}, WrapRemoteError("upstream "+upRef.String(), err)
	}
	localOpts := r.RemoteOptions(ctx)
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return v1.Hash{}, WrapRemoteError("upstream "+upRef.String(), err)
		}
		im, err := idx.IndexManifest()
		if err != nil {
			return v1.Hash{}, WrapRemoteError("upstream "+upRef.String(), err)
		}
		child, err := PickPlatform(im)
		if err != nil {
			return v1.Hash{}, fmt.Errorf("upstream %s: %w", upRef, err)
		}
		img, err := idx.Image(child.Digest)
		if err != nil {
			return v1.Hash{}, WrapRemoteError("upstream "+upRef.String(), err)
		}
		if err := remote.Write(local.Context().Digest(child.Digest.String()), img, localOpts...); err != nil {
			return v1.Hash{}, WrapRemoteError("cache "+local.String(), err)
		}
		// Only this platform's child is present; the registry is configured
		// to accept such partial indexes (see distributionConfig).
		if err := remote.Put(local, idx, localOpts...); err != nil {
			return v1.Hash{}, WrapRemoteError("cache "+local.String(), err)
		}
		return child.Digest, nil
	case desc.MediaType.IsImage():
		img, err := desc.Image()
		if err != nil {
			return v1.Hash{}, WrapRemoteError("upstream "+upRef.String(), err)
		}
		if err := remote.Write(local, img, localOpts...); err != nil {
			return v1.Hash{}, WrapRemoteError("cache "+local.String(), err)
		}
		return desc.Digest, nil
	default:
		return v1.Hash{}, fmt.Errorf("upstream %s: unsupported manifest media type %s: %w", upRef, desc.MediaType, errdefs.ErrInvalidArgument)
	}
}

// platformDigest returns the digest of the image manifest ref names for
// Platform.
func (r *Registry) platformDigest(ctx context.Context, ref name.Reference, opts []remote.Option) (v1.Hash, error) {
	desc, err := remote.Get(ref, opts...)
	if err != nil {
		return v1.Hash{}, WrapRemoteError(ref.String(), err)
	}
	return descPlatformDigest(desc)
}

func descPlatformDigest(desc *remote.Descriptor) (v1.Hash, error) {
	switch {
	case desc.MediaType.IsImage():
		return desc.Digest, nil
	case desc.MediaType.IsIndex():
		im, err := v1.ParseIndexManifest(strings.NewReader(string(desc.Manifest)))
		if err != nil {
			return v1.Hash{}, fmt.Errorf("index %s: %v: %w", desc.Digest, err, errdefs.ErrInvalidArgument)
		}
		child, err := PickPlatform(im)
		if err != nil {
			return v1.Hash{}, fmt.Errorf("index %s: %w", desc.Digest, err)
		}
		return child.Digest, nil
	default:
		return v1.Hash{}, fmt.Errorf("manifest %s: unsupported media type %s: %w", desc.Digest, desc.MediaType, errdefs.ErrInvalidArgument)
	}
}

// PickPlatform returns the first image in im for Platform().
func PickPlatform(im *v1.IndexManifest) (v1.Descriptor, error) {
	for _, d := range im.Manifests {
		if d.Platform != nil && d.MediaType.IsImage() && d.Platform.Satisfies(Platform()) {
			return d, nil
		}
	}
	return v1.Descriptor{}, fmt.Errorf("no image for platform %s: %w", Platform(), errdefs.ErrNotFound)
}

// WrapRemoteError classifies an error from go-containerregistry's remote
// package (HTTP status, registry error codes, network and context errors) as
// an errdefs class, keeping the original error in the chain. what names the
// object, e.g. a reference.
func WrapRemoteError(what string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w: %w", what, classify(err), err)
}

func classify(err error) error {
	var te *transport.Error
	if errors.As(err, &te) {
		if te.StatusCode == 409 {
			// The embedded registry's answer to moving an immutable tag.
			return errdefs.ErrAlreadyExists
		}
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return errdefs.ErrNotFound
			case transport.UnauthorizedErrorCode:
				return errdefs.ErrUnauthenticated
			case transport.DeniedErrorCode:
				return errdefs.ErrPermissionDenied
			case transport.TooManyRequestsErrorCode:
				return errdefs.ErrResourceExhausted
			case transport.NameInvalidErrorCode, transport.TagInvalidErrorCode, transport.DigestInvalidErrorCode,
				transport.ManifestInvalidErrorCode, transport.ManifestBlobUnknownErrorCode, transport.SizeInvalidErrorCode:
				return errdefs.ErrInvalidArgument
			}
		}
		switch {
		case te.StatusCode == 404:
			return errdefs.ErrNotFound
		case te.StatusCode == 401:
			return errdefs.ErrUnauthenticated
		case te.StatusCode == 403:
			return errdefs.ErrPermissionDenied
		case te.StatusCode == 429:
			return errdefs.ErrResourceExhausted
		case te.StatusCode >= 400 && te.StatusCode < 500:
			return errdefs.ErrInvalidArgument
		}
		return errdefs.ErrUnavailable
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return errdefs.ErrDeadlineExceeded
	case errors.Is(err, context.Canceled):
		return context.Canceled
	}
	// Network errors and anything else unexpected from a registry.
	return errdefs.ErrUnavailable
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", errdefs.ErrDeadlineExceeded, ctx.Err())
	}
	return ctx.Err()
}
