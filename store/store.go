// Package store keeps chalkd's durable state in SQLite (modernc.org/sqlite, pure Go).
//
// Records are stored as a few indexed columns plus a JSON document, so adding a field
// needs no migration. Schema migrations live in migrations.go and run at Open.
// Every write is a single transaction: a crash (even kill -9) leaves either the old
// or the new record, never a torn one.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Store is the SQLite-backed state of one chalkd.
type Store struct {
	db *sql.DB
}

// Open opens (creating if needed) the database at path and applies migrations.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=busy_timeout(5000)&_pragma=foreign_keys(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db.SetMaxOpenConns(1) // SQLite has one writer; one connection avoids SQLITE_BUSY between our own goroutines.
	s := &Store{db: db}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Token is an API token. Only its SHA-256 hash is stored.
type Token struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	OrgID     string    `json:"org_id"`
	Hash      string    `json:"-"`
	Admin     bool      `json:"admin"`
	CreatedAt time.Time `json:"created_at"`
}

// CreateToken stores a new token.
func (s *Store) CreateToken(ctx context.Context, t Token) error {
	doc, _ := json.Marshal(t)
	_, err := s.db.ExecContext(ctx, `INSERT INTO tokens(id, hash, org_id, doc) VALUES(?,?,?,?)`, t.ID, t.Hash, t.OrgID, doc)
	if err != nil {
		return fmt.Errorf("create token %q: %w", t.Name, err)
	}
	return nil
}

// TokenByHash finds a token by the hash of its secret.
func (s *Store) TokenByHash(ctx context.Context, hash string) (Token, error) {
	var doc []byte
	err := s.db.QueryRowContext(ctx, `SELECT doc FROM tokens WHERE hash = ?`, hash).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return Token{}, fmt.Errorf("token: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return Token{}, fmt.Errorf("token lookup: %w", err)
	}
	var t Token
	if err := json.Unmarshal(doc, &t); err != nil {
		return Token{}, fmt.Errorf("token record: %w", err)
	}
	t.Hash = hash
	return t, nil
}

// DeleteToken removes a token (revocation: the API looks tokens up on every
// request, so the next one is refused).
func (s *Store) DeleteToken(ctx context.Context, id string) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM tokens WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("delete token %q: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("token %q: %w", id, errdefs.ErrNotFound)
	}
	return nil
}

// CountTokens reports how many tokens exist.
func (s *Store) CountTokens(ctx context.Context) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM tokens`).Scan(&n)
	return n, err
}

// Sandbox states.
const (
	StateCreating = "creating"
	StateRunning  = "running"
	StateStopped  = "stopped"
	StateFailed   = "failed"
)

// Sandbox is the durable record of one sandbox.
type Sandbox struct {
	ID          string            `json:"id"`
	OrgID       string            `json:"org_id"`
	State       string            `json:"state"`
	Slot        int               `json:"slot"`
	Image       string            `json:"image"`
	ImageHash   string            `json:"image_hash,omitempty"`
	ImageDigest string            `json:"image_digest"`
	ImageWarm   bool              `json:"image_warm"`
	LocalRef    string            `json:"local_ref"`
	Entrypoint  []string          `json:"entrypoint,omitempty"`
	Env         map[string]string `json:"env,omitempty"`
	Workdir     string            `json:"workdir,omitempty"`
	User        string            `json:"user,omitempty"`
	CPU         float64           `json:"cpu,omitempty"`
	MemoryMB    int64             `json:"memory_mb,omitempty"`
	Timeout     time.Duration     `json:"timeout"`
	IdleTimeout time.Duration     `json:"idle_timeout,omitempty"`
	Policies    []string          `json:"network_policies,omitempty"`
	PolicyHash  string            `json:"policy_hash,omitempty"`
	Tunnels     []string          `json:"tunnels,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	CreatedBy   string            `json:"created_by"`
	AWSRoleARN  string            `json:"aws_role_arn,omitempty"`
	GCPProvider string            `json:"gcp_provider,omitempty"`
	Mounts      []Mount           `json:"mounts,omitempty"`
	Pid         int               `json:"pid,omitempty"`
	IP          string            `json:"ip,omitempty"`
	CreatedAt   time.Time         `json:"created_at"`
	StartedAt   time.Time         `json:"started_at,omitempty"`
	EndedAt     time.Time         `json:"ended_at,omitempty"`
	LastActive  time.Time         `json:"last_active,omitempty"`
	ExitCode    int               `json:"exit_code"`
	EndReason   string            `json:"end_reason,omitempty"`
	Error       string            `json:"error,omitempty"`
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
func (sb *Sandbox) Live() bool { return sb.State == StateCreating || sb.State == StateRunning }

// CreateSandbox inserts a new sandbox, assigning it the lowest network slot in
// [1, maxSlot] not held by a live sandbox.
//
// The slot is the lowest free one up to maxSlot, unless sb.Slot is set
// already (by the node, for a pre-started sandbox): then it must be free.
func (s *Store) CreateSandbox(ctx context.Context, sb *Sandbox, maxSlot int) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT slot FROM sandboxes WHERE state IN (?, ?) ORDER BY slot`, StateCreating, StateRunning)
	if err != nil {
		return err
	}
	slot := 1
	for rows.Next() {
		var used int
		if err := rows.Scan(&used); err != nil {
			rows.Close()
			return err
		}
		if sb.Slot != 0 {
			// A slot given by the node (a pre-started sandbox's) must be free.
			if used == sb.Slot {
				rows.Close()
				return fmt.Errorf("sandbox %q: slot %d is in use: %w", sb.ID, sb.Slot, errdefs.ErrAlreadyExists)
			}
			continue
		}
		if used == slot {
			slot++
		} else if used > slot {
			break
		}
	}
	if err := rows.Err(); err != nil {
		rows.Close()
		return err
	}
	rows.Close()
	if sb.Slot == 0 {
		if slot > maxSlot {
			return fmt.Errorf("node is full (%d sandboxes): %w", maxSlot, errdefs.ErrResourceExhausted)
		}
		sb.Slot = slot
	}
	doc, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO sandboxes(id, org_id, state, slot, doc) VALUES(?,?,?,?,?)`,
		sb.ID, sb.OrgID, sb.State, sb.Slot, doc); err != nil {
		return fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	return tx.Commit()
}

// UpdateSandbox rewrites a sandbox record.
func (s *Store) UpdateSandbox(ctx context.Context, sb *Sandbox) error {
	doc, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET state = ?, slot = ?, doc = ? WHERE id = ?`, sb.State, sb.Slot, doc, sb.ID)
	if err != nil {
		return fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("sandbox %q: %w", sb.ID, errdefs.ErrNotFound)
	}
	return nil
}

// GetSandbox returns one sandbox.
func (s *Store) GetSandbox(ctx context.Context, id string) (*Sandbox, error) {
	var doc []byte
	err := s.db.QueryRowContext(ctx, `SELECT doc FROM sandboxes WHERE id = ?`, id).Scan(&doc)
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
		q += ` AND state IN (?, ?)`
		args = append(args, StateCreating, StateRunning)
	}
	q += ` ORDER BY rowid DESC`
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
		out = append(out, &sb)
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
			if _, gerr := s.GetPolicy(ctx, p.OrgID, p.Name); gerr == nil {
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
