package store

import (
	"context"
	"fmt"
)

// migrations are applied in order; the index of the last applied one is
// PRAGMA user_version. Never edit a migration that has shipped: append.
var migrations = []string{
	`CREATE TABLE tokens (
		id TEXT PRIMARY KEY,
		hash TEXT NOT NULL UNIQUE,
		org_id TEXT NOT NULL,
		doc BLOB NOT NULL
	);
	CREATE TABLE sandboxes (
		id TEXT PRIMARY KEY,
		org_id TEXT NOT NULL,
		state TEXT NOT NULL,
		slot INTEGER NOT NULL,
		doc BLOB NOT NULL
	);
	CREATE INDEX sandboxes_state ON sandboxes(state, slot);
	CREATE TABLE policies (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		doc BLOB NOT NULL,
		PRIMARY KEY (org_id, name)
	);`,
	// WireGuard tunnels: idx numbers the tunnel's subnet (unique per node).
	`CREATE TABLE tunnels (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		idx INTEGER NOT NULL UNIQUE,
		doc BLOB NOT NULL,
		PRIMARY KEY (org_id, name)
	);`,
	// MCP gateway: registered upstream servers (the credential encrypted in
	// the document) and the audit log of every call through the gateway.
	`CREATE TABLE mcp_servers (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		doc BLOB NOT NULL,
		PRIMARY KEY (org_id, name)
	);
	CREATE TABLE mcp_audit (
		seq INTEGER PRIMARY KEY AUTOINCREMENT,
		org_id TEXT NOT NULL,
		at INTEGER NOT NULL,
		sandbox_id TEXT NOT NULL,
		server TEXT NOT NULL,
		doc BLOB NOT NULL
	);
	CREATE INDEX mcp_audit_org ON mcp_audit (org_id, seq);`,
}

func (s *Store) migrate(ctx context.Context) error {
	var v int
	if err := s.db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&v); err != nil {
		return fmt.Errorf("store version: %w", err)
	}
	if v > len(migrations) {
		return fmt.Errorf("store schema version %d is newer than this chalkd (%d)", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("store migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, i+1)); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	return nil
}
