package api

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestSnapshotOrgView: a snapshot is in its org's view only: the org
// creates from it, another org gets not_found by every spelling the
// snapshot was recorded under; pause shows state paused and refuses exec
// with failed_precondition; a stopped sandbox is snapshotted from its kept
// layer, but not paused.
func TestSnapshotOrgView(t *testing.T) {
	tn := newTestNode(t, Config{})
	ctx := context.Background()
	alice, bob := tn.user("alice"), tn.user("bob")
	sb, err := alice.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	st, err := alice.sandbox.Snapshot(ctx, connect.NewRequest(&v1.SnapshotSandboxRequest{SandboxId: sb.Msg.Id}))
	if err != nil {
		t.Fatal(err)
	}
	var img *v1.Image
	for st.Receive() {
		if st.Msg().Image != nil {
			img = st.Msg().Image
		}
	}
	if err := st.Err(); err != nil || img == nil {
		t.Fatalf("snapshot: %v, image %v", err, img)
	}
	if _, err := alice.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: img.Ref})); err != nil {
		t.Fatalf("create from own snapshot %s: %v", img.Ref, err)
	}
	for _, ref := range []string{img.Ref, img.Digest, img.LocalRef} {
		_, err := bob.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: ref}))
		if connect.CodeOf(err) != connect.CodeNotFound {
			t.Errorf("org b creates from org a's snapshot %s: %v, want not_found", ref, err)
		}
	}

	p, err := alice.sandbox.Pause(ctx, connect.NewRequest(&v1.PauseSandboxRequest{SandboxId: sb.Msg.Id}))
	if err != nil || p.Msg.State != "paused" {
		t.Fatalf("pause: %v, state %q", err, p.Msg.GetState())
	}
	ex, err := alice.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Msg.Id, Argv: []string{"true"}}))
	if err == nil {
		for ex.Receive() {
		}
		err = ex.Err()
	}
	if connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("exec while paused: %v, want failed_precondition", err)
	}
	r, err := alice.sandbox.Resume(ctx, connect.NewRequest(&v1.ResumeSandboxRequest{SandboxId: sb.Msg.Id}))
	if err != nil || r.Msg.State != "running" {
		t.Fatalf("resume: %v, state %q", err, r.Msg.GetState())
	}
	if _, err := alice.sandbox.Pause(ctx, connect.NewRequest(&v1.PauseSandboxRequest{SandboxId: sb.Msg.Id})); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Msg.Id})); err != nil {
		t.Fatalf("terminate paused: %v", err)
	}
	if got, err := snapshot(ctx, alice, sb.Msg.Id); err != nil || got.Digest != img.Digest {
		t.Errorf("snapshot of a stopped sandbox (layer kept): %v %v, want %s", got, err, img.Digest)
	}
	if _, err := alice.sandbox.Pause(ctx, connect.NewRequest(&v1.PauseSandboxRequest{SandboxId: sb.Msg.Id})); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("pause of a stopped sandbox: %v, want failed_precondition", err)
	}
}

// snapshot runs a Snapshot to its end and returns the image.
func snapshot(ctx context.Context, c clients, id string) (*v1.Image, error) {
	st, err := c.sandbox.Snapshot(ctx, connect.NewRequest(&v1.SnapshotSandboxRequest{SandboxId: id}))
	if err != nil {
		return nil, err
	}
	var img *v1.Image
	for st.Receive() {
		if st.Msg().Image != nil {
			img = st.Msg().Image
		}
	}
	return img, st.Err()
}

// TestSnapshotStoppedBounded: a stopped sandbox's writable layer is kept
// within its org's budget (KeepStoppedMB): one that does not fit is not
// kept and its snapshot is failed_precondition naming why, another org's
// budget is its own; after the grace period (KeepStopped) the layer is
// gone: failed_precondition; with KeepStopped < 0 nothing is kept.
func TestSnapshotStoppedBounded(t *testing.T) {
	ctx := context.Background()
	const grace = 300 * time.Millisecond
	tn := newTestNode(t, Config{KeepStopped: grace, KeepStoppedMB: 1})
	tn.node.keepSize = 600 << 10 // two do not fit in 1 MiB
	stopped := func(c clients) string {
		t.Helper()
		sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
		if _, err := c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id})); err != nil {
			t.Fatal(err)
		}
		return sb.Id
	}
	alice, bob := tn.user("alice"), tn.user("bob")
	first, second, other := stopped(alice), stopped(alice), stopped(bob)
	if _, err := snapshot(ctx, alice, first); err != nil {
		t.Fatalf("first stopped sandbox: %v", err)
	}
	_, err := snapshot(ctx, alice, second)
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "1 MiB") {
		t.Fatalf("over the org's budget: %v, want failed_precondition naming it", err)
	}
	if _, err := snapshot(ctx, bob, other); err != nil {
		t.Fatalf("another org's stopped sandbox: %v", err)
	}
	// The grace period is wall-clock time under test: wait it out.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := snapshot(ctx, alice, first)
		if connect.CodeOf(err) == connect.CodeFailedPrecondition {
			break
		}
		if err != nil || time.Now().After(deadline) {
			t.Fatalf("after the grace period: %v, want failed_precondition", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Expired layers leave the org's budget.
	if again := stopped(alice); again != "" {
		if _, err := snapshot(ctx, alice, again); err != nil {
			t.Fatalf("after the expiry, within the budget again: %v", err)
		}
	}

	off := newTestNode(t, Config{KeepStopped: -1})
	id := stopped(off.user("alice"))
	if _, err := snapshot(ctx, off.user("alice"), id); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("nothing kept: %v, want failed_precondition", err)
	}
}
