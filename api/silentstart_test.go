package api

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/store"
)

// silentFleet is the fake node as the fleet's router at a control plane's
// start: the nodes of the sandboxes in silent do not answer
// (RunningOrSilent), and it records what it forgets (Lose) and its
// start reconciles (ReconcileStart).
type silentFleet struct {
	*fakeNode
	silent map[string]bool
	mu     sync.Mutex
	lost   []string
	starts int
}

func (s *silentFleet) RunningOrSilent(ctx context.Context, id string) (int, bool, error) {
	if s.silent[id] {
		return 0, false, errors.New("node n1 did not answer: connection refused")
	}
	pid, ok := s.fakeNode.Running(ctx, id)
	return pid, ok, nil
}

func (s *silentFleet) Lose(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lost = append(s.lost, id)
}

func (s *silentFleet) ReconcileStart(context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.starts++
}

// TestSilentAtStartLost: a running sandbox whose node does not answer at
// the control plane's start (silent just before it) is recorded lost on
// its node, not ended as exited, and not destroyed: its node's reconcile
// re-adopts it (store.LostOn finds it) if it still runs there. On one
// control plane and on a replica that leads; every start, a replica's
// too, has the nodes reconciled (ReconcileStart).
func TestSilentAtStartLost(t *testing.T) {
	t.Parallel()
	for _, replicated := range []bool{false, true} {
		name := "one control plane"
		if replicated {
			name = "replica leading"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			tn := newTestNode(t, Config{})
			fleet := &silentFleet{fakeNode: tn.node, silent: map[string]bool{"sb-silent": true}}
			now := time.Now().UTC()
			rec := &store.Sandbox{ID: "sb-silent", OrgID: "a", State: store.StateRunning, Slot: 3, Pid: 42, Node: "n1",
				CreatedAt: now, StartedAt: now, Timeout: time.Hour}
			if err := tn.store.CreateSandbox(ctx, rec); err != nil {
				t.Fatal(err)
			}
			cfg := Config{Store: tn.store, Node: fleet, ImageStore: tn.images, Images: tn.images}
			if replicated {
				lease := &fakeLease{}
				lease.held.Store(true)
				cfg.Leader = lease
			}
			srv := New(ctx, cfg)
			if err := srv.Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			got, err := tn.store.GetSandbox(ctx, rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.State != store.StateStopped || got.EndReason != "lost" || got.ExitCode != -1 || got.Node != "n1" {
				t.Fatalf("a sandbox of a node silent at the start: %s %q exit %d node %q (%s); want stopped, lost, on n1",
					got.State, got.EndReason, got.ExitCode, got.Node, got.Error)
			}
			if lost, err := tn.store.LostOn(ctx, "n1", now.Add(-time.Minute)); err != nil || len(lost) != 1 || lost[0].ID != rec.ID {
				t.Fatalf("lost records on n1: %v %v; want %s (re-adoptable)", lost, err, rec.ID)
			}
			if n := tn.node.destroyed(rec.ID); n != 0 {
				t.Fatalf("the sandbox of the silent node was destroyed %d times", n)
			}
			fleet.mu.Lock()
			defer fleet.mu.Unlock()
			if !slices.Equal(fleet.lost, []string{rec.ID}) {
				t.Errorf("placements forgotten: %q, want %s", fleet.lost, rec.ID)
			}
			if fleet.starts != 1 {
				t.Errorf("start reconciles of the nodes: %d, want 1", fleet.starts)
			}
		})
	}
}
