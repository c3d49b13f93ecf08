package store

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Lease is leadership among the control-plane replicas sharing a store,
// for leader-only work (timers, garbage collection): at most one holder at
// a time per name.
type Lease interface {
	// Acquire blocks until this holder has the lease, or ctx ends. The
	// returned context ends when the lease is lost (on PostgreSQL: its
	// connection died, so another replica may hold it now) or released;
	// leader-only work runs under it. release gives the lease up.
	Acquire(ctx context.Context) (held context.Context, release func(), err error)
}

// Lease returns a lease named name. On PostgreSQL it is a session-level
// advisory lock held by a connection of its own (the server drops it with
// the session, so a replica that dies or is cut off loses it); check is
// how often a holder pings that connection to notice a loss (0: 5 s). On
// SQLite, which one process uses, it is a lock inside this Store.
func (s *Store) Lease(name string, check time.Duration) Lease {
	if check <= 0 {
		check = 5 * time.Second
	}
	if s.dsn == "" {
		s.leaseMu.Lock()
		defer s.leaseMu.Unlock()
		if s.leases == nil {
			s.leases = map[string]*localLease{}
		}
		l := s.leases[name]
		if l == nil {
			l = &localLease{ch: make(chan struct{}, 1)}
			s.leases[name] = l
		}
		return l
	}
	return &pgLease{dsn: s.dsn, name: name, key: lockKey("lease:" + name), check: check}
}

var (
	_ Lease = (*localLease)(nil)
	_ Lease = (*pgLease)(nil)
)

// localLease is a Lease inside one process.
type localLease struct {
	ch chan struct{} // holds a token while held
}

func (l *localLease) Acquire(ctx context.Context) (context.Context, func(), error) {
	select {
	case l.ch <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	held, cancel := context.WithCancel(ctx)
	var once sync.Once
	release := func() {
		once.Do(func() {
			cancel()
			<-l.ch
		})
	}
	// A holder whose ctx ends gives the lease up.
	context.AfterFunc(held, release)
	return held, release, nil
}

// pgLease is a PostgreSQL session advisory lock on a dedicated connection.
type pgLease struct {
	dsn   string
	name  string
	key   int64
	check time.Duration
}

func (l *pgLease) Acquire(ctx context.Context) (context.Context, func(), error) {
	cfg, err := pgx.ParseConfig(l.dsn)
	if err != nil {
		return nil, nil, fmt.Errorf("lease: database URL %s: %w", Redact(l.dsn), err)
	}
	// Operators see who holds what in pg_stat_activity and pg_locks.
	cfg.RuntimeParams["application_name"] = "chalkd lease " + l.name
	// A holder whose host died without closing its connection (power
	// loss, a partition) pings no more: the server ends the idle session,
	// and with it the lock, after a few missed checks rather than at the
	// TCP keepalive's hours.
	cfg.RuntimeParams["idle_session_timeout"] = strconv.FormatInt((5 * l.check).Milliseconds(), 10)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("lease connection to %s: %w", Redact(l.dsn), err)
	}
	// Blocks in the server until the holder's session ends or it unlocks;
	// ending ctx cancels the wait.
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, l.key); err != nil {
		conn.Close(context.Background())
		return nil, nil, fmt.Errorf("lease: %w", err)
	}
	held, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(l.check)
		defer t.Stop()
		for {
			select {
			case <-held.Done():
				return
			case <-t.C:
				pctx, pcancel := context.WithTimeout(held, l.check)
				err := conn.Ping(pctx)
				pcancel()
				if err != nil {
					cancel() // lost: the session (and with it the lock) is gone, or cannot be told from gone
					return
				}
			}
		}
	}()
	var once sync.Once
	release := func() {
		once.Do(func() {
			cancel()
			<-done
			// Closing the session drops the lock (no unlock needed, and none
			// can fail half-way).
			conn.Close(context.Background())
		})
	}
	context.AfterFunc(held, func() { go release() })
	return held, release, nil
}

// PlacementLock serialises placement among control-plane replicas sharing
// this store: held from reading the live placements until the new
// sandbox's record exists, so the next placer anywhere counts it. On
// PostgreSQL it is a transaction-scoped advisory lock on one pooled
// connection (release ends the transaction; the server drops it if the
// replica dies); on SQLite, which one process uses, it is nothing (the
// router serialises in process). Callers hold at most one at a time per
// process, so waiters hold no connection of the pool.
func (s *Store) PlacementLock(ctx context.Context) (release func(), err error) {
	if s.dsn == "" {
		return func() {}, nil
	}
	// The transaction outlives ctx (which only bounds the wait): it ends
	// at release.
	tx, err := s.db.BeginTx(context.WithoutCancel(ctx))
	if err != nil {
		return nil, err
	}
	if err := tx.d.lock(ctx, tx, "placement"); err != nil {
		_ = tx.Rollback()
		return nil, fmt.Errorf("placement lock: %w", err)
	}
	// A replica that died holding it (its host gone without closing the
	// connection) gives it up after this long idle.
	if _, err := tx.tx.ExecContext(ctx, `SET LOCAL idle_in_transaction_session_timeout = '10s'`); err != nil {
		_ = tx.Rollback()
		return nil, fmt.Errorf("placement lock: %w", err)
	}
	var once sync.Once
	return func() { once.Do(func() { _ = tx.Rollback() }) }, nil
}
