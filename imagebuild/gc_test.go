package imagebuild

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func put(t *testing.T, b *Blobs, s string) string {
	t.Helper()
	sum := sha256.Sum256([]byte(s))
	d := "sha256:" + hex.EncodeToString(sum[:])
	if err := b.Put(d, []byte(s)); err != nil {
		t.Fatal(err)
	}
	return d
}

// gcClock is a test clock.
type gcClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *gcClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *gcClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestCollect: unreferenced content goes once its grace since its last use
// (upload, HasBlobs/Touch, a Pin) passed, with its extracted tree; content
// a live sandbox refers to or a build/create holds stays; a Refs error
// removes nothing; an extracted tree whose blob is gone goes too.
func TestCollect(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	b, err := NewBlobs(filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	clock := &gcClock{t: time.Now()}
	b.Now = clock.now
	ext := filepath.Join(dir, "mounts")
	old, live, held, touched := put(t, b, "old"), put(t, b, "live"), put(t, b, "held"), put(t, b, "touched")
	orphan := "sha256:" + hex.EncodeToString(make([]byte, 32))
	for _, d := range []string{old, orphan} {
		if err := os.MkdirAll(filepath.Join(ext, d[7:], "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	refs := map[string]bool{live: true}
	opts := CollectOptions{Grace: time.Hour, Extracted: ext, Refs: func(context.Context) (map[string]bool, error) { return refs, nil }}
	clock.add(30 * time.Minute)
	if res, err := b.Collect(ctx, opts); err != nil || len(res.Digests) != 1 || res.Digests[0] != orphan {
		t.Fatalf("collect within the grace: %+v %v, want only the orphaned tree", res, err)
	}
	release, err := b.Pin(held)
	if err != nil {
		t.Fatal(err)
	}
	clock.add(31 * time.Minute)
	if !b.Touch(touched) {
		t.Fatal("touch of stored content")
	}
	clock.add(31 * time.Minute) // old and live: 92 min; held and touched: 31 min since their last use
	if _, err := b.Collect(ctx, CollectOptions{Grace: time.Minute, Refs: func(context.Context) (map[string]bool, error) {
		return nil, errors.New("store down")
	}}); err == nil || !b.Has(old) {
		t.Fatalf("collect with failing references: %v; old kept: %v", err, b.Has(old))
	}
	res, err := b.Collect(ctx, opts)
	if err != nil || !slices.Equal(res.Digests, []string{old}) || res.Bytes != 3 {
		t.Fatalf("collect: %+v %v, want old (3 bytes)", res, err)
	}
	if _, err := os.Stat(filepath.Join(ext, old[7:])); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("old's extracted tree: %v", err)
	}
	clock.add(2 * time.Hour)
	res, err = b.Collect(ctx, opts)
	if err != nil || !slices.Equal(res.Digests, []string{touched}) || !b.Has(live) || !b.Has(held) {
		t.Fatalf("collect past every grace: %+v %v, want touched only (live referenced, held pinned)", res, err)
	}
	release()
	release() // a second release does nothing
	if _, err := b.Pin(old); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("pin of collected content: %v, want failed_precondition", err)
	}
	clock.add(2 * time.Hour)
	delete(refs, live)
	res, err = b.Collect(ctx, opts)
	slices.Sort(res.Digests)
	want := []string{held, live}
	slices.Sort(want)
	if err != nil || !slices.Equal(res.Digests, want) {
		t.Fatalf("collect after the release and the sandbox's end: %+v %v, want %v", res, err, want)
	}
}

// TestUploadThenCreateRace: content uploaded long ago (its grace passed)
// that a create mounts is not lost between the create's check (Pin, in its
// build) and its record: a collection that read the live sandboxes before
// the record existed, and looks at the content after the create released
// its pin, keeps it; the next collection sees the record. Without the pins
// taken during a collection (seen), the first one removed it.
func TestUploadThenCreateRace(t *testing.T) {
	ctx := context.Background()
	b, err := NewBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	clock := &gcClock{t: time.Now()}
	b.Now = clock.now
	d := put(t, b, "mounted")
	clock.add(2 * time.Hour) // uploaded long ago: only references keep it

	var mu sync.Mutex
	records := map[string]bool{} // the store's live sandboxes' mounts
	refs := func(context.Context) (map[string]bool, error) {
		mu.Lock()
		defer mu.Unlock()
		return maps(records), nil
	}
	created := make(chan struct{})
	// Grace 0: only the pin and the record keep it.
	opts := CollectOptions{Refs: refs, afterRefs: func() {
		// The create runs between the collection's read of the live
		// sandboxes and its look at the content.
		go func() {
			defer close(created)
			release, err := b.Pin(d) // the create's build checks the mount
			if err != nil {
				t.Errorf("pin: %v", err)
				return
			}
			mu.Lock()
			records[d] = true // its record, with the mount
			mu.Unlock()
			release() // the create returned
		}()
		<-created
	}}
	res, err := b.Collect(ctx, opts)
	if err != nil || len(res.Digests) != 0 || !b.Has(d) {
		t.Fatalf("collect racing a create: %+v %v: the created sandbox's mount was removed", res, err)
	}
	clock.add(2 * time.Hour)
	opts.afterRefs = nil
	if res, err := b.Collect(ctx, opts); err != nil || len(res.Digests) != 0 || !b.Has(d) {
		t.Fatalf("collect with the record: %+v %v", res, err)
	}
	mu.Lock()
	delete(records, d) // the sandbox ended
	mu.Unlock()
	if res, err := b.Collect(ctx, opts); err != nil || len(res.Digests) != 1 || b.Has(d) {
		t.Fatalf("collect after the sandbox ended: %+v %v", res, err)
	}
}

// TestCollectOrphanTreeKeepsNewUpload: a collection removing an extracted
// tree whose blob was gone does not remove the blob of the same digest
// uploaded again meanwhile (the hook stands for that upload's commit
// landing between the collection's look at the blob and its removal).
func TestCollectOrphanTreeKeepsNewUpload(t *testing.T) {
	ctx := context.Background()
	b, err := NewBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	clock := &gcClock{t: time.Now()}
	b.Now = clock.now
	extracted := t.TempDir()
	d := put(t, b, "a directory upload")
	content, err := os.ReadFile(b.path(d))
	if err != nil {
		t.Fatal(err)
	}
	tree := filepath.Join(extracted, strings.TrimPrefix(d, "sha256:"))
	if err := os.MkdirAll(tree, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(b.path(d)); err != nil { // the blob gone, its tree left
		t.Fatal(err)
	}
	clock.add(2 * time.Hour)
	res, err := b.Collect(ctx, CollectOptions{Extracted: extracted, beforeRemove: func(string) {
		if err := os.WriteFile(b.path(d), content, 0o600); err != nil { // uploaded again
			t.Error(err)
		}
	}})
	if err != nil || len(res.Digests) != 1 {
		t.Fatalf("collect: %+v %v, want the orphaned tree removed", res, err)
	}
	if _, err := os.Stat(tree); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the orphaned tree: %v, want removed", err)
	}
	if !b.Has(d) {
		t.Fatal("the blob uploaded again during the collection was removed")
	}
}

func maps(m map[string]bool) map[string]bool {
	out := make(map[string]bool, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// BenchmarkPin: what a create from a spec with one upload mount adds (its
// build's Pin and the release), and a HasBlobs check of one digest (Touch),
// against the Has it replaced.
func BenchmarkPin(b *testing.B) {
	bl, err := NewBlobs(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	sum := sha256.Sum256([]byte("x"))
	d := "sha256:" + hex.EncodeToString(sum[:])
	if err := bl.Put(d, []byte("x")); err != nil {
		b.Fatal(err)
	}
	b.Run("pin+release", func(b *testing.B) {
		for range b.N {
			release, err := bl.Pin(d)
			if err != nil {
				b.Fatal(err)
			}
			release()
		}
	})
	b.Run("touch", func(b *testing.B) {
		for range b.N {
			if !bl.Touch(d) {
				b.Fatal("not stored")
			}
		}
	})
	b.Run("has", func(b *testing.B) {
		for range b.N {
			if !bl.Has(d) {
				b.Fatal("not stored")
			}
		}
	})
}

// TestCollectForget: Forget runs for content being removed (the store drops
// the orgs' records of it), under the lock an upload commits under (an
// upload of the digest waits for it), and its error keeps the content.
func TestCollectForget(t *testing.T) {
	ctx := context.Background()
	b, err := NewBlobs(filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	clock := &gcClock{t: time.Now()}
	b.Now = clock.now
	keep, gone := put(t, b, "keep"), put(t, b, "gone")
	clock.add(2 * time.Hour)
	var forgot []string
	opts := CollectOptions{Grace: time.Hour, Forget: func(d string) error {
		if b.mu.TryLock() {
			b.mu.Unlock()
			t.Error("Forget runs without the lock uploads commit under")
		}
		if d == keep {
			return errors.New("the store is down")
		}
		forgot = append(forgot, d)
		return nil
	}}
	res, err := b.Collect(ctx, opts)
	if err == nil || !strings.Contains(err.Error(), "the store is down") {
		t.Fatalf("collect with a failing Forget: %v", err)
	}
	if !slices.Equal(res.Digests, []string{gone}) || !slices.Equal(forgot, []string{gone}) {
		t.Fatalf("removed %v, forgot %v; want %s", res.Digests, forgot, gone)
	}
	if !b.Has(keep) || b.Has(gone) {
		t.Fatalf("after the pass: keep stored %v, gone stored %v", b.Has(keep), b.Has(gone))
	}
}

// TestCollectLock: Lock is taken only for content a first look would
// remove, before the store's own lock (an upload through another process
// commits under it), and held through Forget and the removal; the look
// is made again under it (content used meanwhile stays); a Lock error
// keeps the content. ForgetMissing locks the same way.
func TestCollectLock(t *testing.T) {
	ctx := context.Background()
	b, err := NewBlobs(filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	clock := &gcClock{t: time.Now()}
	b.Now = clock.now
	fresh, gone, used, failing := put(t, b, "fresh"), put(t, b, "gone"), put(t, b, "used"), put(t, b, "failing")
	clock.add(2 * time.Hour)
	if !b.Touch(fresh) {
		t.Fatal("touch")
	}
	var locked, forgot []string
	held := map[string]bool{}
	opts := CollectOptions{Grace: time.Hour,
		Lock: func(d string) (func(), error) {
			if !b.mu.TryLock() {
				t.Error("Lock taken under the store's lock")
			} else {
				b.mu.Unlock()
			}
			locked = append(locked, d)
			if d == failing {
				return nil, errors.New("the database is down")
			}
			if d == used {
				b.Touch(used) // an upload through another replica, before the lock was ours
			}
			held[d] = true
			return func() { held[d] = false }, nil
		},
		Forget: func(d string) error {
			if !held[d] {
				t.Errorf("Forget of %s without its Lock", d)
			}
			forgot = append(forgot, d)
			return nil
		},
		beforeRemove: func(d string) {
			if !held[d] {
				t.Errorf("removal of %s without its Lock", d)
			}
		},
	}
	res, err := b.Collect(ctx, opts)
	if err == nil || !strings.Contains(err.Error(), "the database is down") {
		t.Fatalf("collect with a failing Lock: %v", err)
	}
	slices.Sort(locked)
	want := []string{gone, used, failing}
	slices.Sort(want)
	if !slices.Equal(locked, want) {
		t.Errorf("locked %v, want %v (not the fresh one)", locked, want)
	}
	if !slices.Equal(res.Digests, []string{gone}) || !slices.Equal(forgot, []string{gone}) {
		t.Fatalf("removed %v, forgot %v; want %s", res.Digests, forgot, gone)
	}
	if !b.Has(fresh) || !b.Has(used) || !b.Has(failing) || b.Has(gone) {
		t.Fatal("the wrong content was removed")
	}
	// ForgetMissing: only digests not stored are locked and forgotten.
	locked, forgot = nil, nil
	n, err := b.ForgetMissing([]string{gone, fresh}, func(d string) error { forgot = append(forgot, d); return nil },
		func(d string) (func(), error) { locked = append(locked, d); return func() {}, nil })
	if err != nil || n != 1 || !slices.Equal(locked, []string{gone}) || !slices.Equal(forgot, []string{gone}) {
		t.Fatalf("ForgetMissing: %d %v, locked %v, forgot %v; want %s", n, err, locked, forgot, gone)
	}
}
