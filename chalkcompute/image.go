package chalkcompute

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Image describes an image: a base reference plus build steps. It is immutable:
// every method returns a new Image and never changes the receiver, so
// intermediate images can be shared and extended.
type Image struct {
	base          string
	pythonVersion string
	debianSlim    bool
	dockerfile    string
	steps         []map[string]any
	mounts        []map[string]any
	uploads       []upload
	raw           []byte // a spec given as JSON (FromSpec)
	err           error
}

// upload is local content the server needs before building or starting.
type upload struct {
	digest string
	data   []byte
}

// Base is an arbitrary OCI image reference ("busybox", "node:22-slim", "ghcr.io/org/image:tag").
func Base(ref string) *Image { return &Image{base: ref} }

// DebianSlim is python:<version>-slim-bookworm; with no version, the server's default.
func DebianSlim(pythonVersion ...string) *Image {
	img := &Image{debianSlim: true}
	if len(pythonVersion) > 0 {
		img.pythonVersion = pythonVersion[0]
	}
	return img
}

// Ref is the image's base reference ("" for DebianSlim without steps).
func (i *Image) Ref() string { return i.base }

// clone returns a copy whose slices the caller may append to without touching i.
func (i *Image) clone() *Image {
	c := *i
	c.steps = append([]map[string]any(nil), i.steps...)
	c.mounts = append([]map[string]any(nil), i.mounts...)
	c.uploads = append([]upload(nil), i.uploads...)
	return &c
}

// withStep returns a new image with one more step.
func (i *Image) withStep(step map[string]any) *Image {
	c := i.clone()
	c.steps = append(c.steps, step)
	return c
}

// plain reports whether the image is just a reference (nothing to build).
func (i *Image) plain() bool {
	return i.raw == nil && !i.debianSlim && i.dockerfile == "" && len(i.steps) == 0 && len(i.mounts) == 0
}

// Spec returns the JSON spec the server canonicalises and hashes.
func (i *Image) Spec() ([]byte, error) {
	if i.err != nil {
		return nil, i.err
	}
	if i.raw != nil {
		return i.raw, nil
	}
	spec := map[string]any{"steps": i.steps}
	if i.steps == nil {
		spec["steps"] = []any{}
	}
	if i.debianSlim {
		spec["debian_slim"] = true
		if i.pythonVersion != "" {
			spec["python_version"] = i.pythonVersion
		}
	} else if i.base != "" {
		spec["base"] = i.base
	}
	if i.dockerfile != "" {
		spec["dockerfile"] = i.dockerfile
	}
	if len(i.mounts) > 0 {
		spec["mounts"] = i.mounts
	}
	return json.Marshal(spec)
}

// apply fills the image part of a create request, uploading local content first.
func (i *Image) apply(ctx context.Context, c *Client, req *v1.CreateSandboxRequest) error {
	if i.err != nil {
		return i.err
	}
	if i.plain() {
		if i.base == "" {
			return fmt.Errorf("image: no base reference")
		}
		req.Image = i.base
		return nil
	}
	if err := c.uploadAll(ctx, i.uploads); err != nil {
		return err
	}
	spec, err := i.Spec()
	if err != nil {
		return err
	}
	req.ImageSpecJson = string(spec)
	return nil
}

// FromSpec is an image from a JSON spec as the SDKs send it (chalk compute image build --spec).
func FromSpec(spec []byte) *Image { return &Image{raw: append([]byte(nil), spec...)} }

// FromDockerfile parses an existing Dockerfile (server-side) and continues chaining on top.
func FromDockerfile(path string) *Image {
	b, err := os.ReadFile(path)
	if err != nil {
		return &Image{err: fmt.Errorf("from_dockerfile %s: %w", path, err)}
	}
	return &Image{dockerfile: string(b)}
}
