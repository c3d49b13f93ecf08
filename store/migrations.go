package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/database"
	"github.com/pressly/goose/v3/lock"
)

// Schema migrations: one list for both databases, applied in order at Open
// by pressly/goose (its version table, goose_db_version, records which ran;
// on PostgreSQL a session advisory lock lets one replica migrate while the
// others wait). Migration i (from 0) is goose version i+1.
//
// Never edit a migration that has shipped: append. Write SQL that both
// databases accept: TEXT, BIGINT, INTEGER columns, JSON documents as
// {{blob}} or TEXT, BIGINT for anything past 2^31 (INTEGER is 32 bits on
// PostgreSQL: nanosecond times, sizes), ? placeholders (only in a Go step), no SQLite- or
// PostgreSQL-only functions. The few types without a portable spelling are
// macros the dialect expands (dialect.go):
//
//	{{blob}}        BLOB / BYTEA
//	{{rowid_pk}}    INTEGER PRIMARY KEY / BIGINT identity primary key
//	{{autoinc_pk}}  INTEGER PRIMARY KEY AUTOINCREMENT / BIGINT identity primary key
//	{{rowid}}       nothing / a rowid identity column (SQLite's implicit rowid)
//
// Adding a table (for both databases) is one entry at the end of the list,
// e.g. for node registration:
//
//	{sql: `CREATE TABLE nodes (
//		id TEXT PRIMARY KEY,
//		registered_at BIGINT NOT NULL,
//		doc {{blob}} NOT NULL
//	);`},
//
// then its methods in a file of their own, queries with ? placeholders
// through s.db (or a txn from s.db.BeginTx), an allocation shared by
// concurrent writers under tx.d.lock(ctx, tx, "name") (a no-op on SQLite),
// and tests written with eachBackend (store_test.go), which runs each on
// SQLite and on PostgreSQL. (The shipped
// migrations were rewritten with the macros and BIGINT when PostgreSQL came:
// on SQLite they make the same schema as before.)

// A migration is SQL, optionally followed by a Go step (for data moves that
// need more than portable SQL); both run in one transaction.
type migration struct {
	sql string
	fn  func(ctx context.Context, tx *txn) error
}

var migrations = []migration{
	{sql: `CREATE TABLE tokens (
		id TEXT PRIMARY KEY,
		hash TEXT NOT NULL UNIQUE,
		org_id TEXT NOT NULL,
		doc {{blob}} NOT NULL
	);
	CREATE TABLE sandboxes (
		id TEXT PRIMARY KEY,
		org_id TEXT NOT NULL,
		state TEXT NOT NULL,
		slot INTEGER NOT NULL,
		doc {{blob}} NOT NULL{{rowid}}
	);
	CREATE INDEX sandboxes_state ON sandboxes(state, slot);
	CREATE TABLE policies (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		doc {{blob}} NOT NULL,
		PRIMARY KEY (org_id, name)
	);`},
	// WireGuard tunnels: idx numbers the tunnel's subnet (unique per node).
	{sql: `CREATE TABLE tunnels (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		idx INTEGER NOT NULL UNIQUE,
		doc {{blob}} NOT NULL,
		PRIMARY KEY (org_id, name)
	);`},
	// MCP gateway: registered upstream servers (the credential encrypted in
	// the document) and the audit log of every call through the gateway.
	{sql: `CREATE TABLE mcp_servers (
		org_id TEXT NOT NULL,
		name TEXT NOT NULL,
		doc {{blob}} NOT NULL,
		PRIMARY KEY (org_id, name)
	);
	CREATE TABLE mcp_audit (
		seq {{autoinc_pk}},
		org_id TEXT NOT NULL,
		at BIGINT NOT NULL, -- BIGINT: INTEGER is 32 bits on PostgreSQL (same affinity on SQLite)
		sandbox_id TEXT NOT NULL,
		server TEXT NOT NULL,
		doc {{blob}} NOT NULL
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
		seq {{rowid_pk}},
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
	// Fleet: nodes removed from the fleet (`chalk admin node rm`), whose
	// certificates are refused from then on (by node id; the serial is
	// kept for the record). revoked_at in Unix seconds.
	{sql: `CREATE TABLE revoked_nodes (
		id TEXT PRIMARY KEY,
		serial TEXT NOT NULL,
		revoked_at BIGINT NOT NULL
	);`},
	// Fleet tunnels: the membership (which sandbox is in which tunnel, at
	// which address, on which node, with which key and endpoint), shared by
	// control-plane replicas. An address is unique per tunnel (the
	// constraint is what keeps two replicas from handing one out twice).
	{sql: `CREATE TABLE tunnel_members (
		org_id TEXT NOT NULL,
		tunnel TEXT NOT NULL,
		sandbox_id TEXT NOT NULL,
		addr TEXT NOT NULL,
		doc TEXT NOT NULL,
		PRIMARY KEY (org_id, tunnel, sandbox_id),
		UNIQUE (org_id, tunnel, addr)
	);
	CREATE INDEX tunnel_members_sandbox ON tunnel_members (sandbox_id);`},
	// Fleet: a node's certificate serials in columns of their own (the
	// admission check of every node request reads them, with the
	// revocation, in one query): the current one, and the one a renewal
	// superseded with the deadline until which it is still accepted (Unix
	// nanoseconds; '' and 0: none). Existing nodes: current = the serial
	// their document recorded (migrateNodeSerials), none superseded.
	{sql: `ALTER TABLE nodes ADD COLUMN cert_serial TEXT NOT NULL DEFAULT '';
	ALTER TABLE nodes ADD COLUMN superseded_serial TEXT NOT NULL DEFAULT '';
	ALTER TABLE nodes ADD COLUMN superseded_until BIGINT NOT NULL DEFAULT 0;`, fn: migrateNodeSerials},
	// Sandboxes recorded lost, by node (issue #17: a returned node's
	// re-adoption reads only its own, store.LostOn): the node of a record
	// stopped with end_reason lost and when it ended (Unix nanoseconds);
	// '' and 0 for every other record. Written with the state (EndSandbox,
	// UpdateSandbox, ReviveLost). Existing lost records: from their
	// documents (migrateLostNodes).
	{sql: `ALTER TABLE sandboxes ADD COLUMN lost_node TEXT NOT NULL DEFAULT '';
	ALTER TABLE sandboxes ADD COLUMN lost_at BIGINT NOT NULL DEFAULT 0;
	CREATE INDEX sandboxes_lost ON sandboxes (lost_node, lost_at);`, fn: migrateLostNodes},
	// The size of an org's upload record (upload:<digest> in org_images:
	// the bytes its upload budget is charged, store.AddOrgUpload); 0 for
	// every other record, and for uploads recorded before (charged when
	// the org uploads the content again).
	{sql: `ALTER TABLE org_images ADD COLUMN size BIGINT NOT NULL DEFAULT 0;`},
	// The org audit trail's retention (store.PruneAudit, chalkd
	// --audit-retention): its batches find the records older than the cut
	// by time. Without the index each DELETE scanned the whole table
	// inside its write transaction (SQLite's one writer, PostgreSQL's row
	// locks), every hour, on a table that only grows.
	{sql: `CREATE INDEX audit_at ON audit (at);`},
}

// migrateLostNodes fills lost_node and lost_at of the records stopped as
// lost from their documents.
func migrateLostNodes(ctx context.Context, tx *txn) error {
	rows, err := tx.QueryContext(ctx, `SELECT id, doc FROM sandboxes WHERE state = ?`, StateStopped)
	if err != nil {
		return err
	}
	lost := map[string]*Sandbox{}
	for rows.Next() {
		var id string
		var doc []byte
		if err := rows.Scan(&id, &doc); err != nil {
			rows.Close()
			return err
		}
		var sb Sandbox
		if err := json.Unmarshal(doc, &sb); err != nil {
			rows.Close()
			return fmt.Errorf("sandbox %q: %w", id, err)
		}
		if node, _ := lostCols(&sb); node != "" {
			lost[id] = &sb
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for id, sb := range lost {
		node, at := lostCols(sb)
		if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET lost_node = ?, lost_at = ? WHERE id = ?`, node, at, id); err != nil {
			return fmt.Errorf("sandbox %q: %w", id, err)
		}
	}
	return nil
}

// migrateNodeSerials copies each node's certificate serial from its
// document (cert_serial, where Node kept it before) into its column.
func migrateNodeSerials(ctx context.Context, tx *txn) error {
	rows, err := tx.QueryContext(ctx, `SELECT id, doc FROM nodes`)
	if err != nil {
		return err
	}
	serials := map[string]string{}
	for rows.Next() {
		var id, doc string
		if err := rows.Scan(&id, &doc); err != nil {
			rows.Close()
			return err
		}
		var old struct {
			CertSerial string `json:"cert_serial"`
		}
		if err := json.Unmarshal([]byte(doc), &old); err != nil {
			rows.Close()
			return fmt.Errorf("node %q: %w", id, err)
		}
		serials[id] = old.CertSerial
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for id, serial := range serials {
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET cert_serial = ? WHERE id = ?`, serial, id); err != nil {
			return fmt.Errorf("node %q: %w", id, err)
		}
	}
	return nil
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
func migrateTokens(ctx context.Context, tx *txn) error {
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
		if _, err := tx.ExecContext(ctx, `INSERT INTO orgs (name, created_at) SELECT DISTINCT org_id, CAST(? AS BIGINT) FROM `+t+` WHERE true
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

// migrate applies the migrations up to version (-1: all).
func (s *Store) migrate(ctx context.Context, version int64) error {
	d := s.db.d
	if !d.postgres {
		if err := adoptUserVersion(ctx, s.db.db); err != nil {
			return err
		}
	}
	var gms []*goose.Migration
	for i, m := range migrations {
		gms = append(gms, goose.NewGoMigration(int64(i+1), &goose.GoFunc{RunTx: func(ctx context.Context, tx *sql.Tx) error {
			t := &txn{tx: tx, d: d}
			if _, err := t.tx.ExecContext(ctx, d.expand(m.sql)); err != nil {
				return err
			}
			if m.fn != nil {
				return m.fn(ctx, t)
			}
			return nil
		}}, nil))
	}
	opts := []goose.ProviderOption{
		goose.WithGoMigrations(gms...),
		goose.WithDisableGlobalRegistry(true),
		goose.WithSlog(slog.New(slog.DiscardHandler)),
	}
	if d.postgres {
		l, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 600))
		if err != nil {
			return err
		}
		opts = append(opts, goose.WithSessionLocker(l))
	}
	p, err := goose.NewProvider(d.goose, s.db.db, nil, opts...)
	if err != nil {
		return fmt.Errorf("store migrations: %w", err)
	}
	cur, err := p.GetDBVersion(ctx)
	if err != nil {
		return fmt.Errorf("store version: %w", err)
	}
	if cur > int64(len(migrations)) {
		return fmt.Errorf("store schema version %d is newer than this chalkd (%d)", cur, len(migrations))
	}
	if version < 0 {
		_, err = p.Up(ctx)
	} else {
		_, err = p.UpTo(ctx, version)
	}
	if err != nil && !errors.Is(err, goose.ErrNoNextVersion) {
		return fmt.Errorf("store migration: %w", err)
	}
	if !d.postgres {
		// Keep PRAGMA user_version current too: a chalkd from before goose
		// reads it, and refuses a store newer than it knows.
		v, err := p.GetDBVersion(ctx)
		if err != nil {
			return err
		}
		if _, err := s.db.db.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, v)); err != nil {
			return err
		}
	}
	return nil
}

// adoptUserVersion hands a SQLite store migrated before goose (its version
// in PRAGMA user_version) to goose: the version table is created with the
// migrations already applied recorded as such.
func adoptUserVersion(ctx context.Context, db *sql.DB) error {
	var v int64
	if err := db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&v); err != nil {
		return fmt.Errorf("store version: %w", err)
	}
	if v == 0 {
		return nil
	}
	var n int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?`, goose.DefaultTablename).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		return nil
	}
	if v > int64(len(migrations)) {
		return fmt.Errorf("store schema version %d is newer than this chalkd (%d)", v, len(migrations))
	}
	gs, err := database.NewStore(goose.DialectSQLite3, goose.DefaultTablename)
	if err != nil {
		return err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := gs.CreateVersionTable(ctx, tx); err != nil {
		return fmt.Errorf("store version table: %w", err)
	}
	for i := int64(0); i <= v; i++ { // goose records version 0 with the table
		if err := gs.Insert(ctx, tx, database.InsertRequest{Version: i}); err != nil {
			return fmt.Errorf("store version table: %w", err)
		}
	}
	return tx.Commit()
}
