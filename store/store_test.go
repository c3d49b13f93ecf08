package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/pgtest"
)

// The store's tests run on both databases: each test body runs once per
// backend, as subtests named sqlite and postgres, on a fresh database.
// PostgreSQL is a cluster of Debian's postgresql package that TestMain starts
// for the package (internal/pgtest).

var (
	pg    *pgtest.Cluster
	pgWhy string
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, &pg, &pgWhy)) }

type backend struct {
	name  string
	newDB func(t *testing.T) string // a fresh, empty database for Open
}

var backends = []backend{
	{"sqlite", func(t *testing.T) string { return filepath.Join(t.TempDir(), "chalk.db") }},
	{"postgres", func(t *testing.T) string {
		pgtest.Skip(t, pg, pgWhy)
		return pg.NewDatabase(t)
	}},
}

// eachBackend runs f as a subtest on each database.
func eachBackend(t *testing.T, f func(t *testing.T, b backend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { f(t, b) })
	}
}

// open opens the store on a fresh database, closed when t ends.
func (b backend) open(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), b.newDB(t))
	if err != nil {
		t.Fatal(err)
	}
	if s.Backend() != b.name {
		t.Fatalf("opened a %s store, want %s", s.Backend(), b.name)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestSandboxSlotRecorded: the store records the slot the node gave a
// sandbox and never chooses one: a sandbox without a slot is refused,
// unrecorded.
func TestSandboxSlotRecorded(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
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
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "a", OrgID: "o", State: StateStopped, Slot: 2}); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("duplicate id: %v, want already exists", err)
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
	})
}

// TestMarkStopping: a running sandbox is recorded stopping with the reason;
// one whose end is recorded already is left as it is.
func TestMarkStopping(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
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
	})
}

// TestEndSandboxOnce: of several replicas recording the same sandbox's end
// at once, exactly one does (compare-and-swap on its state); a later record
// does not overwrite it, and a live state is refused.
func TestEndSandboxOnce(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "r", OrgID: "o", State: StateRunning, Slot: 1}); err != nil {
			t.Fatal(err)
		}
		if err := s.MarkStopping(ctx, "r", "terminated"); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		won := make(chan string, 8)
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				reason := fmt.Sprintf("replica%d", i)
				ok, err := s.EndSandbox(ctx, &Sandbox{ID: "r", OrgID: "o", State: StateStopped, EndReason: reason, Slot: 1})
				if err != nil {
					t.Error(err)
				}
				if ok {
					won <- reason
				}
			}()
		}
		wg.Wait()
		close(won)
		var winners []string
		for w := range won {
			winners = append(winners, w)
		}
		if len(winners) != 1 {
			t.Fatalf("%d replicas recorded the end (%v), want exactly one", len(winners), winners)
		}
		if got, _ := s.GetSandbox(ctx, "r"); got.State != StateStopped || got.EndReason != winners[0] {
			t.Fatalf("recorded %+v, want the winner's %q", got, winners[0])
		}
		if _, err := s.EndSandbox(ctx, &Sandbox{ID: "r", State: StateRunning, Slot: 1}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("a live state as an end: %v", err)
		}
	})
}

// TestTouchSandbox: a running sandbox's last activity moves forward only;
// an ended one is left as it is.
func TestTouchSandbox(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		t0 := time.Now().UTC().Truncate(time.Millisecond)
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "r", OrgID: "o", State: StateRunning, Slot: 1, LastActive: t0, Labels: map[string]string{"k": "v"}}); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "d", OrgID: "o", State: StateStopped, Slot: 2, LastActive: t0}); err != nil {
			t.Fatal(err)
		}
		for _, at := range []time.Time{t0.Add(2 * time.Second), t0.Add(time.Second)} {
			for _, id := range []string{"r", "d"} {
				if err := s.TouchSandbox(ctx, id, at); err != nil {
					t.Fatal(err)
				}
			}
		}
		if got, _ := s.GetSandbox(ctx, "r"); !got.LastActive.Equal(t0.Add(2*time.Second)) || got.Labels["k"] != "v" || got.State != StateRunning {
			t.Fatalf("running: %+v", got)
		}
		if got, _ := s.GetSandbox(ctx, "d"); !got.LastActive.Equal(t0) {
			t.Fatalf("stopped: last active %v, want %v", got.LastActive, t0)
		}
	})
}

func TestPoliciesAndTokens(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
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
	})
}

// TestReopen: state survives closing and reopening (migrations are idempotent).
func TestReopen(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		path := b.newDB(t)
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
	})
}

// TestPaused: the paused flag changes only on a running sandbox, and
// nothing else of its record does.
func TestPaused(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		sb := &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Env: map[string]string{"NUL": "a\x00b"}, Slot: 1}
		if err := s.CreateSandbox(ctx, sb); err != nil {
			t.Fatal(err)
		}
		if err := s.SetSandboxPaused(ctx, "x", true); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetSandbox(ctx, "x")
		if err != nil || !got.Paused || got.Env["NUL"] != "a\x00b" || got.Slot != 1 {
			t.Fatalf("paused: %+v %v", got, err)
		}
		got.State = StateStopped
		if err := s.UpdateSandbox(ctx, got); err != nil {
			t.Fatal(err)
		}
		if err := s.SetSandboxPaused(ctx, "x", false); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Fatalf("unpausing a stopped sandbox: %v, want failed precondition", err)
		}
		if got, _ := s.GetSandbox(ctx, "x"); got.State != StateStopped || !got.Paused {
			t.Fatalf("a refused unpause changed the record: %+v", got)
		}
	})
}

// TestOpenErrorsHideThePassword: a PostgreSQL URL's password appears in no
// error of Open (chalkd logs them), and Redact hides it.
func TestOpenErrorsHideThePassword(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, u := range []string{
		"postgres://chalk:s3cret-pw@/nodb?host=" + t.TempDir(), // no server there
		"postgres://chalk:s3cret-pw@[::1/nodb",                 // unparsable
		"postgresql://chalk:s3cret-pw@/nodb?host=" + t.TempDir() + "&sslmode=bogus",
	} {
		_, err := Open(ctx, u)
		if err == nil || strings.Contains(err.Error(), "s3cret-pw") {
			t.Fatalf("Open(%s) = %v: want an error without the password", Redact(u), err)
		}
		if strings.Contains(Redact(u), "s3cret-pw") {
			t.Fatalf("Redact(%q) = %q", u, Redact(u))
		}
	}
	if got := Redact("/var/lib/chalk/chalk.db"); got != "/var/lib/chalk/chalk.db" {
		t.Fatalf("Redact of a SQLite path = %q", got)
	}
}

// TestConcurrentOpen: replicas starting together on an empty PostgreSQL
// database all open it, the migrations applied once (goose's advisory lock).
func TestConcurrentOpen(t *testing.T) {
	pgtest.Skip(t, pg, pgWhy)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dsn := pg.NewDatabase(t)
	var wg sync.WaitGroup
	stores := make([]*Store, 4)
	errs := make([]error, 4)
	for i := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stores[i], errs[i] = Open(ctx, dsn)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	var applied int
	if err := stores[0].db.QueryRowContext(ctx, `SELECT count(*) FROM goose_db_version WHERE version_id > 0`).Scan(&applied); err != nil || applied != len(migrations) {
		t.Fatalf("%d migrations recorded (%v), want %d once each", applied, err, len(migrations))
	}
}

// TestRemoveNode: removing a node deletes its record and revokes its id in
// one step; a node never removed is not revoked; removing an unknown node
// is not found and revokes nothing; a second removal is not found.
func TestRemoveNode(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		for _, id := range []string{"n1", "n2"} {
			if err := s.PutNode(ctx, &Node{ID: id, Name: id, State: NodeReady, CertSerial: "ab" + id}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.RemoveNode(ctx, "n1", time.Unix(1000, 0)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetNode(ctx, "n1"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("removed node still recorded: %v", err)
		}
		ns, err := s.ListNodes(ctx)
		if err != nil || len(ns) != 1 || ns[0].ID != "n2" {
			t.Fatalf("nodes after removing n1: %v %v", ns, err)
		}
		for id, want := range map[string]bool{"n1": true, "n2": false, "nope": false} {
			if got, err := s.NodeRevoked(ctx, id); err != nil || got != want {
				t.Errorf("NodeRevoked(%s) = %v, %v; want %v", id, got, err, want)
			}
		}
		for _, id := range []string{"nope", "n1"} {
			if err := s.RemoveNode(ctx, id, time.Now()); !errors.Is(err, errdefs.ErrNotFound) {
				t.Errorf("remove %s: %v, want not found", id, err)
			}
		}
		if got, _ := s.NodeRevoked(ctx, "nope"); got {
			t.Error("a failed removal revoked an id")
		}
	})
}
