package nodecache

import (
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Progress reports how an Ensure is going.
//
//   - "resolve": the reference is being resolved to a manifest (no counters).
//   - "pull": Layer (its compressed digest) has Current of Total compressed
//     bytes downloaded; the layer is extracted while it downloads.
//   - "extract": Layer finished extracting; Current of Total layers of the
//     image are now in the cache.
//   - "done": the image is ready; Current = Total = bytes pulled by this call.
type Progress struct {
	Phase          string
	Layer          string
	Current, Total int64
}

// Layer is one layer of an image in the cache.
type Layer struct {
	// Digest is the digest of the (usually compressed) blob, DiffID the
	// digest of the uncompressed tar.
	Digest, DiffID string
	// Size is the size of the blob as stored in the registry.
	Size int64
	// Dir is the extracted layer, overlay-ready: whiteouts are 0/0 character
	// devices and opaque directories carry trusted.overlay.opaque=y. It is
	// shared by every image with this layer and must not be written to.
	Dir string
}

// Image is an image whose layers are all extracted in the cache.
type Image struct {
	// Ref is the reference the image was ensured by.
	Ref string
	// Digest is the manifest digest (for a multi-platform index, of the
	// node platform's image).
	Digest string
	Config v1.ConfigFile
	// Layers are base first.
	Layers []Layer
	// Warm is true if nothing had to be pulled or extracted for this call.
	Warm bool
	// BytesPulled counts the blob bytes this call downloaded.
	BytesPulled int64
}

// LowerDirs returns the layer directories top-most first, as overlayfs'
// lowerdir= option wants them.
func (i *Image) LowerDirs() []string {
	out := make([]string, len(i.Layers))
	for k, l := range i.Layers {
		out[len(i.Layers)-1-k] = l.Dir
	}
	return out
}
