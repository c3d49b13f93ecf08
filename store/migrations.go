package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"
)

// A migration is SQL, optionally followed by a Go step (for data moves that
// need more than portable SQL); both run in one transaction.
type migration struct {
	sql string
	fn  func(ctx context.Context, tx *sql.Tx) error
}

// migrations are applied in order; the index of the last applied one is
// PRAGMA user_version. Never edit a migration that has shipped: append.
// New migrations use portable SQL (SQLite and PostgreSQL): TEXT, BIGINT,
// INTEGER columns, no SQLite-only functions.
var migrations = []migration{
	{sql: `CREATE TABLE tokens (
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
	);`},
	// WireGuard tunnels: idx numbers the tunnel's subnet (unique per node).
	{sql: `CREATE TABLE tunnels (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		idx INTEGER NOT NULL UNIQUE,
		doc BLOB NOT NULL,
		PRIMARY KEY (org_id, name)
	);`},
	// MCP gateway: registered upstream servers (the credential encrypted in
	// the document) and the audit log of every call through the gateway.
	{sql: `CREATE TABLE mcp_servers (
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
	CREATE INDEX mcp_audit_org ON mcp_audit (org_id, seq);`},
	// Teams: orgs, users, memberships with a role, API keys per user per org
	// (replacing tokens, moved by migrateTokens), the audit trail, each org's
	// view of images, and the create time of sandboxes (for the create rate).
	{sql: `CREATE TABLE orgs (
		name TEXT PRIMARY KEY,
		created_at BIGINT NOT NULL,
		create_seq BIGINT NOT NULL DEFAULT 0,
		quota TEXT NOT NULL DEFAULT '{}'
	);
	CREATE TABLE users (
		name TEXT PRIMARY KEY,
		node_admin INTEGER NOT NULL DEFAULT 0,
		created_at BIGINT NOT NULL
	);
	CREATE TABLE members (
		org_id TEXT NOT NULL REFERENCES orgs(name),
		user_name TEXT NOT NULL REFERENCES users(name),
		role TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		PRIMARY KEY (org_id, user_name)
	);
	CREATE TABLE api_keys (
		id TEXT PRIMARY KEY,
		hash TEXT NOT NULL UNIQUE,
		prefix TEXT NOT NULL,
		org_id TEXT NOT NULL,
		user_name TEXT NOT NULL,
		name TEXT NOT NULL,
		role TEXT NOT NULL,
		created_by TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		expires_at BIGINT NOT NULL DEFAULT 0,
		last_used_at BIGINT NOT NULL DEFAULT 0,
		revoked_at BIGINT NOT NULL DEFAULT 0
	);
	CREATE INDEX api_keys_member ON api_keys (org_id, user_name);
	CREATE INDEX api_keys_prefix ON api_keys (prefix);
	CREATE TABLE audit (
		seq INTEGER PRIMARY KEY,
		org_id TEXT NOT NULL,
		at BIGINT NOT NULL,
		actor TEXT NOT NULL,
		via TEXT NOT NULL,
		peer TEXT NOT NULL,
		action TEXT NOT NULL,
		object TEXT NOT NULL,
		outcome TEXT NOT NULL,
		detail TEXT NOT NULL
	);
	CREATE INDEX audit_org ON audit (org_id, seq);
	CREATE TABLE org_images (
		org_id TEXT NOT NULL,
		ref TEXT NOT NULL,
		PRIMARY KEY (org_id, ref)
	);
	CREATE INDEX org_images_ref ON org_images (ref);
	ALTER TABLE sandboxes ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
	CREATE INDEX sandboxes_org_created ON sandboxes (org_id, created_at);`, fn: migrateTokens},
	{sql: `CREATE TABLE exposures (
		sandbox_id TEXT NOT NULL,
		port INTEGER NOT NULL,
		org_id TEXT NOT NULL,
		doc TEXT NOT NULL,
		PRIMARY KEY (sandbox_id, port)
	);`},
	// Fleet (issue #17): node agents that joined the control plane, and the
	// one-time join tokens (their SHA-256; expires_at in Unix seconds). One
	// migration, plain SQL, for the PostgreSQL store to mirror.
	{sql: `CREATE TABLE nodes (
		id TEXT PRIMARY KEY,
		name TEXT NOT NULL,
		doc TEXT NOT NULL
	);
	CREATE TABLE join_tokens (
		hash TEXT PRIMARY KEY,
		expires_at BIGINT NOT NULL,
		used INTEGER NOT NULL DEFAULT 0
	);`},
}

// legacyToken is a row of the tokens table before teams.
type legacyToken struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	OrgID     string    `json:"org_id"`
	Admin     bool      `json:"admin"`
	CreatedAt time.Time `json:"created_at"`
}

// migrateTokens makes an org of every org id in use, a user and membership
// of every token's name (admin tokens: the node admin, role admin), and an
// API key of every token with its hash, so existing tokens keep working.
func migrateTokens(ctx context.Context, tx *sql.Tx) error {
	now := time.Now().UnixNano()
	rows, err := tx.QueryContext(ctx, `SELECT hash, doc FROM tokens`)
	if err != nil {
		return err
	}
	type tok struct {
		hash string
		t    legacyToken
	}
	var toks []tok
	for rows.Next() {
		var x tok
		var doc []byte
		if err := rows.Scan(&x.hash, &doc); err != nil {
			rows.Close()
			return err
		}
		if err := json.Unmarshal(doc, &x.t); err != nil {
			rows.Close()
			return fmt.Errorf("token record: %w", err)
		}
		toks = append(toks, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for _, t := range []string{"tokens", "sandboxes", "policies", "tunnels", "mcp_servers"} {
		if _, err := tx.ExecContext(ctx, `INSERT INTO orgs (name, created_at) SELECT DISTINCT org_id, ? FROM `+t+` WHERE true
			ON CONFLICT (name) DO NOTHING`, now); err != nil {
			return fmt.Errorf("orgs from %s: %w", t, err)
		}
	}
	for _, x := range toks {
		role := RoleMember
		if x.t.Admin {
			role = RoleAdmin
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO users (name, node_admin, created_at) VALUES (?, ?, ?)
			ON CONFLICT (name) DO UPDATE SET node_admin = CASE WHEN excluded.node_admin = 1 THEN 1 ELSE users.node_admin END`,
			x.t.Name, boolInt(x.t.Admin), x.t.CreatedAt.UnixNano()); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO members (org_id, user_name, role, created_at) VALUES (?, ?, ?, ?)
			ON CONFLICT (org_id, user_name) DO NOTHING`, x.t.OrgID, x.t.Name, string(role), x.t.CreatedAt.UnixNano()); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO api_keys (id, hash, prefix, org_id, user_name, name, role, created_by, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`, x.t.ID, x.hash, "chalk_(legacy "+x.t.ID+")", x.t.OrgID, x.t.Name, x.t.Name,
			string(role), "migration", x.t.CreatedAt.UnixNano()); err != nil {
			return err
		}
	}
	_, err = tx.ExecContext(ctx, `DROP TABLE tokens`)
	return err
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
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
		if _, err := tx.ExecContext(ctx, migrations[i].sql); err != nil {
			tx.Rollback()
			return fmt.Errorf("store migration %d: %w", i+1, err)
		}
		if fn := migrations[i].fn; fn != nil {
			if err := fn(ctx, tx); err != nil {
				tx.Rollback()
				return fmt.Errorf("store migration %d: %w", i+1, err)
			}
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
