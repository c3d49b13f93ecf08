package node

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// waitPool waits until cond holds for the pool (checked under its lock at
// every change), or fails the test after 10s.
func waitPool(t *testing.T, p *warmPool, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		ok, ch := cond(), p.changed
		p.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("pool never got to: %s", what)
		}
	}
}

// poolCfg is a node of 20 slots: 1..14 for the control plane, 15..18 the
// pool's, 19..20 reserved.
func poolCfg() Config {
	return Config{ReservedSlots: 2, Pool: PoolConfig{Slots: 4, FillDelay: time.Millisecond}}
}

// TestPoolClaimActivates: a claim hands out a ready member's id and slot
// in the pool's range; Start activates it (no second container) with the
// request's env, workdir, entrypoint and limits; the pool refills.
func TestPoolClaimActivates(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	a := testAgent(t, poolCfg(), rt, n)
	if lo, hi := a.Slots().Range(SlotSandbox); lo != 1 || hi != 14 {
		t.Fatalf("sandbox slots %d..%d, want 1..14", lo, hi)
	}
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 2, nil); err != nil {
		t.Fatal(err)
	}
	for slot, id := range n.slots() {
		if slot < 15 || slot > 18 {
			t.Fatalf("member %s in slot %d, outside the pool's 15..18", id, slot)
		}
	}
	req := StartRequest{Image: img, Env: []string{"A=1"}, Workdir: "/w", Entrypoint: []string{"sh"}, CPU: 0.5, DiskMB: 64}
	id, slot, ok := a.Claim(req)
	if !ok || slot < 15 || slot > 18 {
		t.Fatalf("claim: %s %d %v", id, slot, ok)
	}
	starts := len(rt.starts)
	req.ID, req.Slot = id, slot
	st, err := a.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if pid, _ := rt.Running(ctx, id); st.Pid != pid || st.Net == nil || st.Net.Slot != slot {
		t.Fatalf("started %+v, want the member's pid %d and net", st, pid)
	}
	if len(rt.starts) != starts {
		t.Fatal("a claimed sandbox was started afresh")
	}
	act := rt.Init(id).(*fakeInit).activation()
	if act == nil || strings.Join(act.Env, ",") != "A=1" || act.Dir != "/w" || act.Entrypoint[0] != "sh" {
		t.Fatalf("activation %+v", act)
	}
	if rt.limits[id][0] != 0.5 || rt.disks[id] != 64 {
		t.Fatalf("limits %v disk %d", rt.limits[id], rt.disks[id])
	}
	if _, err := os.Stat(filepath.Join(a.cfg.Pool.Dir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the activated sandbox is still in the pool's journal: %v", err)
	}
	// Refilled to 2 ready besides the activated one.
	waitPool(t, a.pool, "2 ready again", func() bool { return len(a.pool.ready[img.Digest]) == 2 && !a.pool.filling })
	if got := len(n.slots()); got != 3 {
		t.Fatalf("%d slots in use, want 3", got)
	}
	// The activated sandbox is the control plane's now: Destroy frees it.
	if err := a.Destroy(ctx, id, slot); err != nil {
		t.Fatal(err)
	}
	if left, _ := a.Leftovers(ctx, nil); len(left) != 0 {
		t.Fatalf("leftovers beside the pool's members: %v", left)
	}
}

// TestPoolYieldsToStarts: while a create starts a sandbox (cold), a claim's
// refill starts no member; once the start ends, the pool fills up again.
func TestPoolYieldsToStarts(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	a := testAgent(t, poolCfg(), rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 1, nil); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	n.gate = func(id string) {
		if id == "sb-cold" {
			close(entered)
			<-release
		}
	}
	started := make(chan error, 1)
	go func() {
		_, err := a.Start(ctx, StartRequest{ID: "sb-cold", Slot: 1, Image: img})
		started <- err
	}()
	<-entered
	id, _, ok := a.Claim(StartRequest{Image: img})
	if !ok {
		t.Fatal("no member to claim")
	}
	memberStarts := len(rt.starts)
	// The claim's refill ran (its timer fired and the fill ended) and
	// started nothing.
	waitPool(t, a.pool, "the claim's refill to run", func() bool { return a.pool.timer == nil && !a.pool.filling })
	a.pool.mu.Lock()
	ready, starting := len(a.pool.ready[img.Digest]), a.pool.starting[img.Digest]
	a.pool.mu.Unlock()
	rt.mu.Lock()
	got := len(rt.starts)
	rt.mu.Unlock()
	if ready != 0 || starting != 0 || got != memberStarts {
		t.Fatalf("during a create's start: %d ready, %d starting, %d runtime starts (want 0, 0, %d)", ready, starting, got, memberStarts)
	}
	close(release)
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	waitPool(t, a.pool, "1 ready after the start", func() bool { return len(a.pool.ready[img.Digest]) == 1 })
	a.Unclaim(id)
	if err := a.Destroy(ctx, "sb-cold", 1); err != nil {
		t.Fatal(err)
	}
}

// TestPoolClaimRace: concurrent claims never hand one member out twice and
// never more than are ready; unclaimed members are destroyed, not reused.
func TestPoolClaimRace(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	cfg.Pool.FillDelay = time.Hour // no refill while racing
	a := testAgent(t, cfg, rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 3, nil); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string]int{}
	var wg sync.WaitGroup
	for range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if id, slot, ok := a.Claim(StartRequest{Image: img}); ok {
				mu.Lock()
				got[id] = slot
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	slots := map[int]bool{}
	for _, s := range got {
		slots[s] = true
	}
	if len(got) != 3 || len(slots) != 3 {
		t.Fatalf("12 claims on 3 members handed out %v", got)
	}
	for id := range got {
		a.Unclaim(id)
		if _, running := rt.Running(ctx, id); running {
			t.Fatalf("unclaimed %s still runs", id)
		}
		a.Unclaim(id) // twice: a no-op
	}
	// The freed slots are refilled with new members (kicked at once).
	waitPool(t, a.pool, "3 new members", func() bool {
		return len(a.pool.ready[img.Digest]) == 3 && !a.pool.filling && a.pool.dropping == 0
	})
	for id := range a.pool.members() {
		if _, reused := got[id]; reused {
			t.Fatalf("unclaimed %s was put back", id)
		}
	}
}

// TestPoolDeadMember: a claimed member that died is replaced by a fresh
// start with the same id and slot.
func TestPoolDeadMember(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	a := testAgent(t, poolCfg(), rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 1, nil); err != nil {
		t.Fatal(err)
	}
	id, slot, ok := a.Claim(StartRequest{Image: img})
	if !ok {
		t.Fatal("no claim")
	}
	rt.kill(id)
	st, err := a.Start(ctx, StartRequest{ID: id, Slot: slot, Image: img, Env: []string{"A=1"}})
	if err != nil {
		t.Fatal(err)
	}
	// (The pool may be refilling meanwhile: its starts are other ids.)
	rt.mu.Lock()
	var mine []sandbox.Spec
	for _, sp := range rt.starts {
		if sp.ID == id {
			mine = append(mine, sp)
		}
	}
	rt.mu.Unlock()
	if len(mine) != 2 || !slices.Contains(mine[1].Env, "A=1") || st.Net.Slot != slot {
		t.Fatalf("starts of %s: %+v, net %+v; want the member's and a fresh one", id, mine, st.Net)
	}
}

// TestPoolClaimFits: only requests a member can become are claimed.
func TestPoolClaimFits(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	a := testAgent(t, poolCfg(), rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 1, nil); err != nil {
		t.Fatal(err)
	}
	for _, req := range []StartRequest{
		{Image: img, Pids: 10},
		{Image: img, User: "1000"},
		{Image: img, Binds: []sandbox.Bind{{Source: "/x", Dest: "/y"}}},
		{Image: testImage("other")},
		{},
	} {
		if id, _, ok := a.Claim(req); ok {
			t.Errorf("claimed %s for %+v", id, req)
		}
	}
	rt.canUpdate = false // gVisor: limits cannot be set on a running sandbox
	if _, _, ok := a.Claim(StartRequest{Image: img, CPU: 1}); ok {
		t.Error("claimed with cpu limits on a runtime that cannot update them")
	}
	if _, _, ok := a.Claim(StartRequest{Image: img}); !ok {
		t.Error("a plain request was not claimed")
	}
}

// TestPoolEvicts: automatic pooling keeps Size members of the Images most
// recently used images; older images' members are destroyed.
func TestPoolEvicts(t *testing.T) {
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	cfg.Pool.Size, cfg.Pool.Images = 1, 2
	a := testAgent(t, cfg, rt, n)
	imgs := []string{"a", "b", "c"}
	for _, name := range imgs {
		// A use; a member can be ready already (a fill ran while the claim
		// evicted another image's): that claim is given back.
		if id, _, ok := a.Claim(StartRequest{Image: testImage(name)}); ok {
			a.Unclaim(id)
		}
		waitPool(t, a.pool, name+" pooled", func() bool {
			return len(a.pool.ready["sha256:"+name]) == 1 && !a.pool.filling && a.pool.timer == nil && a.pool.dropping == 0
		})
	}
	a.pool.mu.Lock()
	ready := map[string]int{}
	for d, ms := range a.pool.ready {
		ready[d] = len(ms)
	}
	a.pool.mu.Unlock()
	if len(ready) != 2 || ready["sha256:b"] != 1 || ready["sha256:c"] != 1 {
		t.Fatalf("ready %v, want one each of b and c", ready)
	}
	if got := len(rt.ids()); got != 2 {
		t.Fatalf("containers %v, want 2 (a's member destroyed)", rt.ids())
	}
}

// TestPoolSlots: members stay in the pool's range, never take a slot a
// sandbox still holds (its teardown has not ended), and fail cleanly when
// the range is full.
func TestPoolSlots(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	a := testAgent(t, cfg, rt, n)
	if err := a.Slots().Hold("sb-ending", 15); err != nil {
		t.Fatal(err)
	}
	img := testImage("busybox")
	err := a.SetPrestarted(ctx, img, 4, nil)
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("4 members with a busy slot: %v", err)
	}
	for slot := range n.slots() {
		if slot < 16 || slot > 18 {
			t.Fatalf("member in slot %d", slot)
		}
	}
	if err := a.SetPrestarted(ctx, img, 5, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("more than the pool's slots: %v", err)
	}
	if err := a.SetPrestarted(ctx, img, 0, nil); err != nil {
		t.Fatal(err)
	}
	if len(n.slots()) != 0 {
		t.Fatalf("count 0 left %v", n.slots())
	}
	if _, err := newAgent(Config{ReservedSlots: 2, Pool: PoolConfig{Slots: 30, Dir: t.TempDir(), NewID: func() string { return "x" }}}, rt, n); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("pool larger than the range: %v", err)
	}
}

// TestPoolFailedStart: a member that fails to start frees its slot and
// journal; SetPrestarted reports it.
func TestPoolFailedStart(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	rt.startErr = func(sandbox.Spec) error { return errors.New("runc: boom") }
	a := testAgent(t, poolCfg(), rt, n)
	err := a.SetPrestarted(ctx, testImage("busybox"), 1, nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("SetPrestarted: %v", err)
	}
	if len(n.slots()) != 0 || len(a.pool.members()) != 0 {
		t.Fatalf("left slots %v members %v", n.slots(), a.pool.members())
	}
	if ents, _ := os.ReadDir(a.cfg.Pool.Dir); len(ents) != 0 {
		t.Fatalf("journal not emptied: %v", ents)
	}
}

// TestPoolRestart: a new process reaps the previous one's members (its
// journal) except those that became live sandboxes, and restores the counts.
func TestPoolRestart(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	cfg.Pool.Dir, cfg.Pool.CountsFile = t.TempDir(), filepath.Join(t.TempDir(), "counts.json")
	cfg.Pool.NewID = func() string { return newTestID() }
	old := testAgent(t, cfg, rt, n)
	img := testImage("busybox")
	if err := old.SetPrestarted(ctx, img, 2, nil); err != nil {
		t.Fatal(err)
	}
	id, slot, _ := old.Claim(StartRequest{Image: img})
	// The old process dies here (no ClosePool): id became a live sandbox
	// (recorded, not yet activated); the other member is a leftover.
	old.pool.mu.Lock()
	old.pool.closed = true
	old.pool.mu.Unlock()
	os.WriteFile(filepath.Join(cfg.Pool.Dir, "sb-garbage"), []byte("nope"), 0o600)

	cfg.Cache = old.cfg.Cache
	a, err := newAgent(cfg, rt, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.ClosePool)
	err = a.ReapPool(ctx, map[string]int{id: slot})
	if err == nil || !strings.Contains(err.Error(), "sb-garbage") {
		t.Fatalf("reap: %v", err)
	}
	if got := rt.ids(); len(got) != 1 || got[0] != id {
		t.Fatalf("after the reap: %v, want only %s", got, id)
	}
	if ents, _ := os.ReadDir(cfg.Pool.Dir); len(ents) != 0 {
		t.Fatalf("journal: %v", ents)
	}
	// The counts come back for images still in the node cache (this one
	// never was: its count goes).
	if err := a.RestorePool(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(cfg.Pool.CountsFile)
	if string(b) != "{}" {
		t.Fatalf("counts %s", b)
	}
}

var testIDs struct {
	sync.Mutex
	n int
}

// newTestID returns ids unique within the test binary.
func newTestID() string {
	testIDs.Lock()
	defer testIDs.Unlock()
	testIDs.n++
	return "sb-t" + strconv.Itoa(testIDs.n)
}

// TestPoolSurvivesRestore: a fleet node is restored (Agent.Restore, which
// reaps the pool journal) while its pool runs, each time its control plane
// starts or finds it back. The ready members of this process stay ready and
// claimable; only a previous process's journal entries are reaped.
func TestPoolSurvivesRestore(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	cfg.Pool.Dir = t.TempDir()
	cfg.Pool.NewID = func() string { return newTestID() }
	a := testAgent(t, cfg, rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 2, nil); err != nil {
		t.Fatal(err)
	}
	if got := a.Prestarted(img.Digest); got != 2 {
		t.Fatalf("Prestarted: %d ready, want 2", got)
	}
	// A previous process's member (its journal entry; nothing runs).
	if err := os.WriteFile(filepath.Join(cfg.Pool.Dir, "sb-old"), []byte("16"), 0o600); err != nil {
		t.Fatal(err)
	}
	members := rt.ids()
	if err := a.Restore(ctx, map[string]int{}); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if got := rt.ids(); !slices.Equal(got, members) {
		t.Fatalf("after a restore: running %v, want the members %v", got, members)
	}
	if _, err := os.Stat(filepath.Join(cfg.Pool.Dir, "sb-old")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the previous process's journal entry is still there: %v", err)
	}
	if got := a.Prestarted(img.Digest); got != 2 {
		t.Fatalf("after a restore: %d ready, want 2", got)
	}
	id, _, ok := a.Claim(StartRequest{Image: img})
	if !ok || !slices.Contains(members, id) {
		t.Fatalf("claim after a restore: %q %v, want one of %v", id, ok, members)
	}
}

// TestReapSparesMembersStartedMeanwhile: a fleet node's pool runs while the
// control plane restores it (its start, a returned node). A member the pool
// starts while ReapPool runs, and a member claimed and activated meanwhile
// (a create through another replica), are this process's: neither is
// destroyed, and the reap reports no error. Before, ReapPool read the
// pool's members before the journal, so a member started in between was
// taken for a previous process's and destroyed (then claimable, and its
// sandbox destroyed under a user's create).
func TestReapSparesMembersStartedMeanwhile(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := poolCfg()
	cfg.Pool.Dir = t.TempDir()
	cfg.Pool.NewID = func() string { return newTestID() }
	a := testAgent(t, cfg, rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 1, nil); err != nil {
		t.Fatal(err)
	}
	var activated string
	a.reapHook = func() {
		a.reapHook = nil
		// A create claims a member and activates it...
		req := StartRequest{Image: img}
		id, slot, ok := a.Claim(req)
		if !ok {
			t.Error("no member to claim")
			return
		}
		req.ID, req.Slot = id, slot
		if _, err := a.Start(ctx, req); err != nil {
			t.Error(err)
			return
		}
		activated = id
		// ...and the pool grows (members started now).
		if err := a.SetPrestarted(ctx, img, 2, nil); err != nil {
			t.Error(err)
		}
	}
	if err := a.Restore(ctx, map[string]int{}); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if activated == "" {
		t.Fatal("the hook did not run")
	}
	waitPool(t, a.pool, "the refill done", func() bool { return !a.pool.filling && a.pool.timer == nil })
	running := rt.ids()
	for id := range a.pool.members() {
		if !slices.Contains(running, id) {
			t.Errorf("member %s was destroyed by the reap (running: %v)", id, running)
		}
	}
	if !slices.Contains(running, activated) {
		t.Errorf("the activated sandbox %s was destroyed by the reap (running: %v)", activated, running)
	}
	if got := a.Prestarted(img.Digest); got != 2 {
		t.Errorf("%d ready after the reap, want 2", got)
	}
}

// TestPoolClaimFirstExecNoDial: a claimed sandbox's activation leaves its
// connection to init with the client the sandbox's execs use: the first
// execs make no dial of their own (before, each claim cost the activation's
// dial and the first exec's).
func TestPoolClaimFirstExecNoDial(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	rt.procs = true
	a := testAgent(t, poolCfg(), rt, n)
	img := testImage("busybox")
	if err := a.SetPrestarted(ctx, img, 1, nil); err != nil {
		t.Fatal(err)
	}
	req := StartRequest{Image: img, Env: []string{"A=1"}}
	id, slot, ok := a.Claim(req)
	if !ok {
		t.Fatal("no claim")
	}
	req.ID, req.Slot = id, slot
	d0 := rt.dials.Load()
	if _, err := a.Start(ctx, req); err != nil {
		t.Fatal(err)
	}
	if act := rt.Init(id).(*fakeInit).activation(); act == nil || strings.Join(act.Env, ",") != "A=1" {
		t.Fatalf("activation %+v", act)
	}
	for i := range 3 {
		out, _, st := execWait(t, a, id, procapi.ExecRequest{Argv: []string{"sh", "-c", "echo $0; exit $0", strconv.Itoa(i)}}, "")
		if out != strconv.Itoa(i)+"\n" || st.Code != i {
			t.Fatalf("exec %d: %q %d", i, out, st.Code)
		}
	}
	if d := rt.dials.Load() - d0; d != 1 {
		t.Fatalf("the activation and 3 execs dialled %d times, want 1", d)
	}
	if err := a.Destroy(ctx, id, slot); err != nil {
		t.Fatal(err)
	}
	if n := a.pooledInits(); n != 0 {
		t.Fatalf("%d sandboxes pooled after the destroy", n)
	}
}
