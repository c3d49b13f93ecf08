package imagebuild

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

var digestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// Blobs stores content the SDKs upload (copy and mount sources), by SHA-256.
// Content is kept while something refers to it and removed by Collect
// (gc.go) after a grace counted from its last use.
type Blobs struct {
	dir string
	// Now is the clock of the grace (nil: time.Now; tests).
	Now func() time.Time

	mu   sync.Mutex
	pins map[string]int  // digest → holders (Pin)
	seen map[string]bool // while a Collect runs: digests pinned since it began
	gc   bool            // a Collect runs
}

// NewBlobs opens (creating) a blob store in dir.
func NewBlobs(dir string) (*Blobs, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return &Blobs{dir: dir, pins: map[string]int{}}, nil
}

// Dir is where the content is kept.
func (b *Blobs) Dir() string { return b.dir }

func (b *Blobs) now() time.Time {
	if b.Now != nil {
		return b.Now()
	}
	return time.Now()
}

func (b *Blobs) path(digest string) string {
	return filepath.Join(b.dir, digest[len("sha256:"):])
}

// Has reports whether digest is stored.
func (b *Blobs) Has(digest string) bool {
	if !digestRE.MatchString(digest) {
		return false
	}
	_, err := os.Stat(b.path(digest))
	return err == nil
}

// Put stores data, which must hash to digest.
func (b *Blobs) Put(digest string, data []byte) error {
	if !digestRE.MatchString(digest) {
		return fmt.Errorf("digest %q: want sha256:<64 hex>: %w", digest, errdefs.ErrInvalidArgument)
	}
	sum := sha256.Sum256(data)
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != digest {
		return fmt.Errorf("upload of %s: content hashes to %s: %w", digest, got, errdefs.ErrInvalidArgument)
	}
	if b.Touch(digest) {
		return nil
	}
	tmp, err := os.CreateTemp(b.dir, ".upload-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil { // bind-mounted read-only into sandboxes
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return b.commit(tmp.Name(), digest)
}

// commit moves a complete upload to its place, its mtime (the start of its
// grace) now. Under the GC's lock: a Collect removing this digest (an
// extracted tree whose blob was gone) stats and removes the blob as one
// step, so it never removes content committed between the two.
func (b *Blobs) commit(tmp, digest string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	if err := os.Chtimes(tmp, now, now); err != nil {
		return err
	}
	return os.Rename(tmp, b.path(digest))
}

// Open opens stored content.
func (b *Blobs) Open(digest string) (io.ReadCloser, error) {
	if !digestRE.MatchString(digest) {
		return nil, fmt.Errorf("digest %q: %w", digest, errdefs.ErrInvalidArgument)
	}
	f, err := os.Open(b.path(digest))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("content %s was not uploaded (upload it with UploadBlob first): %w", digest, errdefs.ErrFailedPrecondition)
	}
	return f, err
}

// Path is the file holding digest (for bind mounts of mount-strategy files).
func (b *Blobs) Path(digest string) string { return b.path(digest) }

// PutFrom stores the content read from r, which must hash to digest and
// be at most max bytes (more: resource exhausted; nothing is stored). It
// streams to a temporary file: a fleet node gets mount content this way
// from its control plane.
func (b *Blobs) PutFrom(digest string, r io.Reader, max int64) error {
	if !digestRE.MatchString(digest) {
		return fmt.Errorf("digest %q: want sha256:<64 hex>: %w", digest, errdefs.ErrInvalidArgument)
	}
	if b.Touch(digest) {
		return nil
	}
	tmp, err := os.CreateTemp(b.dir, ".upload-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(r, max+1))
	if err != nil {
		tmp.Close()
		return err
	}
	if n > max {
		tmp.Close()
		return fmt.Errorf("content %s: larger than %d bytes: %w", digest, max, errdefs.ErrResourceExhausted)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != digest {
		tmp.Close()
		return fmt.Errorf("content of %s hashes to %s: %w", digest, got, errdefs.ErrInvalidArgument)
	}
	if err := tmp.Chmod(0o644); err != nil { // bind-mounted read-only into sandboxes
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return b.commit(tmp.Name(), digest)
}
