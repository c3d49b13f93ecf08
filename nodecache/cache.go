// Package nodecache is the per-node image cache: blobs by digest and
// extracted layers by diffID, shared across images. The extracted layer
// directories are the overlayfs lower dirs of sandboxes, so starting a
// sandbox from a warm image copies nothing.
//
// On disk, under Config.Root:
//
//	index.json                 what is cached (survives restarts)
//	blobs/sha256/<hex>         layer blobs as pulled
//	layers/sha256/<hex>/       extracted layers by diffID (overlay-ready)
//	tmp/                       extractions in progress (cleared at start)
package nodecache

import (
	"encoding/json"
	"errors"
	"fmt"

	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/registry"
)

// DefaultMaxBytes is the cache size GC trims to when Config.MaxBytes is 0.
const DefaultMaxBytes int64 = 20 << 30

const indexVersion = 1

// Config configures a Cache.
type Config struct {
	// Root is the cache directory. Keep it short: overlayfs limits the
	// length of its mount options, and every lower dir is
	// Root/layers/sha256/<64 hex>.
	Root string
	// MaxBytes is the size GC trims the cache to; 0 means DefaultMaxBytes.
	MaxBytes int64
	// Logger receives the cache's logs; nil discards them.
	Logger *slog.Logger
	// Remote are extra go-containerregistry options for pulls (for example
	// remote.WithAuthFromKeychain or remote.WithTransport).
	Remote []remote.Option
}

// Cache is a node's image cache. It is safe for concurrent use.
type Cache struct {
	root     string
	maxBytes int64
	log      *slog.Logger
	remote   []remote.Option
	puller   *remote.Puller

	imageFlight singleflight.Group
	layerFlight singleflight.Group

	mu      sync.Mutex
	idx     index
	inUse   map[string]int // diffID -> Acquire count
	dirty   bool           // last-use times changed since the index was written
	usage   int64
	extract atomic.Int64 // layers extracted by this process (tests)
}

// index is what index.json holds.
type index struct {
	Version int `json:"version"`
	// Images by manifest digest.
	Images map[string]*imageRecord `json:"images"`
	// Platform maps a multi-platform index digest to the digest of the
	// node platform's image in it.
	Platform map[string]string `json:"platform,omitempty"`
	// Layers by diffID.
	Layers map[string]*layerRecord `json:"layers"`
}

type imageRecord struct {
	Ref     string          `json:"ref"`
	Config  json.RawMessage `json:"config"`
	DiffIDs []string        `json:"diff_ids"`
	// config is Config parsed.
	config *v1.ConfigFile
}

type layerRecord struct {
	Digest    string `json:"digest"`
	DiffID    string `json:"diff_id"`
	Size      int64  `json:"size"`       // blob size
	DiskBytes int64  `json:"disk_bytes"` // extracted bytes
	LastUsed  int64  `json:"last_used"`  // unix nanoseconds
}

func (l *layerRecord) bytes() int64 { return l.Size + l.DiskBytes }

// New opens (or creates) the cache at cfg.Root and loads its index, so
// images ensured before a restart are warm. Leftovers of interrupted
// extractions are removed.
func New(cfg Config) (*Cache, error) {
	if cfg.Root == "" {
		return nil, fmt.Errorf("nodecache: Root is required: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.MaxBytes < 0 {
		return nil, fmt.Errorf("nodecache: MaxBytes %d: %w", cfg.MaxBytes, errdefs.ErrInvalidArgument)
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cache{
		root:     root,
		maxBytes: cfg.MaxBytes,
		log:      log,
		remote:   cfg.Remote,
		inUse:    map[string]int{},
	}
	if c.puller, err = remote.NewPuller(append(append([]remote.Option{}, cfg.Remote...), remote.WithPlatform(registry.Platform()))...); err != nil {
		return nil, fmt.Errorf("nodecache: remote options: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	// Layers hold other users' image content (and setuid files as the image
	// has them): the cache is chalkd's alone. Overlay reads the lower layers
	// with the mounter's credentials, so sandboxes need no access here.
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("nodecache: %w", err)
	}
	if err := os.Chmod(root, 0o700); err != nil {
		return nil, fmt.Errorf("nodecache: %w", err)
	}
	for _, d := range []string{c.tmpDir(), filepath.Join(root, "blobs", "sha256"), filepath.Join(root, "layers", "sha256")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("nodecache: %w", err)
		}
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Cache) tmpDir() string { return filepath.Join(c.root, "tmp") }
func (c *Cache) indexPath() string {
	return filepath.Join(c.root, "index.json")
}

func (c *Cache) layerDir(diffID string) string {
	return filepath.Join(c.root, "layers", "sha256", strings.TrimPrefix(diffID, "sha256:"))
}

func (c *Cache) blobPath(digest string) string {
	return filepath.Join(c.root, "blobs", "sha256", strings.TrimPrefix(digest, "sha256:"))
}

// load reads index.json, drops records whose files are gone, and removes
// files no record points to (an extraction that finished just before a
// crash, before the index was written) and tmp/ leftovers.
func (c *Cache) load() error {
	c.idx = index{Version: indexVersion, Images: map[string]*imageRecord{}, Platform: map[string]string{}, Layers: map[string]*layerRecord{}}
	b, err := os.ReadFile(c.indexPath())
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("nodecache index: %w", err)
	default:
		var idx index
		if err := json.Unmarshal(b, &idx); err != nil {
			c.log.Warn("nodecache: unreadable index, starting empty", "path", c.indexPath(), "err", err)
			break
		}
		if idx.Version != indexVersion {
			c.log.Warn("nodecache: index version changed, starting empty", "version", idx.Version)
			break
		}
		for k, l := range idx.Layers {
			if !isDigest(k) || l.DiffID != k || !isDigest(l.Digest) {
				continue
			}
			if fi, err := os.Stat(c.layerDir(k)); err != nil || !fi.IsDir() {
				continue
			}
			if _, err := os.Stat(c.blobPath(l.Digest)); err != nil {
				continue
			}
			c.idx.Layers[k] = l
		}
		for d, img := range idx.Images {
			var cf v1.ConfigFile
			if !isDigest(d) || json.Unmarshal(img.Config, &cf) != nil {
				continue
			}
			img.config = &cf
			c.idx.Images[d] = img
		}
		for k, v := range idx.Platform {
			if isDigest(k) && isDigest(v) {
				c.idx.Platform[k] = v
			}
		}
		c.dropBrokenImagesLocked()
	}

	// Remove what the index does not know.
	c.usage = 0
	blobs := map[string]bool{}
	for _, l := range c.idx.Layers {
		c.usage += l.bytes()
		blobs[strings.TrimPrefix(l.Digest, "sha256:")] = true
	}
	for _, sub := range []string{"layers", "blobs"} {
		dir := filepath.Join(c.root, sub, "sha256")
		ents, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("nodecache: %w", err)
		}
		for _, e := range ents {
			keep := blobs[e.Name()]
			if sub == "layers" {
				_, keep = c.idx.Layers["sha256:"+e.Name()]
			}
			if !keep {
				c.log.Info("nodecache: removing unindexed entry", "path", filepath.Join(dir, e.Name()))
				if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
					return fmt.Errorf("nodecache: %w", err)
				}
			}
		}
	}
	ents, err := os.ReadDir(c.tmpDir())
	if err != nil {
		return fmt.Errorf("nodecache: %w", err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(c.tmpDir(), e.Name())); err != nil {
			return fmt.Errorf("nodecache: %w", err)
		}
	}
	return c.persistLocked()
}

// dropBrokenImagesLocked forgets images that lack a layer.
func (c *Cache) dropBrokenImagesLocked() {
	for d, img := range c.idx.Images {
		for _, id := range img.DiffIDs {
			if _, ok := c.idx.Layers[id]; !ok {
				delete(c.idx.Images, d)
				break
			}
		}
	}
	for k, v := range c.idx.Platform {
		if _, ok := c.idx.Images[v]; !ok {
			delete(c.idx.Platform, k)
		}
	}
}

// persistLocked writes index.json atomically.
func (c *Cache) persistLocked() error {
	b, err := json.Marshal(&c.idx)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(c.root, ".index-*")
	if err != nil {
		return fmt.Errorf("nodecache index: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("nodecache index: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("nodecache index: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("nodecache index: %w", err)
	}
	if err := os.Rename(f.Name(), c.indexPath()); err != nil {
		return fmt.Errorf("nodecache index: %w", err)
	}
	c.dirty = false
	return nil
}

// Flush writes last-use times that changed since the index was last
// written (warm Ensures only update memory). Call it at shutdown.
func (c *Cache) Flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.dirty {
		return nil
	}
	return c.persistLocked()
}

// Lookup returns the image with manifest digest digest if it is warm (all
// its layers extracted).
func (c *Cache) Lookup(digest string) (*Image, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	img := c.warmLocked(digest, "", time.Now())
	return img, img != nil
}

// warmLocked returns the cached image with manifest digest d, or nil, and
// marks its layers used at now.
func (c *Cache) warmLocked(d, ref string, now time.Time) *Image {
	rec, ok := c.idx.Images[d]
	if !ok {
		return nil
	}
	img := &Image{Ref: rec.Ref, Digest: d, Config: *rec.config.DeepCopy(), Warm: true, Layers: make([]Layer, len(rec.DiffIDs))}
	if ref != "" {
		img.Ref = ref
	}
	for i, id := range rec.DiffIDs {
		l, ok := c.idx.Layers[id]
		if !ok {
			return nil
		}
		img.Layers[i] = Layer{Digest: l.Digest, DiffID: id, Size: l.Size, Dir: c.layerDir(id)}
	}
	for _, id := range rec.DiffIDs {
		c.idx.Layers[id].LastUsed = now.UnixNano()
	}
	c.dirty = true
	return img
}

// Usage returns the bytes the cache holds (blobs plus extracted layers).
func (c *Cache) Usage() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.usage
}

func isDigest(s string) bool {
	h, err := v1.NewHash(s)
	return err == nil && h.Algorithm == "sha256"
}
