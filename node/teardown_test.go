package node

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// startCold starts a sandbox the way the control plane does: a slot from
// the node, then Start.
func startCold(t *testing.T, a *Agent, id string) int {
	t.Helper()
	slot, err := a.ReserveSlot(StartRequest{ID: id})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Start(context.Background(), StartRequest{ID: id, Slot: slot, Image: testImage("busybox")}); err != nil {
		t.Fatal(err)
	}
	return slot
}

// TestTeardownAsync: Kill ends the sandbox's processes and leaves the
// rest; Teardown returns at once, journalled, and removes the container and
// the network in the background; the slot stays held (no other sandbox
// gets it) until the teardown has ended, and Leftovers waits for it.
func TestTeardownAsync(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	cfg := Config{TeardownDir: t.TempDir()}
	release := make(chan struct{})
	held := make(chan string, 1)
	cfg.TeardownHold = func(id string) { held <- id; <-release }
	a := testAgent(t, cfg, rt, n)
	slot := startCold(t, a, "sb-a")
	pid, _ := rt.Running(ctx, "sb-a")
	type exit struct {
		code int
		err  error
	}
	waited := make(chan exit, 1)
	go func() { ex, err := a.Wait(ctx, "sb-a", pid); waited <- exit{ex.Code, err} }()
	if err := a.Kill(ctx, "sb-a"); err != nil {
		t.Fatal(err)
	}
	if ex := <-waited; ex.err != nil || ex.code != 137 {
		t.Fatalf("wait after kill: %+v", ex)
	}
	if _, running := rt.Running(ctx, "sb-a"); running || rt.destroys["sb-a"] != 0 {
		t.Fatal("kill: still running, or destroyed already")
	}
	if _, err := a.Teardown("sb-a", slot, KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	if got := <-held; got != "sb-a" {
		t.Fatalf("held %s", got)
	}
	// In the middle: the container is gone, the network not yet.
	if rt.destroys["sb-a"] != 1 || n.slots()[slot] != "sb-a" {
		t.Fatalf("mid-teardown: container destroys %d, network slots %v", rt.destroys["sb-a"], n.slots())
	}
	if b, err := os.ReadFile(filepath.Join(cfg.TeardownDir, "sb-a")); err != nil || string(b) != "1" {
		t.Fatalf("journal: %q %v", b, err)
	}
	if !a.TearingDown("sb-a") {
		t.Fatal("not tearing down")
	}
	if other := startCold(t, a, "sb-b"); other == slot {
		t.Fatalf("slot %d given to another sandbox before its teardown ended", slot)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := a.Leftovers(short, map[string]int{"sb-b": 2}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("leftovers during a teardown: %v, want it to wait", err)
	}
	close(release)
	if err := a.WaitTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Slots().Of("sb-a"); ok || n.slots()[slot] != "" {
		t.Fatalf("after the teardown: slot held %v, network %v", ok, n.slots())
	}
	if _, err := os.Stat(filepath.Join(cfg.TeardownDir, "sb-a")); !os.IsNotExist(err) {
		t.Fatalf("journal left: %v", err)
	}
	if left, err := a.Leftovers(ctx, map[string]int{"sb-b": 2}); err != nil || len(left) != 0 {
		t.Fatalf("leftovers: %v %v", left, err)
	}
	if again := startCold(t, a, "sb-c"); again != slot {
		t.Fatalf("after the teardown: slot %d, want the freed %d", again, slot)
	}
}

// TestTeardownRestart: a process that dies in the middle of a teardown
// leaves its journal; the next one, at Restore, holds that slot, finishes
// the teardown and frees it, and holds the live sandboxes' slots.
func TestTeardownRestart(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	dir := t.TempDir()
	release := make(chan struct{})
	defer close(release)
	held := make(chan string, 1)
	old := testAgent(t, Config{TeardownDir: dir, TeardownHold: func(id string) { held <- id; <-release }}, rt, n)
	live := startCold(t, old, "sb-live")
	dead := startCold(t, old, "sb-dead")
	if err := old.Kill(ctx, "sb-dead"); err != nil {
		t.Fatal(err)
	}
	if _, err := old.Teardown("sb-dead", dead, KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	<-held // the old process "dies" here, its network still up
	os.WriteFile(filepath.Join(dir, "sb-bad"), []byte("x"), 0o600)

	a := testAgent(t, Config{TeardownDir: dir}, rt, n)
	err := a.Restore(ctx, map[string]int{"sb-live": live})
	if err == nil || !strings.Contains(err.Error(), "sb-bad") {
		t.Fatalf("restore: %v, want the bad journal entry named", err)
	}
	if n.slots()[dead] != "" || n.slots()[live] != "sb-live" {
		t.Fatalf("networks after restore: %v", n.slots())
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("journal after restore: %v", ents)
	}
	if slot, _ := a.Slots().Of("sb-live"); slot != live {
		t.Fatalf("live sandbox's slot %d, want %d", slot, live)
	}
	if _, ok := a.Slots().Of("sb-dead"); ok {
		t.Fatal("the finished teardown's slot is still held")
	}
	got := startCold(t, a, "sb-new")
	if got == live {
		t.Fatalf("a new sandbox got the live sandbox's slot %d", live)
	}
	if left, err := a.Leftovers(ctx, map[string]int{"sb-live": live, "sb-new": got}); err != nil || len(left) != 0 {
		t.Fatalf("leftovers: %v %v", left, err)
	}
}

// TestUnclaimReservedSlot: a create that fails before its sandbox starts
// gives its slot back; once the sandbox started, Unclaim does not free it
// (its teardown does).
func TestUnclaimReservedSlot(t *testing.T) {
	rt, n := newFakeRuntime(t), newFakeNet(20)
	a := testAgent(t, Config{}, rt, n)
	slot, err := a.ReserveSlot(StartRequest{ID: "sb-x"})
	if err != nil {
		t.Fatal(err)
	}
	a.Unclaim("sb-x")
	if _, ok := a.Slots().Of("sb-x"); ok {
		t.Fatal("an unused reserved slot is still held")
	}
	started := startCold(t, a, "sb-y")
	a.Unclaim("sb-y")
	if got, ok := a.Slots().Of("sb-y"); !ok || got != started {
		t.Fatalf("a started sandbox's slot was freed by Unclaim (%d %v)", got, ok)
	}
	_ = slot
}

// TestTeardownKeepUpper: a teardown asked to keep the writable layer keeps
// it if it fits (the network and slot go as usual, the journal is marked),
// until dropKept, which waits for a snapshot reading it; a layer over
// MaxBytes is not kept; a restart removes a kept layer without touching
// the slot, which a live sandbox may hold by then.
func TestTeardownKeepUpper(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	dir := t.TempDir()
	a := testAgent(t, Config{TeardownDir: dir}, rt, n)
	slot := startCold(t, a, "sb-k")
	_ = a.Kill(ctx, "sb-k")
	kept, err := a.Teardown("sb-k", slot, KeepUpper{For: time.Hour, MaxBytes: 1 << 20})
	if err != nil || kept != 64<<10 {
		t.Fatalf("teardown keeping: %d %v, want the layer's 64 KiB", kept, err)
	}
	if err := a.WaitTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if !rt.upper["sb-k"] || n.slots()[slot] != "" || !a.Kept("sb-k") {
		t.Fatalf("after the teardown: layer %v, networks %v, kept %v", rt.upper["sb-k"], n.slots(), a.Kept("sb-k"))
	}
	if _, held := a.Slots().Of("sb-k"); held {
		t.Fatal("a kept layer holds its slot")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "sb-k")); string(b) != keptMark {
		t.Fatalf("journal %q, want %q", b, keptMark)
	}
	if left, err := a.Leftovers(ctx, nil); err != nil || len(left) != 0 {
		t.Fatalf("a kept layer is a leftover: %v %v", left, err)
	}
	// A snapshot reading it holds off its removal.
	reading, release := make(chan struct{}), make(chan struct{})
	snap := make(chan error, 1)
	go func() {
		snap <- a.withKept(ctx, "sb-k", func() error { close(reading); <-release; return nil })
	}()
	<-reading
	dropped := make(chan struct{})
	go func() { a.dropKept("sb-k"); close(dropped) }()
	select {
	case <-dropped:
		t.Fatal("the layer was removed while a snapshot read it")
	case <-time.After(50 * time.Millisecond): // a bound on what must not happen
	}
	close(release)
	<-dropped
	if err := <-snap; err != nil || rt.upper["sb-k"] {
		t.Fatalf("snapshot %v; layer left %v", err, rt.upper["sb-k"])
	}
	if err := a.withKept(ctx, "sb-k", func() error { return nil }); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("after removal: %v, want failed precondition", err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("journal after removal: %v", ents)
	}

	// Too big: not kept.
	big := startCold(t, a, "sb-big")
	_ = a.Kill(ctx, "sb-big")
	if kept, _ := a.Teardown("sb-big", big, KeepUpper{For: time.Hour, MaxBytes: 1 << 10}); kept != 0 || a.Kept("sb-big") {
		t.Fatalf("a layer over MaxBytes kept (%d)", kept)
	}
	_ = a.WaitTeardowns(ctx)

	// A restart removes a kept layer, whatever holds its old slot now.
	k2 := startCold(t, a, "sb-k2")
	_ = a.Kill(ctx, "sb-k2")
	_, _ = a.Teardown("sb-k2", k2, KeepUpper{For: time.Hour, MaxBytes: 1 << 20})
	_ = a.WaitTeardowns(ctx)
	b := testAgent(t, Config{TeardownDir: dir}, rt, n)
	if err := b.Restore(ctx, map[string]int{"sb-live": k2}); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if rt.upper["sb-k2"] {
		t.Fatal("kept layer left after a restart")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("journal after the restart: %v", ents)
	}
}

// TestRestoreKeepsThisProcessesTeardowns: a fleet node is restored while
// it runs (each control-plane start, each return): a teardown under way
// is not done a second time beside it, and a stopped sandbox's writable
// layer this process keeps for a snapshot stays (its journal entry too);
// only a previous process's entries are finished. Before, a restore
// removed the kept layers (a later snapshot of the stopped sandbox found
// nothing) and destroyed a sandbox being torn down a second time.
func TestRestoreKeepsThisProcessesTeardowns(t *testing.T) {
	ctx := context.Background()
	rt, n := newFakeRuntime(t), newFakeNet(20)
	dir := t.TempDir()
	held, release := make(chan string), make(chan struct{})
	a := testAgent(t, Config{TeardownDir: dir, TeardownHold: func(id string) {
		if id == "sb-t" {
			held <- id
			<-release
		}
	}}, rt, n)
	ts := startCold(t, a, "sb-t")
	_ = a.Kill(ctx, "sb-t")
	if _, err := a.Teardown("sb-t", ts, KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	<-held // its container removed, its network's part to come
	if err := a.Restore(ctx, map[string]int{}); err != nil {
		t.Fatal(err)
	}
	rt.mu.Lock()
	destroys := rt.destroys["sb-t"]
	rt.mu.Unlock()
	close(release)
	if err := a.WaitTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if destroys != 1 {
		t.Fatalf("the container of a sandbox being torn down was destroyed %d times by the time the restore returned, want once (its teardown's)", destroys)
	}
	slot := startCold(t, a, "sb-k")
	_ = a.Kill(ctx, "sb-k")
	if _, err := a.Teardown("sb-k", slot, KeepUpper{For: time.Hour, MaxBytes: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := a.WaitTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Restore(ctx, map[string]int{}); err != nil {
		t.Fatal(err)
	}
	if !rt.upper["sb-k"] || !a.Kept("sb-k") {
		t.Fatalf("after a restore of the running node: layer %v, kept %v", rt.upper["sb-k"], a.Kept("sb-k"))
	}
	if err := a.withKept(ctx, "sb-k", func() error { return nil }); err != nil {
		t.Fatalf("a snapshot after the restore: %v", err)
	}
}
