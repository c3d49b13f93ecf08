// Package store keeps chalkd's durable state in SQLite (modernc.org/sqlite,
// pure Go; the default, a file in the data dir) or PostgreSQL (pgx; for a
// fleet of control-plane replicas).
//
// Records are stored as a few indexed columns plus a JSON document, so adding a field
// needs no migration. Schema migrations live in migrations.go and run at Open
// (pressly/goose, one list for both databases). The SQL is written once; what
// differs between the two databases is in dialect.go.
// Every write is a single transaction: a crash (even kill -9) leaves either the old
// or the new record, never a torn one.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the "sqlite" driver
)

// Store is the durable state of chalkd, in SQLite or PostgreSQL.
type Store struct {
	db  *handle
	dsn string // the PostgreSQL URL (leases open their own connections); "" for SQLite

	leaseMu sync.Mutex
	leases  map[string]*localLease // SQLite's leases, by name

	// authGen counts this process's changes to who may authenticate
	// (AuthGeneration).
	authGen atomic.Uint64
}

// AuthGeneration changes after every change this Store made to keys,
// members, roles or orgs has been committed (or failed). A cache of
// KeyByHash answers keeps the generation read before its lookup and drops
// the answer once it differs: a key revoked, a member removed or a role
// lowered through this Store is never served from the cache after the
// call that changed it returned. Changes made by other processes on the
// same database do not move it.
func (s *Store) AuthGeneration() uint64 { return s.authGen.Load() }

// authChanged moves AuthGeneration; deferred by every method that changes
// keys, members, roles or orgs, so it runs after the commit.
func (s *Store) authChanged() { s.authGen.Add(1) }

// IsPostgres reports whether database (as given to Open) names a
// PostgreSQL database rather than a SQLite file.
func IsPostgres(database string) bool {
	return strings.HasPrefix(database, "postgres://") || strings.HasPrefix(database, "postgresql://")
}

// Redact returns database with any password in it replaced, for messages.
func Redact(database string) string {
	if !strings.Contains(database, "://") {
		return database // a file's path
	}
	u, err := url.Parse(database)
	if err != nil {
		return "(an unparsable URL)"
	}
	return u.Redacted()
}

// Open opens the store and applies migrations. database is a PostgreSQL URL
// (postgres://user@host/db?sslmode=...; the database must exist) or the
// path of a SQLite file (created if needed).
func Open(ctx context.Context, database string) (*Store, error) {
	return openAt(ctx, database, -1)
}

// openAt opens the store migrated up to version (-1: every migration).
func openAt(ctx context.Context, database string, version int64) (*Store, error) {
	var s *Store
	if IsPostgres(database) {
		db, err := sql.Open("pgx", database)
		if err != nil {
			return nil, fmt.Errorf("open store %s: %w", Redact(database), err)
		}
		db.SetMaxOpenConns(32)
		db.SetMaxIdleConns(8)
		if err := db.PingContext(ctx); err != nil {
			db.Close()
			return nil, fmt.Errorf("open store %s: %w", Redact(database), err)
		}
		s = &Store{db: &handle{db: db, d: postgresDialect}, dsn: database}
	} else {
		dsn := "file:" + database + "?_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(1)"
		db, err := sql.Open("sqlite", dsn)
		if err != nil {
			return nil, fmt.Errorf("open store %s: %w", database, err)
		}
		db.SetMaxOpenConns(1) // SQLite has one writer; one connection avoids SQLITE_BUSY between our own goroutines.
		s = &Store{db: &handle{db: db, d: sqliteDialect}}
	}
	if err := s.migrate(ctx, version); err != nil {
		s.db.db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.db.Close() }

// Backend names the database: "sqlite" or "postgres".
func (s *Store) Backend() string { return s.db.d.name }

// Sandbox states.
const (
	StateCreating = "creating"
	StateRunning  = "running"
	// StateStopping: its end was asked for (EndReason says why) and its
	// processes are being killed; "stopped" follows within milliseconds.
	StateStopping = "stopping"
	StateStopped  = "stopped"
	StateFailed   = "failed"
)

// Sandbox is the durable record of one sandbox.
type Sandbox struct {
	ID                string            `json:"id"`
	OrgID             string            `json:"org_id"`
	State             string            `json:"state"`
	Slot              int               `json:"slot"`
	Image             string            `json:"image"`
	ImageHash         string            `json:"image_hash,omitempty"`
	ImageDigest       string            `json:"image_digest"`
	ImageWarm         bool              `json:"image_warm"`
	LocalRef          string            `json:"local_ref"`
	Entrypoint        []string          `json:"entrypoint,omitempty"`
	Env               map[string]string `json:"env,omitempty"`
	Workdir           string            `json:"workdir,omitempty"`
	User              string            `json:"user,omitempty"`
	CPU               float64           `json:"cpu,omitempty"`
	MemoryMB          int64             `json:"memory_mb,omitempty"`
	Timeout           time.Duration     `json:"timeout"`
	IdleTimeout       time.Duration     `json:"idle_timeout,omitempty"`
	Policies          []string          `json:"network_policies,omitempty"`
	PolicyHash        string            `json:"policy_hash,omitempty"`
	Tunnels           []string          `json:"tunnels,omitempty"`
	Labels            map[string]string `json:"labels,omitempty"`
	CreatedBy         string            `json:"created_by"`
	AWSRoleARN        string            `json:"aws_role_arn,omitempty"`
	AWSRegion         string            `json:"aws_region,omitempty"`
	GCPProvider       string            `json:"gcp_provider,omitempty"`
	GCPServiceAccount string            `json:"gcp_service_account,omitempty"`
	Mounts            []Mount           `json:"mounts,omitempty"`
	Pid               int               `json:"pid,omitempty"`
	IP                string            `json:"ip,omitempty"`
	CreatedAt         time.Time         `json:"created_at"`
	StartedAt         time.Time         `json:"started_at,omitempty"`
	EndedAt           time.Time         `json:"ended_at,omitempty"`
	LastActive        time.Time         `json:"last_active,omitempty"`
	ExitCode          int               `json:"exit_code"`
	EndReason         string            `json:"end_reason,omitempty"`
	Error             string            `json:"error,omitempty"`
	// Paused: running, with every process frozen (the API shows state
	// "paused"; slots and quotas count it as running).
	Paused bool `json:"paused,omitempty"`
	// Node is the fleet node the sandbox is placed on ("" outside a
	// fleet): every control-plane replica routes its calls there.
	Node string `json:"node,omitempty"`
}

// Mount is a content-addressed upload shown in the sandbox at Dst.
type Mount struct {
	Digest string `json:"digest"`
	Dst    string `json:"dst"`
	IsDir  bool   `json:"is_dir,omitempty"`
}

// Deadline is when the sandbox's lifetime timeout expires.
func (sb *Sandbox) Deadline() time.Time { return sb.CreatedAt.Add(sb.Timeout) }

// Live reports whether the sandbox has not ended.
func (sb *Sandbox) Live() bool {
	return sb.State == StateCreating || sb.State == StateRunning || sb.State == StateStopping
}

// CreateSandbox inserts a new sandbox. Its network slot (sb.Slot) is the
// one the node gave it: the store records it, it never chooses one (slots
// are a node's own; see node.Slots).
func (s *Store) CreateSandbox(ctx context.Context, sb *Sandbox) error {
	return s.CreateSandboxWithin(ctx, sb, Quota{})
}

// CreateSandboxWithin is CreateSandbox refusing, in the same transaction,
// a sandbox that would take its org past q (ErrResourceExhausted naming the
// limit). Concurrent creates are serialised on the org's row, so a quota
// of n admits exactly n however many race.
func (s *Store) CreateSandboxWithin(ctx context.Context, sb *Sandbox, q Quota) error {
	if sb.Slot < 1 {
		return fmt.Errorf("sandbox %q: network slot %d: the node gives every sandbox one: %w", sb.ID, sb.Slot, errdefs.ErrInvalidArgument)
	}
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	// Take the org's row first (a row lock on PostgreSQL, held to commit:
	// concurrent creates of the org queue here and each sees the others'
	// sandboxes; SQLite has one writer).
	if _, err := tx.ExecContext(ctx, `UPDATE orgs SET create_seq = create_seq + 1 WHERE name = ?`, sb.OrgID); err != nil {
		return err
	}
	if err := checkQuota(ctx, tx, sb, q); err != nil {
		return err
	}
	doc, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO sandboxes(id, org_id, state, slot, created_at, doc) VALUES(?,?,?,?,?,?)`,
		sb.ID, sb.OrgID, sb.State, sb.Slot, nanos(sb.CreatedAt), doc); err != nil {
		if tx.d.conflict(err) {
			return fmt.Errorf("sandbox %q: %w", sb.ID, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	return tx.Commit()
}

// checkQuota refuses sb if its org would pass a limit of q.
func checkQuota(ctx context.Context, tx *txn, sb *Sandbox, q Quota) error {
	if q == (Quota{}) {
		return nil
	}
	if q.MaxCreatesPerMinute > 0 {
		var n int
		since := sb.CreatedAt.Add(-time.Minute)
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM sandboxes WHERE org_id = ? AND created_at > ?`, sb.OrgID, nanos(since)).Scan(&n); err != nil {
			return err
		}
		if n >= q.MaxCreatesPerMinute {
			return fmt.Errorf("org %q quota max_creates_per_minute %d reached (%d sandboxes created in the last minute): %w",
				sb.OrgID, q.MaxCreatesPerMinute, n, errdefs.ErrResourceExhausted)
		}
	}
	rows, err := tx.QueryContext(ctx, `SELECT doc FROM sandboxes WHERE org_id = ? AND state IN (?, ?, ?)`, sb.OrgID, StateCreating, StateRunning, StateStopping)
	if err != nil {
		return err
	}
	defer rows.Close()
	running, cpu, mem := 0, 0.0, int64(0)
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return err
		}
		var o Sandbox
		if err := json.Unmarshal(doc, &o); err != nil {
			return err
		}
		running, cpu, mem = running+1, cpu+o.CPU, mem+o.MemoryMB
	}
	if err := rows.Err(); err != nil {
		return err
	}
	switch {
	case q.MaxRunning > 0 && running+1 > q.MaxRunning:
		return fmt.Errorf("org %q quota max_running_sandboxes %d reached (%d running): %w", sb.OrgID, q.MaxRunning, running, errdefs.ErrResourceExhausted)
	case q.MaxVCPU > 0 && cpu+sb.CPU > q.MaxVCPU+1e-9:
		return fmt.Errorf("org %q quota max_vcpu %g: %g in use, %g asked: %w", sb.OrgID, q.MaxVCPU, cpu, sb.CPU, errdefs.ErrResourceExhausted)
	case q.MaxMemoryMB > 0 && mem+sb.MemoryMB > q.MaxMemoryMB:
		return fmt.Errorf("org %q quota max_memory_mb %d: %d in use, %d asked: %w", sb.OrgID, q.MaxMemoryMB, mem, sb.MemoryMB, errdefs.ErrResourceExhausted)
	}
	return nil
}

// UpdateSandbox rewrites a sandbox record.
func (s *Store) UpdateSandbox(ctx context.Context, sb *Sandbox) error {
	doc, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	node, at := lostCols(sb)
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET state = ?, slot = ?, lost_node = ?, lost_at = ?, doc = ? WHERE id = ?`, sb.State, sb.Slot, node, at, doc, sb.ID)
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("sandbox %q: %w", sb.ID, errdefs.ErrNotFound)
	}
	return nil
}

// EndSandbox records the end of sandbox sb (its state stopped or failed)
// unless its end is recorded already: a compare-and-swap on the record's
// state, so when several control-plane replicas see the same exit exactly
// one records it. It reports whether this call recorded it.
func (s *Store) EndSandbox(ctx context.Context, sb *Sandbox) (bool, error) {
	if sb.Live() {
		return false, fmt.Errorf("sandbox %q: end it as %q: not an end state: %w", sb.ID, sb.State, errdefs.ErrInvalidArgument)
	}
	doc, err := json.Marshal(sb)
	if err != nil {
		return false, err
	}
	node, at := lostCols(sb)
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET state = ?, slot = ?, lost_node = ?, lost_at = ?, doc = ? WHERE id = ? AND state IN (?, ?, ?)`,
		sb.State, sb.Slot, node, at, doc, sb.ID, StateCreating, StateRunning, StateStopping)
	if err != nil {
		return false, fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	return n == 1, nil
}

// TouchSandbox records that running sandbox id was used at (its
// LastActive, if later than the recorded one), for the idle timeout that
// another control-plane replica may enforce. Only that field changes, under
// the record's lock; a sandbox no longer running is left as it is.
func (s *Store) TouchSandbox(ctx context.Context, id string, at time.Time) error {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var doc []byte
	err = tx.QueryRowContext(ctx, `SELECT doc FROM sandboxes WHERE id = ? AND state = ?`+tx.d.forUpdate, id, StateRunning).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	var sb Sandbox
	if err := json.Unmarshal(doc, &sb); err != nil {
		return fmt.Errorf("sandbox %q record: %w", id, err)
	}
	if !at.After(sb.LastActive) {
		return nil
	}
	sb.LastActive = at.UTC()
	if doc, err = json.Marshal(&sb); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET doc = ? WHERE id = ?`, doc, id); err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	return tx.Commit()
}

// MarkStopping records that running sandbox id is being ended for reason
// (state stopping). A sandbox no longer running (its end recorded
// meanwhile) is left as it is.
func (s *Store) MarkStopping(ctx context.Context, id, reason string) error {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var doc []byte
	err = tx.QueryRowContext(ctx, `SELECT doc FROM sandboxes WHERE id = ? AND state = ?`+tx.d.forUpdate, id, StateRunning).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil // not running (ended already, or unknown): left as it is
	}
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	var sb Sandbox
	if err := json.Unmarshal(doc, &sb); err != nil {
		return fmt.Errorf("sandbox %q record: %w", id, err)
	}
	sb.State, sb.EndReason = StateStopping, reason
	if doc, err = json.Marshal(&sb); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET state = ?, doc = ? WHERE id = ?`, StateStopping, doc, id); err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	return tx.Commit()
}

// SetSandboxPaused records that a running sandbox is paused (or not). Only
// the flag changes, and only while the sandbox runs: a sandbox that ended
// meanwhile stays ended (failed precondition).
func (s *Store) SetSandboxPaused(ctx context.Context, id string, paused bool) error {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var doc []byte
	err = tx.QueryRowContext(ctx, `SELECT doc FROM sandboxes WHERE id = ? AND state = ?`+tx.d.forUpdate, id, StateRunning).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("sandbox %q is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	var sb Sandbox
	if err := json.Unmarshal(doc, &sb); err != nil {
		return fmt.Errorf("sandbox %q record: %w", id, err)
	}
	sb.Paused = paused
	if doc, err = json.Marshal(&sb); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET doc = ? WHERE id = ?`, doc, id); err != nil {
		return fmt.Errorf("sandbox %q: %w", id, err)
	}
	return tx.Commit()
}

// GetSandbox returns one sandbox.
func (s *Store) GetSandbox(ctx context.Context, id string) (*Sandbox, error) {
	var doc []byte
	err := s.db.QueryRowPrepared(ctx, `SELECT doc FROM sandboxes WHERE id = ?`, id).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	var sb Sandbox
	if err := json.Unmarshal(doc, &sb); err != nil {
		return nil, fmt.Errorf("sandbox %q record: %w", id, err)
	}
	return &sb, nil
}

// ListSandboxes lists sandboxes of an org ("" = every org), newest first.
// With liveOnly, only creating and running ones.
func (s *Store) ListSandboxes(ctx context.Context, orgID string, liveOnly bool) ([]*Sandbox, error) {
	q := `SELECT doc FROM sandboxes WHERE (? = '' OR org_id = ?)`
	args := []any{orgID, orgID}
	if liveOnly {
		q += ` AND state IN (?, ?, ?)`
		args = append(args, StateCreating, StateRunning, StateStopping)
	}
	q += ` ORDER BY rowid DESC`
	return s.querySandboxes(ctx, nil, q, args...)
}

// querySandboxes runs q, a SELECT of sandbox records' doc column, and
// returns the records keep accepts (nil: all), in the query's order.
func (s *Store) querySandboxes(ctx context.Context, keep func(*Sandbox) bool, q string, args ...any) ([]*Sandbox, error) {
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Sandbox
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		var sb Sandbox
		if err := json.Unmarshal(doc, &sb); err != nil {
			return nil, err
		}
		if keep == nil || keep(&sb) {
			out = append(out, &sb)
		}
	}
	return out, rows.Err()
}

// Policy is a stored NetworkPolicy.
type Policy struct {
	OrgID            string    `json:"org_id"`
	Name             string    `json:"name"`
	AllowAll         bool      `json:"allow_all"`
	AllowedHostnames []string  `json:"allowed_hostnames"`
	Description      string    `json:"description"`
	CreatedAt        time.Time `json:"created_at"`
	UpdatedAt        time.Time `json:"updated_at"`
}

// PutPolicy creates (create=true, fails if it exists) or replaces (create=false, fails if missing) a policy.
func (s *Store) PutPolicy(ctx context.Context, p *Policy, create bool) error {
	doc, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if create {
		_, err = s.db.ExecContext(ctx, `INSERT INTO policies(org_id, name, doc) VALUES(?,?,?)`, p.OrgID, p.Name, doc)
		if err != nil {
			if s.db.d.conflict(err) {
				return fmt.Errorf("network policy %q: %w", p.Name, errdefs.ErrAlreadyExists)
			}
			return fmt.Errorf("network policy %q: %w", p.Name, err)
		}
		return nil
	}
	res, err := s.db.ExecContext(ctx, `UPDATE policies SET doc = ? WHERE org_id = ? AND name = ?`, doc, p.OrgID, p.Name)
	if err != nil {
		return fmt.Errorf("network policy %q: %w", p.Name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("network policy %q: %w", p.Name, errdefs.ErrNotFound)
	}
	return nil
}

// GetPolicy returns one policy.
func (s *Store) GetPolicy(ctx context.Context, orgID, name string) (*Policy, error) {
	return getNamed[Policy](ctx, s.db, "policies", "network policy", orgID, name)
}

// ListPolicies lists an org's policies by name.
func (s *Store) ListPolicies(ctx context.Context, orgID string) ([]*Policy, error) {
	return listNamed[Policy](ctx, s.db, "policies", orgID)
}

// DeletePolicy removes a policy.
func (s *Store) DeletePolicy(ctx context.Context, orgID, name string) error {
	return deleteNamed(ctx, s.db, "policies", "network policy", orgID, name)
}
