package api

import (
	"context"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestSnapshotOrgView: a snapshot is in its org's view only: the org
// creates from it, another org gets not_found by every spelling the
// snapshot was recorded under; pause shows state paused and refuses exec
// with failed_precondition; a stopped sandbox cannot be snapshotted.
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
	st, err = alice.sandbox.Snapshot(ctx, connect.NewRequest(&v1.SnapshotSandboxRequest{SandboxId: sb.Msg.Id}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("snapshot of a stopped sandbox: %v, want failed_precondition", err)
	}
}
