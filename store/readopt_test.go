package store

import (
	"context"
	"sync"
	"testing"
	"time"
)

// TestReviveLost: only a record stopped with end_reason lost, on the
// node, with the pid, ended at since or later is revived (running, its end
// cleared); concurrent revivals revive it once; anything else is left as
// it is.
func TestReviveLost(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		ended := time.Now().UTC().Truncate(time.Millisecond)
		mk := func(id, state, reason string) {
			sb := &Sandbox{ID: id, OrgID: "o", State: StateRunning, Slot: 1, Node: "n1", Pid: 7, CreatedAt: ended}
			if err := s.CreateSandbox(ctx, sb); err != nil {
				t.Fatal(err)
			}
			if state != StateRunning {
				sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode, sb.Error = state, reason, ended, -1, "node n1 stopped answering"
				if ok, err := s.EndSandbox(ctx, sb); err != nil || !ok {
					t.Fatalf("end %s: %v %v", id, ok, err)
				}
			}
		}
		mk("lost", StateStopped, "lost")
		mk("exited", StateStopped, "exited")
		mk("running", StateRunning, "")
		since := ended.Add(-time.Minute)
		for _, c := range []struct {
			name, id, node string
			pid            int
			since          time.Time
		}{
			{"another reason", "exited", "n1", 7, since},
			{"running", "running", "n1", 7, since},
			{"another node", "lost", "n2", 7, since},
			{"no node", "lost", "", 7, since},
			{"another pid", "lost", "n1", 8, since},
			{"after the grace", "lost", "n1", 7, ended.Add(time.Second)},
			{"unknown", "nope", "n1", 7, since},
		} {
			if sb, err := s.ReviveLost(ctx, c.id, c.node, c.pid, c.since); err != nil || sb != nil {
				t.Errorf("%s: revived %v, %v", c.name, sb, err)
			}
		}
		if sb, _ := s.GetSandbox(ctx, "lost"); sb.State != StateStopped || sb.EndReason != "lost" {
			t.Fatalf("refused revivals changed the record: %s %s", sb.State, sb.EndReason)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		revived := 0
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sb, err := s.ReviveLost(ctx, "lost", "n1", 7, since)
				if err != nil {
					t.Error(err)
				}
				if sb != nil {
					mu.Lock()
					revived++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if revived != 1 {
			t.Fatalf("revived %d times, want once", revived)
		}
		sb, err := s.GetSandbox(ctx, "lost")
		if err != nil || sb.State != StateRunning || sb.EndReason != "" || !sb.EndedAt.IsZero() || sb.Error != "" || sb.ExitCode != 0 || !sb.Live() {
			t.Fatalf("revived record: %+v %v", sb, err)
		}
		if live, _ := s.ListSandboxes(ctx, "", true); len(live) != 2 {
			t.Errorf("%d live records after the revival, want 2", len(live))
		}
	})
}
