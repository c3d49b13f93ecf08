package store

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
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

// TestLostOn: a returned node's candidates for re-adoption are only the
// records stopped as lost on that node and ended at since or later —
// recorded by EndSandbox or UpdateSandbox (an end found at a start) —
// never another node's, another reason's, a running one's, or one revived
// since (ReviveLost clears it).
func TestLostOn(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		now := time.Now().UTC().Truncate(time.Millisecond)
		since := now.Add(-time.Minute)
		mk := func(id, node, reason string, ended time.Time, update bool) {
			t.Helper()
			sb := &Sandbox{ID: id, OrgID: "o", State: StateRunning, Slot: 1, Node: node, Pid: 7, CreatedAt: now}
			if err := s.CreateSandbox(ctx, sb); err != nil {
				t.Fatal(err)
			}
			if reason == "" {
				return
			}
			sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode = StateStopped, reason, ended, -1
			if update {
				if err := s.UpdateSandbox(ctx, sb); err != nil {
					t.Fatal(err)
				}
			} else if ok, err := s.EndSandbox(ctx, sb); err != nil || !ok {
				t.Fatalf("end %s: %v %v", id, ok, err)
			}
		}
		mk("a-lost", "n1", "lost", now, false)
		mk("b-lost-updated", "n1", "lost", now.Add(-time.Second), true)
		mk("c-lost-old", "n1", "lost", since.Add(-time.Second), false)
		mk("d-lost-n2", "n2", "lost", now, false)
		mk("e-exited", "n1", "exited", now, false)
		mk("f-running", "n1", "", time.Time{}, false)
		mk("g-revived", "n1", "lost", now, false)
		if sb, err := s.ReviveLost(ctx, "g-revived", "n1", 7, since); err != nil || sb == nil {
			t.Fatalf("revive: %v %v", sb, err)
		}
		ids := func(node string, since time.Time) []string {
			t.Helper()
			sbs, err := s.LostOn(ctx, node, since)
			if err != nil {
				t.Fatal(err)
			}
			var out []string
			for _, sb := range sbs {
				out = append(out, sb.ID)
			}
			return out
		}
		if got := ids("n1", since); !slices.Equal(got, []string{"a-lost", "b-lost-updated"}) {
			t.Errorf("lost on n1 since a minute: %q", got)
		}
		if got := ids("n2", since); !slices.Equal(got, []string{"d-lost-n2"}) {
			t.Errorf("lost on n2: %q", got)
		}
		if got := ids("n1", since.Add(-time.Hour)); !slices.Equal(got, []string{"a-lost", "b-lost-updated", "c-lost-old"}) {
			t.Errorf("lost on n1 since an hour: %q", got)
		}
		if got := ids("", since); len(got) != 0 {
			t.Errorf("lost on no node: %q", got)
		}
		// Lost again after its revival: listed again.
		sb, _ := s.GetSandbox(ctx, "g-revived")
		sb.State, sb.EndReason, sb.EndedAt = StateStopped, "lost", now
		if ok, err := s.EndSandbox(ctx, sb); err != nil || !ok {
			t.Fatal(ok, err)
		}
		if got := ids("n1", since); !slices.Equal(got, []string{"a-lost", "b-lost-updated", "g-revived"}) {
			t.Errorf("lost on n1 after g was lost again: %q", got)
		}
	})
}

// TestMigrateLostNodes: a sandbox recorded lost before the lost_node and
// lost_at columns is found by LostOn after the migration; other records
// are not.
func TestMigrateLostNodes(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		path := b.newDB(t)
		old, err := openAt(ctx, path, 9) // before the columns (migration 10)
		if err != nil {
			t.Fatal(err)
		}
		ended := time.Now().UTC().Truncate(time.Millisecond)
		for _, sb := range []*Sandbox{
			{ID: "lost", OrgID: "o", State: StateStopped, Slot: 1, Node: "n1", Pid: 7, EndReason: "lost", EndedAt: ended, CreatedAt: ended},
			{ID: "exited", OrgID: "o", State: StateStopped, Slot: 2, Node: "n1", Pid: 8, EndReason: "exited", EndedAt: ended, CreatedAt: ended},
			{ID: "running", OrgID: "o", State: StateRunning, Slot: 3, Node: "n1", Pid: 9, CreatedAt: ended},
		} {
			doc, _ := json.Marshal(sb)
			if _, err := old.db.ExecContext(ctx, `INSERT INTO sandboxes(id, org_id, state, slot, created_at, doc) VALUES(?,?,?,?,?,?)`,
				sb.ID, sb.OrgID, sb.State, sb.Slot, nanos(sb.CreatedAt), doc); err != nil {
				t.Fatal(err)
			}
		}
		old.Close()
		s, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		sbs, err := s.LostOn(ctx, "n1", ended.Add(-time.Minute))
		if err != nil || len(sbs) != 1 || sbs[0].ID != "lost" || sbs[0].Pid != 7 {
			t.Fatalf("lost on n1 after the migration: %+v %v", sbs, err)
		}
		if sbs, err := s.LostOn(ctx, "n1", ended.Add(time.Second)); err != nil || len(sbs) != 0 {
			t.Fatalf("lost on n1 ended after: %+v %v", sbs, err)
		}
	})
}

// BenchmarkLostCandidates: a returned node's candidates for re-adoption
// in a SQLite store of 5000 ended sandboxes (2500 on the node, 5 of them
// lost within the grace): "all" is the read before LostOn (every record,
// filtered in Go), "LostOn" the query of the node's lost records.
func BenchmarkLostCandidates(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir()+"/store.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	now := time.Now().UTC()
	for i := range 5000 {
		node, reason := "n1", "exited"
		if i%2 == 1 {
			node = "n2"
		}
		if i%1000 == 0 {
			reason = "lost"
		}
		sb := &Sandbox{ID: fmt.Sprintf("sb-%016x", i), OrgID: "o", State: StateRunning, Slot: 1 + i%100, Node: node, Pid: 7,
			Image: "busybox", Env: map[string]string{"A": "b"}, Labels: map[string]string{"team": "x"}, CreatedAt: now}
		if err := s.CreateSandbox(ctx, sb); err != nil {
			b.Fatal(err)
		}
		sb.State, sb.EndReason, sb.EndedAt = StateStopped, reason, now
		if _, err := s.EndSandbox(ctx, sb); err != nil {
			b.Fatal(err)
		}
	}
	since := now.Add(-time.Minute)
	b.Run("all", func(b *testing.B) {
		for b.Loop() {
			sbs, err := s.ListSandboxes(ctx, "", false)
			if err != nil {
				b.Fatal(err)
			}
			n := 0
			for _, sb := range sbs {
				if !sb.Live() && sb.Node == "n1" && sb.EndReason == "lost" && !sb.EndedAt.Before(since) {
					n++
				}
			}
			if n != 5 {
				b.Fatalf("%d candidates", n)
			}
		}
	})
	b.Run("LostOn", func(b *testing.B) {
		for b.Loop() {
			sbs, err := s.LostOn(ctx, "n1", since)
			if err != nil || len(sbs) != 5 {
				b.Fatalf("%d candidates, %v", len(sbs), err)
			}
		}
	})
}
