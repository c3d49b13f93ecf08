package api

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// fakeLease is a Leadership the test flips.
type fakeLease struct{ held atomic.Bool }

func (f *fakeLease) Leading() bool { return f.held.Load() }

// TestLeaderOnlyTimers: a replica that does not hold the leader lease
// never ends a sandbox whose lifetime ran out, nor records an end its
// watch saw; once it takes the lease, the overdue timer fires within a
// few polls and the end is recorded (once: a second record is refused).
func TestLeaderOnlyTimers(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lease := &fakeLease{}
	lease.held.Store(true) // create as the leader, then lose the lease
	tn := newTestNode(t, Config{Leader: lease})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", TimeoutSeconds: 1})
	lease.held.Store(false)
	time.Sleep(1500 * time.Millisecond) // past the lifetime, as a follower (a timer that must not fire)
	rec, err := tn.store.GetSandbox(ctx, sb.Id)
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != store.StateRunning || !tn.srv.IsRunning(ctx, sb.Id) {
		t.Fatalf("a follower ended a sandbox at its timeout: %s %s", rec.State, rec.EndReason)
	}
	lease.held.Store(true)
	if got := waitSandbox(t, c, sb.Id); got.EndReason != "timeout" {
		t.Fatalf("ended as %q after taking the lease, want timeout", got.EndReason)
	}
	rec, _ = tn.store.GetSandbox(ctx, sb.Id)
	again := *rec
	again.EndReason = "exited"
	if ok, err := tn.store.EndSandbox(ctx, &again); err != nil || ok {
		t.Fatalf("a second record of the end: %v, %v", ok, err)
	}
}

// TestFollowerAdopts: a replica watches a running sandbox another replica
// recorded (SyncReplicas), so it counts as live there (identity, Wait).
func TestFollowerAdopts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lease := &fakeLease{}
	tn := newTestNode(t, Config{Leader: lease})
	now := time.Now().UTC()
	rec := &store.Sandbox{ID: "sb-other", OrgID: "a", State: store.StateRunning, Slot: 7, Pid: 42,
		CreatedAt: now, StartedAt: now, Timeout: time.Hour}
	tn.node.run(rec.ID, 42)
	if err := tn.store.CreateSandbox(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if tn.srv.IsActive(ctx, rec.ID) {
		t.Fatal("live before the sync")
	}
	if err := tn.srv.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if !tn.srv.IsActive(ctx, rec.ID) {
		t.Fatal("a sandbox another replica started is not live on this one after the sync")
	}
}

// TestIdleAcrossReplicas: the leader does not end a sandbox as idle while
// another replica records activity on it in the store; once that stops,
// the leader ends it as idle.
func TestIdleAcrossReplicas(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lease := &fakeLease{}
	lease.held.Store(true)
	tn := newTestNode(t, Config{Leader: lease})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox", IdleTimeoutSeconds: 1})
	// Another replica serves it: its activity reaches the leader only
	// through the store, for 3 idle timeouts.
	until := time.Now().Add(3 * time.Second)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(until) {
		if err := tn.store.TouchSandbox(ctx, sb.Id, time.Now()); err != nil {
			t.Fatal(err)
		}
		if rec, _ := tn.store.GetSandbox(ctx, sb.Id); rec.State != store.StateRunning {
			t.Fatalf("ended as %q while another replica used it", rec.EndReason)
		}
		<-tick.C
	}
	if got := waitSandbox(t, c, sb.Id); got.EndReason != "idle" {
		t.Fatalf("ended as %q, want idle", got.EndReason)
	}
}

// TestGoneNotAdopted: a running record whose sandbox does not run on its
// node (its replica died before seeing the end; its pid may be another
// process's by now) is not watched; the leader records its end.
func TestGoneNotAdopted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lease := &fakeLease{}
	tn := newTestNode(t, Config{Leader: lease})
	now := time.Now().UTC()
	rec := &store.Sandbox{ID: "sb-gone", OrgID: "a", State: store.StateRunning, Slot: 8, Pid: 43,
		CreatedAt: now, StartedAt: now, Timeout: time.Hour}
	if err := tn.store.CreateSandbox(ctx, rec); err != nil {
		t.Fatal(err)
	}
	if err := tn.srv.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got, _ := tn.store.GetSandbox(ctx, rec.ID); tn.srv.IsActive(ctx, rec.ID) || got.State != store.StateRunning {
		t.Fatalf("a follower adopted or ended a gone sandbox: active %v, %s", tn.srv.IsActive(ctx, rec.ID), got.State)
	}
	lease.held.Store(true)
	if err := tn.srv.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := tn.store.GetSandbox(ctx, rec.ID)
	if tn.srv.IsActive(ctx, rec.ID) || got.State != store.StateStopped || got.EndReason != "exited" || got.ExitCode != -1 {
		t.Fatalf("the leader on a gone sandbox: active %v, %+v", tn.srv.IsActive(ctx, rec.ID), got)
	}
	if tn.node.destroyed(rec.ID) == 0 {
		t.Fatal("what the gone sandbox left on its node was not destroyed")
	}
}

// TestFollowerDoesNotDecideLost: a replica that does not lead and sees a
// sandbox's node stop answering does not end it (it may be cut off from
// the node alone); once it leads, it records the sandbox lost.
func TestFollowerDoesNotDecideLost(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	lease := &fakeLease{}
	lease.held.Store(true)
	tn := newTestNode(t, Config{Leader: lease})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	lease.held.Store(false)
	tn.node.loseSandbox(sb.Id)
	time.Sleep(4 * leaderPoll) // what a follower must not do in that time: record the loss
	if rec, _ := tn.store.GetSandbox(ctx, sb.Id); rec.State != store.StateRunning {
		t.Fatalf("a follower recorded a sandbox lost: %s %s", rec.State, rec.EndReason)
	}
	lease.held.Store(true)
	if got := waitSandbox(t, c, sb.Id); got.EndReason != "lost" {
		t.Fatalf("ended %q once leading, want lost", got.EndReason)
	}
}
