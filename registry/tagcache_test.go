package registry

import (
	"errors"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestResolveCacheSeesWrites: with CacheTags, Resolve answers a reference
// it resolved before from its cache, and every write to the registry —
// chalkd's own Delete, or another client's push or delete through the
// listener — is seen by the very next Resolve: a tag removed is not found,
// a tag pushed again names the new image.
func TestResolveCacheSeesWrites(t *testing.T) {
	r := newTestRegistry(t, Config{CacheTags: true})
	ctx := t.Context()
	const ref = "ghcr.io/org/app:v1"
	local, err := r.LocalRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	resolve := func(want v1.Hash) {
		t.Helper()
		if _, h, err := r.Resolve(ctx, ref); err != nil || h != want {
			t.Fatalf("Resolve = %s, %v; want %s", h, err, want)
		}
	}
	notFound := func(what string) {
		t.Helper()
		if _, h, err := r.Resolve(ctx, ref); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("Resolve after %s = %s, %v; want ErrNotFound", what, h, err)
		}
	}
	a, b, c := randomImage(t), randomImage(t), randomImage(t)
	da := push(t, r, ref, a)
	resolve(da)
	if h, ok := r.tags.get(local.String()); !ok || h != da {
		t.Fatalf("after Resolve the cache holds %s, %v; want %s", h, ok, da)
	}
	resolve(da)

	// chalkd's own removal (the images API), then the tag pushed again.
	if err := r.Delete(ctx, ref); err != nil {
		t.Fatal(err)
	}
	notFound("Delete")
	db := push(t, r, ref, b)
	resolve(db)
	resolve(db)

	// Another client (its own connection, the push credential): a delete
	// and a push of a third image under the same tag.
	outside := []remote.Option{remote.WithContext(ctx), remote.WithAuth(r.Credentials().Push.Authenticator())}
	if err := remote.Delete(local, outside...); err != nil {
		t.Fatal(err)
	}
	notFound("another client's delete")
	if err := remote.Write(local, c, outside...); err != nil {
		t.Fatal(err)
	}
	dc, _ := c.Digest()
	resolve(dc)
	// A delete by digest removes the tag too.
	if err := remote.Delete(local.Context().Digest(dc.String()), outside...); err != nil {
		t.Fatal(err)
	}
	notFound("a delete by digest")

	// Reads leave the cache alone; a write that is refused still moves it on.
	dd := push(t, r, ref, a)
	resolve(dd)
	if _, err := remote.Get(local, outside...); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.tags.get(local.String()); !ok {
		t.Fatal("a read invalidated the cache")
	}
	if err := remote.Write(local, b, outside...); !errors.Is(WrapRemoteError("put", err), errdefs.ErrAlreadyExists) {
		t.Fatalf("moving an immutable tag: %v, want refused", err)
	}
	if _, ok := r.tags.get(local.String()); ok {
		t.Fatal("a write did not invalidate the cache")
	}
	resolve(dd)
}

// TestTagCacheRace: an answer found before a write is never served after
// it, whatever the order in which they finish.
func TestTagCacheRace(t *testing.T) {
	c := newTagCache()
	d := v1.Hash{Algorithm: "sha256", Hex: "00"}
	gen := c.generation()
	c.invalidate() // a write ended while the registry was asked
	c.put("x", gen, d)
	if _, ok := c.get("x"); ok {
		t.Fatal("an answer from before a write was cached")
	}
	gen = c.generation()
	c.put("x", gen, d)
	if got, ok := c.get("x"); !ok || got != d {
		t.Fatalf("get = %s, %v", got, ok)
	}
	c.invalidate()
	if _, ok := c.get("x"); ok {
		t.Fatal("an entry survived a write")
	}
	// Concurrent puts, gets and writes (go test -race).
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for range 1000 {
				if i == 0 {
					c.invalidate()
					continue
				}
				g := c.generation()
				c.put("x", g, d)
				c.get("x")
			}
		})
	}
	wg.Wait()
}

// TestNoTagCacheByDefault: without CacheTags (replicas sharing the
// storage), every Resolve asks the registry.
func TestNoTagCacheByDefault(t *testing.T) {
	r := newTestRegistry(t, Config{})
	if r.tags != nil {
		t.Fatal("a registry without CacheTags has a tag cache")
	}
}
