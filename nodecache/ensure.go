package nodecache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/errgroup"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/registry"
)

// maxParallelLayers bounds concurrent layer pulls of one image.
const maxParallelLayers = 3

// Ensure pulls (if needed) and extracts every layer of the image at ref and
// returns it. ref is a pullable reference, e.g. from registry.Resolve; for a
// multi-platform index the node platform's image is used.
//
// For a digest reference to a warm image Ensure does no I/O at all; a tag
// reference costs one manifest request to resolve the tag. Concurrent
// Ensures of the same image or of images sharing layers pull and extract
// each layer once. Each layer is extracted into a temporary directory,
// its diffID verified, and renamed into place, so a layer directory is
// either complete or absent. progress may be nil; it is called from one
// goroutine at a time.
//
// The layers returned may be removed by GC until Acquire is called.
func (c *Cache) Ensure(ctx context.Context, ref name.Reference, progress func(Progress)) (*Image, error) {
	p := newReporter(progress)
	p.report(Progress{Phase: "resolve"})
	if d, ok := ref.(name.Digest); ok {
		c.mu.Lock()
		md := d.DigestStr()
		if child, ok := c.idx.Platform[md]; ok {
			md = child
		}
		img := c.warmLocked(md, ref.String(), time.Now())
		c.mu.Unlock()
		if img != nil {
			p.report(Progress{Phase: "done"})
			return img, nil
		}
	}

	opts := c.remoteOptions(ctx)
	desc, err := remote.Get(ref, opts...)
	if err != nil {
		return nil, registry.WrapRemoteError(ref.String(), err)
	}
	manifestDigest := desc.Digest
	if desc.MediaType.IsIndex() {
		im, err := v1.ParseIndexManifest(bytesReader(desc.Manifest))
		if err != nil {
			return nil, fmt.Errorf("%s: index: %v: %w", ref, err, errdefs.ErrInvalidArgument)
		}
		child, err := registry.PickPlatform(im)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		manifestDigest = child.Digest
	} else if !desc.MediaType.IsImage() {
		return nil, fmt.Errorf("%s: unsupported manifest media type %s: %w", ref, desc.MediaType, errdefs.ErrInvalidArgument)
	}

	c.mu.Lock()
	if desc.Digest != manifestDigest && c.idx.Platform[desc.Digest.String()] != manifestDigest.String() {
		c.idx.Platform[desc.Digest.String()] = manifestDigest.String()
		c.dirty = true
	}
	img := c.warmLocked(manifestDigest.String(), ref.String(), time.Now())
	c.mu.Unlock()
	if img != nil {
		p.report(Progress{Phase: "done"})
		return img, nil
	}

	pullRef := ref.Context().Digest(manifestDigest.String())
	for {
		ran := false // set only if this caller's function runs
		ch := c.imageFlight.DoChan(manifestDigest.String(), func() (any, error) {
			ran = true
			return c.pull(ctx, pullRef, ref.String(), p)
		})
		var res singleResult
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("ensure %s: %w", ref, ctxErr(ctx))
		case r := <-ch:
			res = singleResult{r.Val, r.Err, !ran}
		}
		if res.err != nil {
			// The caller that ran the shared pull gave up; ours has not.
			if errors.Is(res.err, context.Canceled) && ctx.Err() == nil {
				continue
			}
			return nil, fmt.Errorf("ensure %s: %w", ref, res.err)
		}
		pulled := res.val.(int64)
		c.mu.Lock()
		img = c.warmLocked(manifestDigest.String(), ref.String(), time.Now())
		c.mu.Unlock()
		if img == nil {
			// GC removed a layer between the pull and now; pull again.
			continue
		}
		img.Warm = false
		if !res.shared {
			img.BytesPulled = pulled
		}
		p.report(Progress{Phase: "done", Current: img.BytesPulled, Total: img.BytesPulled})
		return img, nil
	}
}

type singleResult struct {
	val    any
	err    error
	shared bool
}

func (c *Cache) remoteOptions(ctx context.Context) []remote.Option {
	opts := append([]remote.Option{}, c.remote...)
	opts = append(opts, remote.WithContext(ctx), remote.WithPlatform(registry.Platform()))
	if c.puller != nil {
		// Reuses the registry ping and token per repository.
		opts = append(opts, remote.Reuse(c.puller))
	}
	return opts
}

// pull fetches the image at ref (a digest reference to an image manifest),
// extracts its missing layers and records it. It returns the blob bytes
// downloaded.
func (c *Cache) pull(ctx context.Context, ref name.Digest, userRef string, p *reporter) (int64, error) {
	img, err := remote.Image(ref, c.remoteOptions(ctx)...)
	if err != nil {
		return 0, registry.WrapRemoteError(ref.String(), err)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return 0, registry.WrapRemoteError(ref.String()+" config", err)
	}
	cf, err := v1.ParseConfigFile(bytesReader(rawCfg))
	if err != nil {
		return 0, fmt.Errorf("%s: config: %v: %w", ref, err, errdefs.ErrInvalidArgument)
	}
	m, err := img.Manifest()
	if err != nil {
		return 0, registry.WrapRemoteError(ref.String(), err)
	}
	if len(cf.RootFS.DiffIDs) != len(m.Layers) {
		return 0, fmt.Errorf("%s: %d layers but %d diffIDs: %w", ref, len(m.Layers), len(cf.RootFS.DiffIDs), errdefs.ErrInvalidArgument)
	}

	var (
		mu     sync.Mutex
		pulled int64
		done   int64
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(maxParallelLayers)
	for i, ld := range m.Layers {
		diffID := cf.RootFS.DiffIDs[i]
		g.Go(func() error {
			layer, err := img.LayerByDigest(ld.Digest)
			if len(ld.URLs) > 0 {
				// A foreign (non-distributable) layer names URLs, which
				// go-containerregistry falls back to when the registry
				// lacks the blob: a node fetches layers only from its
				// registry, so this one is read by digest alone.
				layer, err = remote.Layer(ref.Context().Digest(ld.Digest.String()), c.remoteOptions(gctx)...)
			}
			if err != nil {
				return registry.WrapRemoteError(ref.String()+" layer "+ld.Digest.String(), err)
			}
			n, err := c.ensureLayer(gctx, layer, ld, diffID, p)
			if err != nil {
				return err
			}
			mu.Lock()
			pulled += n
			done++
			d := done
			mu.Unlock()
			p.report(Progress{Phase: "extract", Layer: ld.Digest.String(), Current: d, Total: int64(len(m.Layers))})
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}

	diffIDs := make([]string, len(cf.RootFS.DiffIDs))
	for i, d := range cf.RootFS.DiffIDs {
		diffIDs[i] = d.String()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.idx.Images[ref.DigestStr()] = &imageRecord{Ref: userRef, Config: json.RawMessage(rawCfg), DiffIDs: diffIDs, config: cf}
	if err := c.persistLocked(); err != nil {
		return 0, err
	}
	c.log.Info("nodecache: image ready", "ref", userRef, "digest", ref.DigestStr(), "layers", len(diffIDs), "pulled", pulled)
	return pulled, nil
}

// ensureLayer makes sure the layer with diffID is extracted, doing the work
// once across concurrent callers. It returns the bytes it downloaded.
func (c *Cache) ensureLayer(ctx context.Context, layer v1.Layer, desc v1.Descriptor, diffID v1.Hash, p *reporter) (int64, error) {
	key := diffID.String()
	c.mu.Lock()
	if l, ok := c.idx.Layers[key]; ok {
		l.LastUsed = time.Now().UnixNano()
		c.mu.Unlock()
		return 0, nil
	}
	c.mu.Unlock()
	for {
		ran := false
		ch := c.layerFlight.DoChan(key, func() (any, error) {
			ran = true
			c.mu.Lock()
			_, ok := c.idx.Layers[key]
			c.mu.Unlock()
			if ok {
				return int64(0), nil
			}
			return c.extractLayer(ctx, layer, desc, diffID, p)
		})
		// No select on ctx: the extraction watches its own ctx, and waiting
		// for it means a failed Ensure leaves no extraction running.
		r := <-ch
		if r.Err != nil {
			if errors.Is(r.Err, context.Canceled) && ctx.Err() == nil {
				continue
			}
			return 0, r.Err
		}
		if !ran {
			return 0, nil // another caller did the work
		}
		return r.Val.(int64), nil
	}
}

// extractLayer downloads the blob, storing it and extracting it in one pass,
// verifies both digests and moves the results into place.
func (c *Cache) extractLayer(ctx context.Context, layer v1.Layer, desc v1.Descriptor, diffID v1.Hash, p *reporter) (_ int64, err error) {
	start := time.Now()
	what := fmt.Sprintf("layer %s (diffID %s)", desc.Digest, diffID)
	work, err := os.MkdirTemp(c.tmpDir(), "layer-")
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	defer os.RemoveAll(work)
	fsDir := filepath.Join(work, "fs")
	if err := os.Mkdir(fsDir, 0o755); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	blob, err := os.Create(filepath.Join(work, "blob"))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	defer blob.Close()

	rc, err := layer.Compressed()
	if err != nil {
		return 0, registry.WrapRemoteError(what, err)
	}
	defer rc.Close()
	// rc verifies the blob digest when it reaches EOF.
	counted := &countingReader{r: rc, report: func(n int64) {
		p.report(Progress{Phase: "pull", Layer: desc.Digest.String(), Current: n, Total: desc.Size})
	}}
	src := io.TeeReader(counted, blob)
	ds, err := compression.DecompressStream(src)
	if err != nil {
		return 0, fmt.Errorf("%s: decompress: %v: %w", what, err, errdefs.ErrInvalidArgument)
	}
	defer ds.Close()
	h := sha256.New()
	tarStream := io.TeeReader(ds, h)
	diskBytes, err := archive.Apply(ctx, fsDir, tarStream, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout))
	if err != nil {
		if ctx.Err() != nil {
			return 0, fmt.Errorf("%s: %w", what, ctxErr(ctx))
		}
		return 0, fmt.Errorf("%s: extract: %v: %w", what, err, classifyStreamErr(err))
	}
	// The tar may end before the stream does (padding); hash all of it, and
	// read the blob to its end so its digest is verified.
	if _, err := io.Copy(io.Discard, tarStream); err != nil {
		return 0, fmt.Errorf("%s: %v: %w", what, err, classifyStreamErr(err))
	}
	if _, err := io.Copy(io.Discard, src); err != nil {
		return 0, fmt.Errorf("%s: %v: %w", what, err, classifyStreamErr(err))
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != diffID.String() {
		return 0, fmt.Errorf("%s: uncompressed content has digest %s: diffID mismatch: %w", what, got, errdefs.ErrInvalidArgument)
	}
	if err := blob.Sync(); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	if err := blob.Close(); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}

	dst := c.layerDir(diffID.String())
	if err := os.RemoveAll(dst); err != nil { // an unindexed leftover
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	if err := os.Rename(filepath.Join(work, "blob"), c.blobPath(desc.Digest.String())); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	if err := os.Rename(fsDir, dst); err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	rec := &layerRecord{Digest: desc.Digest.String(), DiffID: diffID.String(), Size: counted.n, DiskBytes: diskBytes, LastUsed: time.Now().UnixNano()}
	c.mu.Lock()
	c.idx.Layers[diffID.String()] = rec
	c.usage += rec.bytes()
	c.dirty = true
	c.mu.Unlock()
	c.extract.Add(1)
	c.log.Debug("nodecache: layer extracted", "digest", desc.Digest, "diff_id", diffID, "bytes", counted.n, "disk_bytes", diskBytes, "took", time.Since(start))
	return counted.n, nil
}

// classifyStreamErr classifies an error reading a layer stream: a digest
// mismatch or a corrupt archive is bad content, anything else is the
// registry or network.
func classifyStreamErr(err error) error {
	var te interface{ Temporary() bool }
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return errdefs.ErrDeadlineExceeded
	case errors.As(err, &te):
		return errdefs.ErrUnavailable
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errdefs.ErrUnavailable
	}
	return errdefs.ErrInvalidArgument
}

// countingReader counts bytes read and reports progress every MiB and at EOF.
type countingReader struct {
	r        io.Reader
	n        int64
	reported int64
	report   func(int64)
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	if c.n-c.reported >= 1<<20 || (err == io.EOF && c.n != c.reported) {
		c.reported = c.n
		c.report(c.n)
	}
	return n, err
}

// reporter serialises progress callbacks.
type reporter struct {
	mu sync.Mutex
	fn func(Progress)
}

func newReporter(fn func(Progress)) *reporter { return &reporter{fn: fn} }

func (r *reporter) report(p Progress) {
	if r.fn == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fn(p)
}

func ctxErr(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", errdefs.ErrDeadlineExceeded, ctx.Err())
	}
	return ctx.Err()
}
