package nodecache

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// Acquire marks img's layers in use, so GC never removes them, until the
// returned release is called (release is idempotent). Every running
// sandbox should hold one. In-use marks live in memory: after a restart,
// Acquire again for the sandboxes still running before calling GC.
func (c *Cache) Acquire(img *Image) (release func()) {
	ids := make([]string, len(img.Layers))
	for i, l := range img.Layers {
		ids[i] = l.DiffID
	}
	c.mu.Lock()
	for _, id := range ids {
		c.inUse[id]++
	}
	c.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			for _, id := range ids {
				if c.inUse[id]--; c.inUse[id] <= 0 {
					delete(c.inUse, id)
				}
			}
		})
	}
}

// GC removes least recently used layers (and their blobs) that are not in
// use until Usage is at most MaxBytes, and forgets the images that lose a
// layer. It returns the bytes freed. Layers in use are never removed, even
// if that leaves the cache above MaxBytes.
func (c *Cache) GC(ctx context.Context) (freed int64, err error) {
	c.mu.Lock()
	if c.usage <= c.maxBytes {
		var err error
		if c.dirty {
			err = c.persistLocked()
		}
		c.mu.Unlock()
		return 0, err
	}
	var victims []*layerRecord
	for id, l := range c.idx.Layers {
		if c.inUse[id] == 0 {
			victims = append(victims, l)
		}
	}
	sort.Slice(victims, func(i, j int) bool {
		if victims[i].LastUsed != victims[j].LastUsed {
			return victims[i].LastUsed < victims[j].LastUsed
		}
		return victims[i].DiffID < victims[j].DiffID
	})
	var trash []string
	for _, l := range victims {
		if c.usage <= c.maxBytes || ctx.Err() != nil {
			break
		}
		// Move out of the way under the lock, delete outside it: a
		// concurrent Ensure of this layer then extracts a fresh copy.
		t, err := os.MkdirTemp(c.tmpDir(), "gc-")
		if err != nil {
			break
		}
		if err := os.Rename(c.layerDir(l.DiffID), filepath.Join(t, "fs")); err != nil && !os.IsNotExist(err) {
			os.Remove(t)
			c.log.Warn("nodecache: gc could not remove layer", "diff_id", l.DiffID, "err", err)
			continue
		}
		if err := os.Rename(c.blobPath(l.Digest), filepath.Join(t, "blob")); err != nil && !os.IsNotExist(err) {
			c.log.Warn("nodecache: gc could not remove blob", "digest", l.Digest, "err", err)
		}
		trash = append(trash, t)
		delete(c.idx.Layers, l.DiffID)
		c.usage -= l.bytes()
		freed += l.bytes()
		c.log.Info("nodecache: gc removed layer", "diff_id", l.DiffID, "bytes", l.bytes())
	}
	c.dropBrokenImagesLocked()
	err = c.persistLocked()
	c.mu.Unlock()

	for _, t := range trash {
		if rerr := os.RemoveAll(t); rerr != nil && err == nil {
			err = rerr
		}
	}
	if err == nil && ctx.Err() != nil {
		err = ctxErr(ctx)
	}
	return freed, err
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }
