package imagebuild

import (
	"log/slog"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/registry"
)

// TestPushCacheKey: build cache tags are immutable in the registry. A key
// another build wrote first with another image is that image (push returns
// it); a forced step replaces it.
func TestPushCacheKey(t *testing.T) {
	reg, err := registry.New(t.Context(), registry.Config{RootDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	b := &Builder{cfg: Config{Registry: reg}, log: slog.New(slog.DiscardHandler)}
	ctx := t.Context()
	img := func() (v1.Image, v1.Hash) {
		i, err := random.Image(256, 1)
		if err != nil {
			t.Fatal(err)
		}
		d, _ := i.Digest()
		return i, d
	}
	key := "sha256:" + strings.Repeat("ab", 32)
	names := func() v1.Hash {
		ref, err := b.tagRef(key)
		if err != nil {
			t.Fatal(err)
		}
		d, err := remote.Head(ref, reg.RemoteOptions(ctx)...)
		if err != nil {
			t.Fatal(err)
		}
		return d.Digest
	}

	first, firstDigest := img()
	if got, err := b.push(ctx, key, first, false); err != nil || got != first {
		t.Fatalf("push to a new key = %v, %v", got, err)
	}
	mine, mineDigest := img()
	got, err := b.push(ctx, key, mine, false)
	if err != nil {
		t.Fatalf("push to a key written meanwhile: %v", err)
	}
	if d, _ := got.Digest(); d != firstDigest || names() != firstDigest {
		t.Errorf("push to a key written meanwhile returned %s, key names %s; want the first image %s", d, names(), firstDigest)
	}
	if got, err := b.push(ctx, key, mine, true); err != nil || got != mine || names() != mineDigest {
		t.Errorf("forced push = %v, %v, key names %s; want %s", got, err, names(), mineDigest)
	}
}
