package imagebuild

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Garbage collection of uploaded content. A blob (and its extracted
// directory, if it was a directory upload) is removed by Collect when all
// of these hold:
//
//   - no live sandbox refers to it (CollectOptions.Refs: the store's live
//     records' mounts, a node's running sandboxes' binds);
//   - nothing holds it (Pin: a build, a create between its build and its
//     record) now, nor took it since the Collect began (so a create that
//     pinned and recorded its sandbox after Refs was read keeps it);
//   - its last use (upload, an upload or HasBlobs of content already here,
//     a Pin) is older than the grace: a client that uploaded, or was told
//     the content is here, has the grace to use it.
//
// Pin checks that the content is there under the same lock as Collect's
// removal, so a create either holds content that stays or fails as "not
// uploaded" (the SDKs upload what HasBlobs says is missing).

// Touch reports whether digest is stored and, if so, restarts its grace
// (its mtime is now): content a client was told is here, or uploaded
// again, is not collected for the grace.
func (b *Blobs) Touch(digest string) bool {
	if !digestRE.MatchString(digest) {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	return os.Chtimes(b.path(digest), now, now) == nil
}

// Pin holds the content of digests (each must be stored: else
// failed_precondition naming it) until release is called (once; more calls
// do nothing): Collect removes none of it meanwhile. Each use restarts its
// grace.
func (b *Blobs) Pin(digests ...string) (release func(), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := b.now()
	for _, d := range digests {
		if !digestRE.MatchString(d) {
			return nil, fmt.Errorf("digest %q: want sha256:<64 hex>: %w", d, errdefs.ErrInvalidArgument)
		}
		if err := os.Chtimes(b.path(d), now, now); err != nil {
			return nil, fmt.Errorf("content %s was not uploaded (upload it with UploadBlob first): %w", d, errdefs.ErrFailedPrecondition)
		}
	}
	if b.pins == nil {
		b.pins = map[string]int{}
	}
	for _, d := range digests {
		b.pins[d]++
		if b.seen != nil {
			b.seen[d] = true
		}
	}
	done := false
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if done {
			return
		}
		done = true
		for _, d := range digests {
			if b.pins[d]--; b.pins[d] <= 0 {
				delete(b.pins, d)
			}
		}
	}, nil
}

// PinPresent is Pin of those of digests that are stored (the others are
// skipped).
func (b *Blobs) PinPresent(digests ...string) (release func()) {
	var here []string
	for _, d := range digests {
		if b.Has(d) {
			here = append(here, d)
		}
	}
	for range 3 {
		release, err := b.Pin(here...)
		if err == nil {
			return release
		}
		// One was collected meanwhile: pin what is left.
		here = slices.DeleteFunc(here, func(d string) bool { return !b.Has(d) })
	}
	return func() {} // the build reports what it cannot read
}

// CollectOptions says what Collect keeps.
type CollectOptions struct {
	// Grace: content used more recently than this is kept.
	Grace time.Duration
	// Refs returns the digests live sandboxes refer to; read after the
	// collection began (content pinned from then on is kept too). An
	// error removes nothing.
	Refs func(context.Context) (map[string]bool, error)
	// Extracted is the directory of extracted directory uploads (by hex
	// digest): removed with their blob, and on their own when their blob is
	// gone and they are unreferenced. "": none.
	Extracted string
	// Forget runs for content about to be removed (its blob, or an
	// orphaned extracted tree), under the lock an upload commits under, so
	// an upload committed after it is recorded after it: the store drops
	// every org's record of the upload (their budgets' charge). An error
	// keeps the content. nil: nothing.
	Forget func(digest string) error
	// Lock, if set, is taken for each digest about to be removed (or whose
	// records ForgetMissing is about to drop) before the look that decides
	// it, and held through Forget and the removal: other processes sharing
	// the directory (control-plane replicas) commit uploads under it
	// (store.CommitUpload), which this store's own lock does not
	// serialise. Content that a first look (without it) keeps is not
	// locked. An error keeps the content.
	Lock func(digest string) (release func(), err error)
	// afterRefs runs after Refs (tests: what happens meanwhile).
	afterRefs func()
	// beforeRemove runs before a digest's blob is removed (tests).
	beforeRemove func(digest string)
}

// Collected is what a Collect removed.
type Collected struct {
	Digests []string // blobs and extracted directories removed (by digest)
	Bytes   int64    // their blobs' sizes
	Kept    int      // content examined and kept
	Temps   int      // interrupted uploads and extractions removed
}

// Collect removes the unreferenced content whose grace has passed (see
// above). Collections do not overlap (a second one returns at once, with
// nothing removed).
func (b *Blobs) Collect(ctx context.Context, o CollectOptions) (Collected, error) {
	var out Collected
	b.mu.Lock()
	if b.gc {
		b.mu.Unlock()
		return out, nil
	}
	b.gc = true
	b.seen = map[string]bool{}
	for d := range b.pins {
		b.seen[d] = true
	}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		b.gc, b.seen = false, nil
		b.mu.Unlock()
	}()
	refs := map[string]bool{}
	if o.Refs != nil {
		var err error
		if refs, err = o.Refs(ctx); err != nil {
			return out, fmt.Errorf("upload GC: the references: %w", err)
		}
	}
	if o.afterRefs != nil {
		o.afterRefs()
	}
	cands := map[string]bool{}
	ents, err := os.ReadDir(b.dir)
	if err != nil {
		return out, err
	}
	for _, e := range ents {
		if d := "sha256:" + e.Name(); digestRE.MatchString(d) {
			cands[d] = true
		}
	}
	if o.Extracted != "" {
		ents, err := os.ReadDir(o.Extracted)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return out, err
		}
		for _, e := range ents {
			if d := "sha256:" + e.Name(); digestRE.MatchString(d) {
				cands[d] = true
			}
		}
	}
	var errs []error
	out.Temps, err = b.removeTemps(o.Extracted, o.Grace)
	errs = append(errs, err)
	for d := range cands {
		if ctx.Err() != nil {
			break
		}
		removed, size, err := b.collect(d, refs, o)
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			out.Digests = append(out.Digests, d)
			out.Bytes += size
		} else {
			out.Kept++
		}
	}
	return out, errors.Join(errs...)
}

// collect removes digest's content if nothing keeps it: looked at once,
// and if it goes, again under o.Lock.
func (b *Blobs) collect(d string, refs map[string]bool, o CollectOptions) (bool, int64, error) {
	if o.Lock != nil {
		b.mu.Lock()
		_, _, keep, err := b.keep(d, refs, o)
		b.mu.Unlock()
		if keep || err != nil {
			return false, 0, err
		}
		release, err := o.Lock(d)
		if err != nil {
			return false, 0, fmt.Errorf("upload GC: locking %s: %w", d, err)
		}
		defer release()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	size, here, keep, err := b.keep(d, refs, o)
	if keep || err != nil {
		return false, 0, err
	}
	blob := b.path(d)
	if o.Forget != nil {
		if err := o.Forget(d); err != nil {
			return false, 0, fmt.Errorf("upload GC: forgetting %s: %w", d, err)
		}
	}
	// The extracted tree first: a crash between the two leaves a blob
	// whose tree is extracted again when used.
	if o.Extracted != "" {
		if err := os.RemoveAll(filepath.Join(o.Extracted, strings.TrimPrefix(d, "sha256:"))); err != nil {
			return false, 0, err
		}
	}
	if o.beforeRemove != nil {
		o.beforeRemove(d)
	}
	// Only a blob that was here and old: an orphaned tree's digest may be
	// uploaded again meanwhile, and that new blob is not this pass's.
	if here {
		if err := os.Remove(blob); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, 0, err
		}
	}
	return true, size, nil
}

// keep looks at digest's content (b.mu held): keep says something keeps
// it; else here says its blob is stored (not: an orphaned extracted
// tree), of size bytes.
func (b *Blobs) keep(d string, refs map[string]bool, o CollectOptions) (size int64, here, keep bool, err error) {
	if refs[d] || b.pins[d] > 0 || b.seen[d] {
		return 0, false, true, nil
	}
	st, err := os.Stat(b.path(d))
	switch {
	case err == nil:
		if b.now().Sub(st.ModTime()) < o.Grace {
			return 0, true, true, nil
		}
		return st.Size(), true, false, nil
	case errors.Is(err, os.ErrNotExist):
		return 0, false, false, nil
	}
	return 0, false, false, err
}

// ForgetMissing runs forget for each of digests (content recorded as
// uploaded) that is not stored: records whose content went before the GC
// dropped records, or whose write never happened (chalkd stopped between
// an upload's charge and its write). Under the lock an upload commits
// under (and lock, if set, taken before it for each digest not stored at
// a first look: see CollectOptions.Lock), so an upload committed after it
// records again. Returns how many it forgot.
func (b *Blobs) ForgetMissing(digests []string, forget func(string) error, lock func(string) (func(), error)) (int, error) {
	n := 0
	var errs []error
	for _, d := range digests {
		if !digestRE.MatchString(d) || b.Has(d) {
			continue
		}
		forgot, err := b.forgetMissing(d, forget, lock)
		if err != nil {
			errs = append(errs, err)
		} else if forgot {
			n++
		}
	}
	return n, errors.Join(errs...)
}

func (b *Blobs) forgetMissing(d string, forget func(string) error, lock func(string) (func(), error)) (bool, error) {
	if lock != nil {
		release, err := lock(d)
		if err != nil {
			return false, fmt.Errorf("upload GC: locking %s: %w", d, err)
		}
		defer release()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, err := os.Stat(b.path(d)); !errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err := forget(d); err != nil {
		return false, err
	}
	return true, nil
}

// removeTemps removes what interrupted uploads and extractions left
// (".upload-*" in the store, ".extract-*" in extracted) once untouched for
// the grace: one in progress is written to, so its mtime moves.
func (b *Blobs) removeTemps(extracted string, grace time.Duration) (n int, err error) {
	var errs []error
	for _, dir := range []struct{ dir, prefix string }{{b.dir, ".upload-"}, {extracted, ".extract-"}} {
		if dir.dir == "" {
			continue
		}
		ents, err := os.ReadDir(dir.dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), dir.prefix) {
				continue
			}
			if info, err := e.Info(); err != nil || b.now().Sub(info.ModTime()) < grace {
				continue
			}
			if err := os.RemoveAll(filepath.Join(dir.dir, e.Name())); err != nil {
				errs = append(errs, err)
				continue
			}
			n++
		}
	}
	return n, errors.Join(errs...)
}
