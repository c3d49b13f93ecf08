package store

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func open(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestSandboxSlotRecorded: the store records the slot the node gave a
// sandbox and never chooses one: a sandbox without a slot is refused,
// unrecorded.
func TestSandboxSlotRecorded(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	sb := &Sandbox{ID: "a", OrgID: "o", State: StateRunning, Slot: 40, CreatedAt: time.Now()}
	if err := s.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if got, err := s.GetSandbox(ctx, "a"); err != nil || got.Slot != 40 {
		t.Fatalf("recorded slot: %+v %v", got, err)
	}
	if err := s.CreateSandbox(ctx, &Sandbox{ID: "none", OrgID: "o", State: StateCreating}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("no slot: %v, want invalid argument", err)
	}
	if _, err := s.GetSandbox(ctx, "none"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("the refused sandbox was recorded: %v", err)
	}
	if err := s.CreateSandbox(ctx, &Sandbox{ID: "a", OrgID: "o", State: StateStopped, Slot: 2}); err == nil {
		t.Fatal("duplicate id accepted")
	}
	// Live: creating, running and stopping; newest first.
	for i, st := range []string{StateStopping, StateStopped, StateCreating} {
		id := string(rune('b' + i))
		if err := s.CreateSandbox(ctx, &Sandbox{ID: id, OrgID: "o", State: st, Slot: 2 + i, CreatedAt: time.Now().Add(time.Duration(i+1) * time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	live, err := s.ListSandboxes(ctx, "o", true)
	if err != nil || len(live) != 3 || live[0].ID != "d" || live[1].ID != "b" || live[2].ID != "a" {
		t.Fatalf("live: %v %v", live, err)
	}
	all, _ := s.ListSandboxes(ctx, "", false)
	if len(all) != 4 || all[0].ID != "d" {
		t.Fatalf("all (newest first): %v", all)
	}
	if _, err := s.GetSandbox(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("missing: %v", err)
	}
	if err := s.UpdateSandbox(ctx, &Sandbox{ID: "nope"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("update missing: %v", err)
	}
}

func TestPoliciesAndTokens(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	p := &Policy{OrgID: "o", Name: "p", AllowedHostnames: []string{"a.test"}}
	if err := s.PutPolicy(ctx, p, true); err != nil {
		t.Fatal(err)
	}
	if err := s.PutPolicy(ctx, p, true); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("create twice: %v", err)
	}
	if err := s.PutPolicy(ctx, &Policy{OrgID: "o", Name: "q"}, false); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("update missing: %v", err)
	}
	if _, err := s.GetPolicy(ctx, "other-org", "p"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("other org sees policy: %v", err)
	}
	if err := s.DeletePolicy(ctx, "o", "p"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePolicy(ctx, "o", "p"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("delete twice: %v", err)
	}
}

// TestReopen: state survives closing and reopening (migrations are idempotent).
func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "chalk.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSandbox(ctx, &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Env: map[string]string{"A": "b"}, Slot: 1}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	sb, err := s.GetSandbox(ctx, "x")
	if err != nil || sb.Env["A"] != "b" || sb.Slot != 1 {
		t.Fatalf("after reopen: %+v %v", sb, err)
	}
}

// TestMarkStopping: a running sandbox is recorded stopping with the reason;
// one whose end is recorded already is left as it is.
func TestMarkStopping(t *testing.T) {
	ctx := context.Background()
	s := open(t)
	run := &Sandbox{ID: "r", OrgID: "o", State: StateRunning, Slot: 1}
	done := &Sandbox{ID: "d", OrgID: "o", State: StateStopped, EndReason: "exited", Slot: 2}
	for _, sb := range []*Sandbox{run, done} {
		if err := s.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"r", "d"} {
		if err := s.MarkStopping(ctx, id, "terminated"); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := s.GetSandbox(ctx, "r"); got.State != StateStopping || got.EndReason != "terminated" || !got.Live() {
		t.Fatalf("running: %+v", got)
	}
	if got, _ := s.GetSandbox(ctx, "d"); got.State != StateStopped || got.EndReason != "exited" {
		t.Fatalf("stopped: %+v", got)
	}
}
