package api

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestCreateHoldsMountsUntilRecorded: a create from a spec with upload
// mounts keeps the build's hold on their content (BuildResult.Release,
// upload GC) until its record, which refers to them, exists, and releases
// it once, also when the start fails.
func TestCreateHoldsMountsUntilRecorded(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	digest := "sha256:" + strings.Repeat("a", 64)
	var mu sync.Mutex
	var releases []bool // per release: a live record mounting digest existed
	tn.images.build = func() (*BuildResult, error) {
		return &BuildResult{Ref: "built", Hash: "sha256:" + strings.Repeat("b", 64), Digest: "sha256:" + strings.Repeat("c", 64),
			Mounts: []store.Mount{{Digest: digest, Dst: "/m"}},
			Release: func() {
				sbs, err := tn.store.ListSandboxes(ctx, "", false)
				if err != nil {
					t.Error(err)
				}
				recorded := slices.ContainsFunc(sbs, func(sb *store.Sandbox) bool {
					return slices.ContainsFunc(sb.Mounts, func(m store.Mount) bool { return m.Digest == digest })
				})
				mu.Lock()
				releases = append(releases, recorded)
				mu.Unlock()
			}}, nil
	}
	c := tn.user("alice")
	if _, err := c.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{ImageSpecJson: `{"base":"busybox"}`})); err != nil {
		t.Fatal(err)
	}
	tn.node.mu.Lock()
	tn.node.startErr = errors.New("no room")
	tn.node.mu.Unlock()
	if _, err := c.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{ImageSpecJson: `{"base":"busybox"}`})); err == nil {
		t.Fatal("a create whose start fails succeeded")
	}
	mu.Lock()
	got := slices.Clone(releases)
	mu.Unlock()
	if !slices.Equal(got, []bool{true, true}) {
		t.Fatalf("releases (record there at each): %v, want two, each after the record", got)
	}
}
