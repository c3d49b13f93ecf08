package noderpc

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestLostReadopted: a node goes silent; its sandboxes' calls fail as
// lost and the API records them lost (here: by hand, as api does). When
// it returns within the grace, the one it still runs with the same init
// pid ("up": the fake runs only it, pid 77) is revived through the
// Readopter and placed there again (Wait, Exec reach it; it counts in
// placement and the node's Restore), the one it no longer runs is
// destroyed there. Lost again and back after the grace, "up" is destroyed
// although it runs, and its record stays lost.
func TestLostReadopted(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	r := newRouter(t, c)
	r.LostGrace = time.Minute
	var mu sync.Mutex
	var asked []string
	r.SetReadopter(func(ctx context.Context, id, nodeID string, pid int, since time.Time) bool {
		mu.Lock()
		asked = append(asked, id)
		mu.Unlock()
		sb, err := c.st.ReviveLost(ctx, id, nodeID, pid, since)
		if err != nil {
			t.Error(err)
		}
		return sb != nil
	})
	for i, id := range []string{"up", "gone"} {
		if _, err := r.Start(ctx, node.StartRequest{ID: id, Slot: i + 1, CPU: 1, Memory: 256 << 20}); err != nil {
			t.Fatal(err)
		}
		if err := c.st.CreateSandbox(ctx, &store.Sandbox{ID: id, OrgID: "o", State: store.StateRunning, Slot: i + 1,
			Node: a.id.ID, Pid: 77, CPU: 1, MemoryMB: 256, CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	// loseAndReturn makes a silent past the timeout, records its
	// sandboxes lost as the API does (end, then teardown through the
	// router), and has it heartbeat again at clk.
	clk := useFakeClock(r, c.fleet)
	loseAndReturn := func(ids ...string) {
		t.Helper()
		clk.Add(2 * DefaultHeartbeatTimeout)
		if err := r.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if _, err := r.Wait(ctx, id, 77); !errors.Is(err, node.ErrLost) {
				t.Fatalf("wait %s on a silent node: %v, want node.ErrLost", id, err)
			}
			sb, err := c.st.GetSandbox(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode, sb.Error = store.StateStopped, "lost", time.Now().UTC(), -1, "node a stopped answering"
			if ok, err := c.st.EndSandbox(ctx, sb); err != nil || !ok {
				t.Fatalf("record %s lost: %v %v", id, ok, err)
			}
			if _, err := r.Teardown(id, sb.Slot, node.KeepUpper{}); err != nil {
				t.Fatal(err)
			}
		}
		a.heartbeat(t, c)
		if err := r.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
	}
	calls := func() []string {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		return slices.Clone(a.fake.calls)
	}

	loseAndReturn("up", "gone")
	got := calls()
	if slices.Contains(got, "Destroy up 1") {
		t.Fatalf("a lost sandbox still running on its returned node was destroyed: %q", got)
	}
	if !slices.Contains(got, "Destroy gone 2") {
		t.Errorf("a lost sandbox not running on its returned node was not destroyed: %q", got)
	}
	if sb, _ := c.st.GetSandbox(ctx, "up"); sb.State != store.StateRunning || sb.EndReason != "" || !sb.EndedAt.IsZero() || sb.Error != "" {
		t.Fatalf("re-adopted record: %s %q %v %q, want running with no end", sb.State, sb.EndReason, sb.EndedAt, sb.Error)
	}
	if sb, _ := c.st.GetSandbox(ctx, "gone"); sb.State != store.StateStopped || sb.EndReason != "lost" {
		t.Errorf("gone: %s %q, want stopped lost", sb.State, sb.EndReason)
	}
	if r.NodeOf("up") != a.id.ID || r.NodeOf("gone") != "" {
		t.Errorf("placements after the return: up on %q, gone on %q", r.NodeOf("up"), r.NodeOf("gone"))
	}
	if !slices.Contains(got, "Restore 1") {
		t.Errorf("the returned node was not restored with the re-adopted sandbox: %q", got)
	}
	if _, err := r.Wait(ctx, "up", 77); err != nil {
		t.Errorf("wait on the re-adopted sandbox: %v", err)
	}
	if _, err := r.Exec(ctx, "up", nodeExec(), nil, nil); err != nil {
		t.Errorf("exec in the re-adopted sandbox: %v", err)
	}
	if ns, err := r.Nodes(ctx); err != nil || len(ns) != 1 || ns[0].Sandboxes != 1 || !ns[0].Healthy {
		t.Errorf("nodes after the return: %+v %v, want a healthy with 1 sandbox", ns, err)
	}

	// Lost again; back after the grace: destroyed although running.
	r.LostGrace = time.Nanosecond
	loseAndReturn("up")
	if got := calls(); !slices.Contains(got, "Destroy up 1") {
		t.Errorf("a sandbox back after the grace was not destroyed: %q", got)
	}
	if sb, _ := c.st.GetSandbox(ctx, "up"); sb.State != store.StateStopped || sb.EndReason != "lost" {
		t.Errorf("up after the grace: %s %q, want stopped lost", sb.State, sb.EndReason)
	}
	if r.NodeOf("up") != "" {
		t.Errorf("up still placed on %q after the grace", r.NodeOf("up"))
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Contains(asked, "up") || slices.Contains(asked, "gone") {
		t.Errorf("readopter asked for %q: want up only (gone does not run)", asked)
	}
}

// TestReconcileDoesNotHoldRefresh: a returned node that stops answering in
// the middle of its reconcile (its Restore never returns) does not hold
// Refresh: it returns with the reconcile still running, another node's
// silence is still found at the next Refresh, and the stuck node is not
// reconciled twice at once.
func TestReconcileDoesNotHoldRefresh(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	b := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	r.ReconcileWait = DefaultReconcileWait
	hold := make(chan struct{})
	defer close(hold)
	a.fake.mu.Lock()
	a.fake.restoreHold = hold
	a.fake.mu.Unlock()
	clk := useFakeClock(r, c.fleet)
	clk.Add(2 * DefaultHeartbeatTimeout)
	if err := r.Refresh(ctx); err != nil { // both silent: unhealthy
		t.Fatal(err)
	}
	a.heartbeat(t, c)
	b.heartbeat(t, c)
	if err := r.Refresh(ctx); err != nil { // both back: a's reconcile sticks in Restore
		t.Fatal(err)
	}
	restores := func() int {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		n := 0
		for _, c := range a.fake.calls {
			if strings.HasPrefix(c, "Restore") {
				n++
			}
		}
		return n
	}
	if restores() != 1 {
		t.Fatalf("a restored %d times, want 1 (held)", restores())
	}
	// b goes silent; a answers heartbeats but its Restore still hangs.
	clk.Add(2 * DefaultHeartbeatTimeout)
	a.heartbeat(t, c)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*fleetNode{a, b} {
		healthy := false
		ns, _ := r.Nodes(ctx)
		for _, s := range ns {
			if s.ID == n.id.ID {
				healthy = s.Healthy
			}
		}
		if healthy != (n == a) {
			t.Errorf("node %s healthy %v", n.id.ID, healthy)
		}
	}
	if restores() != 1 {
		t.Errorf("a restored %d times while its reconcile still ran", restores())
	}
}

// TestReconcileStartReadopts: the control plane restarted while node a was
// silent, after its sandboxes were recorded lost; this router (the new
// process) knows of the loss only what the store holds, and a answers at
// its start (within the heartbeat window: it never saw a silent, so no
// return to reconcile). ReconcileStart re-adopts the lost sandbox a still
// runs with the recorded pid ("up"), from its record alone, and does not
// destroy it; the one a no longer runs ("gone") is not revived and its loss
// is final (SetLostFinal), but only once a answered the reconcile: its
// first reconcile's Restores fail (not reached), and the reconcile is done
// again a heartbeat timeout later (not at the very next Refresh).
func TestReconcileStartReadopts(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	a.heartbeat(t, c)
	for i, id := range []string{"up", "gone"} {
		if err := c.st.CreateSandbox(ctx, &store.Sandbox{ID: id, OrgID: "o", State: store.StateRunning, Slot: i + 1,
			Node: a.id.ID, Pid: 77, CPU: 1, MemoryMB: 256, CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
		sb, err := c.st.GetSandbox(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode, sb.Error = store.StateStopped, "lost", time.Now().UTC(), -1, "node a stopped answering"
		if ok, err := c.st.EndSandbox(ctx, sb); err != nil || !ok {
			t.Fatalf("record %s lost: %v %v", id, ok, err)
		}
	}
	r := newRouter(t, c)
	clk := useFakeClock(r, c.fleet)
	r.LostGrace = time.Minute
	r.SetReadopter(func(ctx context.Context, id, nodeID string, pid int, since time.Time) bool {
		sb, err := c.st.ReviveLost(ctx, id, nodeID, pid, since)
		if err != nil {
			t.Error(err)
		}
		return sb != nil
	})
	var mu sync.Mutex
	var final []string
	r.SetLostFinal(func(_ context.Context, id string) {
		mu.Lock()
		final = append(final, id)
		mu.Unlock()
	})
	finals := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(final)
	}
	calls := func() []string {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		return slices.Clone(a.fake.calls)
	}
	a.fake.mu.Lock()
	a.fake.restoreFail = 2 // before the re-adoption, and after it
	a.fake.mu.Unlock()

	r.ReconcileStart(ctx)
	if sb, _ := c.st.GetSandbox(ctx, "up"); sb.State != store.StateRunning || sb.EndReason != "" {
		t.Fatalf("up after the start: %s %q, want re-adopted (running)", sb.State, sb.EndReason)
	}
	if sb, _ := c.st.GetSandbox(ctx, "gone"); sb.State != store.StateStopped || sb.EndReason != "lost" {
		t.Errorf("gone after the start: %s %q, want stopped lost", sb.State, sb.EndReason)
	}
	if r.NodeOf("up") != a.id.ID {
		t.Errorf("up placed on %q, want a", r.NodeOf("up"))
	}
	if got := finals(); len(got) != 0 {
		t.Errorf("losses final before the node answered the reconcile: %q", got)
	}
	// Not again at once (a node that heartbeats but is not reached is
	// not reconciled every second); a heartbeat timeout later a answers:
	// reconciled again, the loss of gone is final.
	a.heartbeat(t, c)
	restores := func() int {
		n := 0
		for _, c := range calls() {
			if strings.HasPrefix(c, "Restore") {
				n++
			}
		}
		return n
	}
	before := restores()
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if restores() != before {
		t.Errorf("reconciled again at once after a reconcile that did not reach the node: %q", calls())
	}
	clk.Add(DefaultHeartbeatTimeout + time.Second)
	a.heartbeat(t, c)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	got := calls()
	if n := slices.Index(got, "Restore 1"); n < 0 || slices.Index(got[n+1:], "Restore 1") < 0 {
		t.Errorf("a restored %q: want twice with the re-adopted sandbox (the first not reached)", got)
	}
	if slices.Contains(got, "Destroy up 1") {
		t.Errorf("the re-adopted sandbox was destroyed: %q", got)
	}
	a.fake.mu.Lock()
	_, kept := a.fake.live["up"]
	a.fake.mu.Unlock()
	if !kept {
		t.Errorf("a's leftovers were removed without the re-adopted sandbox in its live set")
	}
	if got := finals(); !slices.Equal(got, []string{"gone"}) {
		t.Errorf("losses final: %q, want gone", got)
	}
}

// TestReconcileSparesCreateMeanwhile: the leader's reconcile of a node
// reads the sandboxes live there, then has the node list what it holds of
// no live sandbox and removes it. A sandbox created through another
// replica in between (reserved, recorded, started there) is on the node
// but not in that live set: it is not removed (the leftovers are checked
// again under the placement lock), nor is one this router reserved there
// meanwhile (its record not written yet), while a real leftover ("old")
// is. On PostgreSQL the replica has a store of its own on the same
// database, as a second control-plane process: the placement lock is the
// database's advisory lock and the leader learns the replica's placement
// from its record alone.
func TestReconcileSparesCreateMeanwhile(t *testing.T) {
	eachDatabase(t, testReconcileSparesCreateMeanwhile)
}

func testReconcileSparesCreateMeanwhile(t *testing.T, db database) {
	c := db.control(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	rst := db.replica(t, c)
	leader := newRouter(t, c)
	replica := NewRouter(rst, c.ca, c.cert, nil)
	replica.ReconcileWait = time.Minute
	if err := replica.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	replica.Leading = func() bool { return false }
	const id, own = "sb-fresh", "sb-own"
	leader.beforeLeftovers = func(nodeID string) {
		slot, err := replica.ReserveSlot(node.StartRequest{ID: id, CPU: 1, Memory: 256 << 20})
		if err != nil {
			t.Error(err)
			return
		}
		err = rst.CreateSandbox(ctx, &store.Sandbox{ID: id, OrgID: "o", State: store.StateCreating, Slot: slot,
			Node: replica.NodeOf(id), CPU: 1, MemoryMB: 256, CreatedAt: time.Now()})
		replica.Recorded(id)
		if err != nil {
			t.Error(err)
			return
		}
		if _, err := replica.Start(ctx, node.StartRequest{ID: id, Slot: slot, CPU: 1, Memory: 256 << 20}); err != nil {
			t.Error(err)
		}
		// One through the leader itself, reserved, its record not yet
		// written (a node may list what it is starting).
		if _, err := leader.ReserveSlot(node.StartRequest{ID: own, CPU: 1, Memory: 256 << 20}); err != nil {
			t.Error(err)
		}
		a.fake.mu.Lock()
		a.fake.left = append(a.fake.left, id, own)
		a.fake.mu.Unlock()
	}
	leader.ReconcileStart(ctx)
	a.fake.mu.Lock()
	calls := slices.Clone(a.fake.calls)
	a.fake.mu.Unlock()
	if !slices.Contains(calls, "Start "+id) {
		t.Fatalf("the create through the replica did not reach the node: %q", calls)
	}
	defer leader.Recorded(own)
	for _, c := range calls {
		if strings.HasPrefix(c, "Destroy "+id+" ") || strings.HasPrefix(c, "Destroy "+own+" ") {
			t.Fatalf("a sandbox created through another replica during the reconcile was removed as a leftover: %q", calls)
		}
	}
	if !slices.Contains(calls, "Destroy old 0") {
		t.Errorf("the node's real leftover was not removed: %q", calls)
	}
	if leader.NodeOf(id) != a.id.ID {
		t.Errorf("the leader places %s on %q, want a", id, leader.NodeOf(id))
	}
}
