package noderpc

import (
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/chalkcompute/chalkcompute/internal/pgtest"
	"github.com/chalkcompute/chalkcompute/store"
)

// Tests that run on PostgreSQL too (two replicas: two stores on one
// database) take a fresh database of one cluster (internal/pgtest), started
// by the first of them and stopped by TestMain.
var (
	pgOnce    sync.Once
	pgCluster *pgtest.Cluster
	pgErr     error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if pgCluster != nil {
		pgCluster.Stop()
	}
	os.Exit(code)
}

// postgresDB returns the URL of a fresh PostgreSQL database, dropped when t
// ends; without Debian's postgresql package it skips t (fails under
// CHALK_TEST_POSTGRES=1).
func postgresDB(t testing.TB) string {
	t.Helper()
	pgOnce.Do(func() { pgCluster, pgErr = pgtest.Start() })
	if errors.Is(pgErr, pgtest.ErrMissing) && !pgtest.Required() {
		t.Skip(pgErr)
	}
	if pgErr != nil {
		t.Fatal(pgErr)
	}
	return pgCluster.NewDatabase(t)
}

// openStore opens the store in db, closed when t ends.
func openStore(t testing.TB, db string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// database is one of the databases a test runs on: a control plane on it
// (newControl) and, for a second replica, its own store (on SQLite, which
// one process uses, the same store; on PostgreSQL a second connection pool
// to the same database, as a second control-plane process has).
type database struct {
	name    string
	control func(t *testing.T) *control
	replica func(t *testing.T, c *control) *store.Store
}

var databases = []database{
	{"sqlite",
		func(t *testing.T) *control { return newControl(t) },
		func(t *testing.T, c *control) *store.Store { return c.st }},
	{"postgres",
		func(t *testing.T) *control {
			db := postgresDB(t)
			c := newControlDB(t, db)
			c.db = db
			return c
		},
		func(t *testing.T, c *control) *store.Store { return openStore(t, c.db) }},
}

// eachDatabase runs f as a subtest on each database.
func eachDatabase(t *testing.T, f func(t *testing.T, db database)) {
	for _, db := range databases {
		t.Run(db.name, func(t *testing.T) { f(t, db) })
	}
}
