package daemon_test

import (
	"errors"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestRemovedImageNotCreated: creates resolve the image's tag from the
// registry's tag cache (issue #18); removing the image makes the very next
// create fail with not found, although the image is still warm in the node
// cache and its tag was resolved a moment before.
func TestRemovedImageNotCreated(t *testing.T) {
	n := chalktest.Start(t)
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	for range 2 { // the second create resolves the tag from the cache
		sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
		if err != nil {
			t.Fatal(err)
		}
		res, err := sb.Exec(ctx, []string{"true"})
		if err != nil || res.Code != 0 {
			t.Fatalf("exec: %v %+v", err, res)
		}
		if _, err := sb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.RemoveImage(ctx, "busybox"); err != nil {
		t.Fatal(err)
	}
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"))
	if !errors.Is(err, errdefs.ErrNotFound) {
		if err == nil {
			_, _ = sb.Terminate(ctx)
		}
		t.Fatalf("create after the image's removal: %v, want not found", err)
	}
}
