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

// TestGivenSlot: a slot given by the node (a pre-started sandbox's, above
// maxSlot) is kept if free and refused if a live sandbox holds it; the
// lowest-free allocation is not disturbed by it.
func TestGivenSlot(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		pre := &Sandbox{ID: "pre", OrgID: "o", State: StateCreating, Slot: 40}
		if err := s.CreateSandbox(ctx, pre, 3); err != nil || pre.Slot != 40 {
			t.Fatalf("given slot: %d %v", pre.Slot, err)
		}
		low := &Sandbox{ID: "low", OrgID: "o", State: StateCreating}
		if err := s.CreateSandbox(ctx, low, 3); err != nil || low.Slot != 1 {
			t.Fatalf("allocated beside a given slot: %d %v", low.Slot, err)
		}
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "dup", OrgID: "o", State: StateCreating, Slot: 40}, 3); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("a given slot in use: %v, want already exists", err)
		}
		if _, err := s.GetSandbox(ctx, "dup"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("the refused sandbox was recorded: %v", err)
		}
		pre.State = StateStopped
		if err := s.UpdateSandbox(ctx, pre); err != nil {
			t.Fatal(err)
		}
		again := &Sandbox{ID: "again", OrgID: "o", State: StateCreating, Slot: 40}
		if err := s.CreateSandbox(ctx, again, 3); err != nil || again.Slot != 40 {
			t.Fatalf("a given slot freed by a stopped sandbox: %d %v", again.Slot, err)
		}
	})
}

func TestSlotsLowestFreeAndReused(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		var sbs []*Sandbox
		for i, id := range []string{"a", "b", "c"} {
			sb := &Sandbox{ID: id, OrgID: "o", State: StateRunning, CreatedAt: time.Now()}
			if err := s.CreateSandbox(ctx, sb, 3); err != nil {
				t.Fatal(err)
			}
			if sb.Slot != i+1 {
				t.Fatalf("%s got slot %d", id, sb.Slot)
			}
			sbs = append(sbs, sb)
		}
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "d", OrgID: "o", State: StateCreating}, 3); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("full node: %v", err)
		}
		sbs[1].State = StateStopped
		if err := s.UpdateSandbox(ctx, sbs[1]); err != nil {
			t.Fatal(err)
		}
		d := &Sandbox{ID: "d", OrgID: "o", State: StateCreating}
		if err := s.CreateSandbox(ctx, d, 3); err != nil || d.Slot != 2 {
			t.Fatalf("reuse: slot %d err %v", d.Slot, err)
		}
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "a", OrgID: "o", State: StateStopped}, 10); err == nil {
			t.Fatal("duplicate id accepted")
		}
		live, err := s.ListSandboxes(ctx, "o", true)
		if err != nil || len(live) != 3 {
			t.Fatalf("live: %d %v", len(live), err)
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
		if err := s.CreateSandbox(ctx, &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Env: map[string]string{"A": "b"}}, 5); err != nil {
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

// TestSlotRace: creates racing in different orgs (none with an org row to
// lock) still get distinct slots, and no more than the node has.
func TestSlotRace(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for i := range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- s.CreateSandbox(ctx, &Sandbox{ID: fmt.Sprintf("sb-%d", i), OrgID: fmt.Sprintf("o%d", i), State: StateCreating}, 15)
			}()
		}
		wg.Wait()
		close(errs)
		full := 0
		for err := range errs {
			switch {
			case errors.Is(err, errdefs.ErrResourceExhausted):
				full++
			case err != nil:
				t.Fatal(err)
			}
		}
		live, err := s.ListSandboxes(ctx, "", true)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[int]string{}
		for _, sb := range live {
			if o, dup := seen[sb.Slot]; dup || sb.Slot < 1 || sb.Slot > 15 {
				t.Fatalf("slot %d of %s (also %q)", sb.Slot, sb.ID, o)
			}
			seen[sb.Slot] = sb.ID
		}
		if len(live) != 15 || full != 5 {
			t.Fatalf("%d created, %d refused; want 15 and 5", len(live), full)
		}
	})
}

// TestPaused: the paused flag changes only on a running sandbox, and
// nothing else of its record does.
func TestPaused(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		sb := &Sandbox{ID: "x", OrgID: "o", State: StateRunning, Env: map[string]string{"NUL": "a\x00b"}}
		if err := s.CreateSandbox(ctx, sb, 5); err != nil {
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
