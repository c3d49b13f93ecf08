package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

type acquired struct {
	held    context.Context
	release func()
	err     error
}

// TestLease: of two holders of a lease one gets it; the other waits, and
// gets it once the first releases it. On PostgreSQL, a holder whose
// connection dies loses it (its held context ends) and the waiter gets it.
func TestLease(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		s := b.open(t)
		a, c := s.Lease("gc", 50*time.Millisecond), s.Lease("gc", 50*time.Millisecond)
		heldA, releaseA, err := a.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// While a holds it, c cannot get it.
		short, scancel := context.WithTimeout(ctx, 200*time.Millisecond)
		if _, _, err := c.Acquire(short); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("second holder while the first holds it: %v, want deadline exceeded", err)
		}
		scancel()
		// Another name is another lease.
		_, releaseOther, err := s.Lease("other", 0).Acquire(ctx)
		if err != nil {
			t.Fatalf("a lease of another name: %v", err)
		}
		releaseOther()

		// c waits; a releases; c gets it.
		got := make(chan acquired, 1)
		go func() {
			h, r, err := c.Acquire(ctx)
			got <- acquired{h, r, err}
		}()
		releaseA()
		if heldA.Err() == nil {
			t.Fatal("the released holder's context did not end")
		}
		var cHeld acquired
		select {
		case cHeld = <-got:
			if cHeld.err != nil {
				t.Fatal(cHeld.err)
			}
		case <-ctx.Done():
			t.Fatal("the waiter did not get a released lease")
		}
		if b.name != "postgres" {
			cHeld.release()
			return
		}

		// PostgreSQL: a waits while c holds it; c's connection dies.
		go func() {
			h, r, err := a.Acquire(ctx)
			got <- acquired{h, r, err}
		}()
		waitFor(t, ctx, s, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`, 1)
		select {
		case x := <-got:
			t.Fatalf("the waiter got a held lease: %+v", x)
		default:
		}
		var killed bool
		if err := s.db.QueryRowContext(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks
			WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&killed); err != nil || !killed {
			t.Fatalf("terminating the holder's session: %v %v", killed, err)
		}
		select {
		case x := <-got:
			if x.err != nil {
				t.Fatal(x.err)
			}
			defer x.release()
		case <-ctx.Done():
			t.Fatal("the waiter did not get the lease of a dead session")
		}
		select {
		case <-cHeld.held.Done():
		case <-ctx.Done():
			t.Fatal("the holder whose connection died still believes it leads")
		}
		cHeld.release()
	})
}

// waitFor polls q (a count) until it is want.
func waitFor(t *testing.T, ctx context.Context, s *Store, q string, want int) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var n int
		if err := s.db.QueryRowContext(ctx, q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == want {
			return
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("%s: %d, want %d", q, n, want)
		}
	}
}

// TestPlacementLock: on PostgreSQL a second holder (another replica) waits
// until the first releases; on SQLite (one process) it is nothing.
func TestPlacementLock(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s1, s2 := b.open(t), (*Store)(nil)
		if b.name == "postgres" {
			var err error
			if s2, err = Open(ctx, s1.dsn); err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
		} else {
			s2 = s1
		}
		// The lock outlives the context it was taken with (which bounds
		// only the wait).
		lctx, cancel := context.WithCancel(ctx)
		rel1, err := s1.PlacementLock(lctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan func(), 1)
		go func() {
			rel2, err := s2.PlacementLock(ctx)
			if err != nil {
				t.Error(err)
			}
			got <- rel2
		}()
		if b.name == "postgres" {
			select {
			case <-got:
				t.Fatal("a second replica took the placement lock while it was held")
			case <-time.After(300 * time.Millisecond): // a wait that must not end
			}
		}
		rel1()
		select {
		case rel2 := <-got:
			rel2()
			rel2() // idempotent
		case <-time.After(30 * time.Second):
			t.Fatal("the placement lock was not handed over on release")
		}
	})
}
