package nodecache

import (
	"context"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/chalkcompute/chalkcompute/baseimage"
	"github.com/chalkcompute/chalkcompute/registry"
)

func seededBusybox(b *testing.B) (*registry.Registry, name.Reference, name.Digest) {
	b.Helper()
	requireRoot(b)
	reg := newRegistry(b)
	img, err := baseimage.Busybox(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	tag, dig := pushV1(b, reg, "docker.io/library/busybox:latest", img)
	return reg, tag, dig
}

// BenchmarkEnsureWarm measures Ensure of an image already in the cache, by
// digest (no I/O) and by tag (one manifest request to the local registry).
func BenchmarkEnsureWarm(b *testing.B) {
	reg, tag, dig := seededBusybox(b)
	c := newCache(b, reg, "", 0)
	if _, err := c.Ensure(b.Context(), tag, nil); err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		ref  name.Reference
	}{{"digest", dig}, {"tag", tag}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				img, err := c.Ensure(b.Context(), bc.ref, nil)
				if err != nil || !img.Warm {
					b.Fatalf("Ensure = %v, %v", img, err)
				}
			}
		})
	}
}

// BenchmarkEnsureColdBusybox measures pulling and extracting busybox from
// the embedded registry into an empty cache.
func BenchmarkEnsureColdBusybox(b *testing.B) {
	reg, tag, _ := seededBusybox(b)
	var pulled int64
	for b.Loop() {
		b.StopTimer()
		c := newCache(b, reg, "", 0)
		b.StartTimer()
		img, err := c.Ensure(b.Context(), tag, nil)
		if err != nil || img.Warm {
			b.Fatalf("Ensure = %v, %v", img, err)
		}
		pulled = img.BytesPulled
	}
	b.SetBytes(pulled)
}
