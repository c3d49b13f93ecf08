package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Teams: orgs, users, their memberships (a role per org) and API keys (per
// user per org, stored as a hash). The SQL here is portable (SQLite and
// PostgreSQL) apart from the ? placeholders, which the dialect rewrites.

// Role is a member's role in an org. Roles are ordered: viewer < member < admin.
type Role string

// Roles.
const (
	RoleViewer Role = "viewer"
	RoleMember Role = "member"
	RoleAdmin  Role = "admin"
)

// Rank orders roles; an unknown role ranks below viewer.
func (r Role) Rank() int {
	switch r {
	case RoleViewer:
		return 1
	case RoleMember:
		return 2
	case RoleAdmin:
		return 3
	}
	return 0
}

// Min returns the lower of r and o.
func (r Role) Min(o Role) Role {
	if o.Rank() < r.Rank() {
		return o
	}
	return r
}

// ParseRole checks a role name.
func ParseRole(s string) (Role, error) {
	r := Role(strings.ToLower(strings.TrimSpace(s)))
	if r.Rank() == 0 {
		return "", fmt.Errorf("role %q: want admin, member or viewer: %w", s, errdefs.ErrInvalidArgument)
	}
	return r, nil
}

// Quota is an org's limits at sandbox create; 0 = no limit.
type Quota struct {
	MaxRunning          int     `json:"max_running,omitempty"`
	MaxVCPU             float64 `json:"max_vcpu,omitempty"`
	MaxMemoryMB         int64   `json:"max_memory_mb,omitempty"`
	MaxCreatesPerMinute int     `json:"max_creates_per_minute,omitempty"`
	// MaxUploadBytes bounds the bytes of the org's recorded uploads
	// (AddOrgUpload); -1: no limit.
	MaxUploadBytes int64 `json:"max_upload_bytes,omitempty"`
}

// Or returns q with every unset limit taken from def.
func (q Quota) Or(def Quota) Quota {
	if q.MaxRunning == 0 {
		q.MaxRunning = def.MaxRunning
	}
	if q.MaxVCPU == 0 {
		q.MaxVCPU = def.MaxVCPU
	}
	if q.MaxMemoryMB == 0 {
		q.MaxMemoryMB = def.MaxMemoryMB
	}
	if q.MaxCreatesPerMinute == 0 {
		q.MaxCreatesPerMinute = def.MaxCreatesPerMinute
	}
	if q.MaxUploadBytes == 0 {
		q.MaxUploadBytes = def.MaxUploadBytes
	}
	return q
}

// Org is an organisation; its name is its id.
type Org struct {
	Name      string
	CreatedAt time.Time
	Quota     Quota // as set by the node admin (unset limits: the node's defaults)
}

// Member is a user's membership of an org.
type Member struct {
	OrgID     string
	User      string
	Role      Role
	CreatedAt time.Time
}

// APIKey is an API key of a user in an org. Only the hash of its secret is stored.
type APIKey struct {
	ID         string
	Hash       string
	Prefix     string
	OrgID      string
	User       string
	Name       string
	Role       Role
	CreatedBy  string
	CreatedAt  time.Time
	ExpiresAt  time.Time // zero: never
	LastUsedAt time.Time
	RevokedAt  time.Time
}

// KeyAuth is a key found by its hash, with what authorises it now.
type KeyAuth struct {
	Key        APIKey
	MemberRole Role // the user's current role in the key's org
	NodeAdmin  bool
}

// text makes s storable in a TEXT column of either database: invalid
// UTF-8 and NUL bytes become U+FFFD.
func text(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}

func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// HasUsers reports whether any user exists (false on a fresh node).
func (s *Store) HasUsers(ctx context.Context) (bool, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM users`).Scan(&n)
	return n > 0, err
}

// CreateOrg makes an org with admin as its first admin (creating the user
// if needed, as node admin when nodeAdmin) and key (if not nil) as that
// user's key, all in one transaction.
func (s *Store) CreateOrg(ctx context.Context, org Org, admin string, nodeAdmin bool, key *APIKey) error {
	defer s.authChanged()
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	q, _ := json.Marshal(org.Quota)
	if _, err := tx.ExecContext(ctx, `INSERT INTO orgs (name, created_at, quota) VALUES (?, ?, ?)`, org.Name, nanos(org.CreatedAt), string(q)); err != nil {
		if tx.d.conflict(err) {
			return fmt.Errorf("org %q: %w", org.Name, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("org %q: %w", org.Name, err)
	}
	if err := addMember(ctx, tx, Member{OrgID: org.Name, User: admin, Role: RoleAdmin, CreatedAt: org.CreatedAt}, nodeAdmin); err != nil {
		return err
	}
	if key != nil {
		if err := insertKey(ctx, tx, key); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func exists(ctx context.Context, tx *txn, q string, args ...any) bool {
	var one int
	return tx.QueryRowContext(ctx, q, args...).Scan(&one) == nil
}

// GetOrg returns one org.
func (s *Store) GetOrg(ctx context.Context, name string) (*Org, error) {
	var created int64
	var quota string
	err := s.db.QueryRowContext(ctx, `SELECT created_at, quota FROM orgs WHERE name = ?`, name).Scan(&created, &quota)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("org %q: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	o := &Org{Name: name, CreatedAt: fromNanos(created)}
	if err := json.Unmarshal([]byte(quota), &o.Quota); err != nil {
		return nil, fmt.Errorf("org %q quota: %w", name, err)
	}
	return o, nil
}

// ListOrgs lists orgs by name; with user set, only those it is a member of.
func (s *Store) ListOrgs(ctx context.Context, user string) ([]*Org, error) {
	q := `SELECT name FROM orgs ORDER BY name`
	args := []any{}
	if user != "" {
		q = `SELECT org_id FROM members WHERE user_name = ? ORDER BY org_id`
		args = append(args, user)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return nil, err
		}
		names = append(names, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	out := make([]*Org, 0, len(names))
	for _, n := range names {
		o, err := s.GetOrg(ctx, n)
		if err != nil {
			return nil, err
		}
		out = append(out, o)
	}
	return out, nil
}

// SetQuota replaces an org's quota.
func (s *Store) SetQuota(ctx context.Context, org string, q Quota) error {
	b, _ := json.Marshal(q)
	res, err := s.db.ExecContext(ctx, `UPDATE orgs SET quota = ? WHERE name = ?`, string(b), org)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("org %q: %w", org, errdefs.ErrNotFound)
	}
	return nil
}

// addMember adds m (creating its user if missing); an existing membership is
// ErrAlreadyExists.
func addMember(ctx context.Context, tx *txn, m Member, nodeAdmin bool) error {
	if _, err := tx.ExecContext(ctx, `INSERT INTO users (name, node_admin, created_at) VALUES (?, ?, ?)
		ON CONFLICT (name) DO NOTHING`, m.User, boolInt(nodeAdmin), nanos(m.CreatedAt)); err != nil {
		return fmt.Errorf("user %q: %w", m.User, err)
	}
	if exists(ctx, tx, `SELECT 1 FROM members WHERE org_id = ? AND user_name = ?`, m.OrgID, m.User) {
		return fmt.Errorf("user %q is already a member of org %q: %w", m.User, m.OrgID, errdefs.ErrAlreadyExists)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO members (org_id, user_name, role, created_at) VALUES (?, ?, ?, ?)`,
		m.OrgID, m.User, string(m.Role), nanos(m.CreatedAt)); err != nil {
		if tx.d.conflict(err) { // added by a concurrent transaction
			return fmt.Errorf("user %q is already a member of org %q: %w", m.User, m.OrgID, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("member %q of org %q: %w", m.User, m.OrgID, err)
	}
	return nil
}

// AddMember adds a user (created if new) to an org with a role, and key (if
// not nil) as the user's first key there, in one transaction.
func (s *Store) AddMember(ctx context.Context, m Member, key *APIKey) error {
	defer s.authChanged()
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if !exists(ctx, tx, `SELECT 1 FROM orgs WHERE name = ?`, m.OrgID) {
		return fmt.Errorf("org %q: %w", m.OrgID, errdefs.ErrNotFound)
	}
	if err := addMember(ctx, tx, m, false); err != nil {
		return err
	}
	if key != nil {
		if err := insertKey(ctx, tx, key); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// GetMember returns a user's membership of an org.
func (s *Store) GetMember(ctx context.Context, org, user string) (*Member, error) {
	var role string
	var created int64
	err := s.db.QueryRowContext(ctx, `SELECT role, created_at FROM members WHERE org_id = ? AND user_name = ?`, org, user).Scan(&role, &created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("member %q of org %q: %w", user, org, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return &Member{OrgID: org, User: user, Role: Role(role), CreatedAt: fromNanos(created)}, nil
}

// ListMembers lists an org's members by user name.
func (s *Store) ListMembers(ctx context.Context, org string) ([]*Member, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT user_name, role, created_at FROM members WHERE org_id = ? ORDER BY user_name`, org)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Member
	for rows.Next() {
		m := &Member{OrgID: org}
		var role string
		var created int64
		if err := rows.Scan(&m.User, &role, &created); err != nil {
			return nil, err
		}
		m.Role, m.CreatedAt = Role(role), fromNanos(created)
		out = append(out, m)
	}
	return out, rows.Err()
}

// RemoveMember removes a user from an org and revokes the user's keys there.
// Removing the org's last admin is refused (failed precondition).
func (s *Store) RemoveMember(ctx context.Context, org, user string, at time.Time) error {
	defer s.authChanged()
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var role string
	err = tx.QueryRowContext(ctx, `SELECT role FROM members WHERE org_id = ? AND user_name = ?`, org, user).Scan(&role)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("member %q of org %q: %w", user, org, errdefs.ErrNotFound)
	}
	if err != nil {
		return err
	}
	if Role(role) == RoleAdmin {
		var admins int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM members WHERE org_id = ? AND role = ?`, org, string(RoleAdmin)).Scan(&admins); err != nil {
			return err
		}
		if admins <= 1 {
			return fmt.Errorf("user %q is the last admin of org %q; add another admin first: %w", user, org, errdefs.ErrFailedPrecondition)
		}
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM members WHERE org_id = ? AND user_name = ?`, org, user); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE api_keys SET revoked_at = ? WHERE org_id = ? AND user_name = ? AND revoked_at = 0`, nanos(at), org, user); err != nil {
		return err
	}
	return tx.Commit()
}

func insertKey(ctx context.Context, tx *txn, k *APIKey) error {
	if _, err := tx.ExecContext(ctx, `INSERT INTO api_keys (id, hash, prefix, org_id, user_name, name, role, created_by, created_at, expires_at)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, k.ID, k.Hash, k.Prefix, k.OrgID, k.User, k.Name, string(k.Role), k.CreatedBy,
		nanos(k.CreatedAt), nanos(k.ExpiresAt)); err != nil {
		return fmt.Errorf("API key %q: %w", k.Name, err)
	}
	return nil
}

// CreateKey stores a key for a current member of its org.
func (s *Store) CreateKey(ctx context.Context, k *APIKey) error {
	defer s.authChanged()
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if !exists(ctx, tx, `SELECT 1 FROM members WHERE org_id = ? AND user_name = ?`, k.OrgID, k.User) {
		return fmt.Errorf("user %q is not a member of org %q: %w", k.User, k.OrgID, errdefs.ErrNotFound)
	}
	if err := insertKey(ctx, tx, k); err != nil {
		return err
	}
	return tx.Commit()
}

const keyColumns = `k.id, k.hash, k.prefix, k.org_id, k.user_name, k.name, k.role, k.created_by, k.created_at, k.expires_at, k.last_used_at, k.revoked_at`

type scanner interface{ Scan(dest ...any) error }

func scanKey(r scanner, extra ...any) (*APIKey, error) {
	k := &APIKey{}
	var role string
	var created, expires, used, revoked int64
	dest := append([]any{&k.ID, &k.Hash, &k.Prefix, &k.OrgID, &k.User, &k.Name, &role, &k.CreatedBy, &created, &expires, &used, &revoked}, extra...)
	if err := r.Scan(dest...); err != nil {
		return nil, err
	}
	k.Role = Role(role)
	k.CreatedAt, k.ExpiresAt, k.LastUsedAt, k.RevokedAt = fromNanos(created), fromNanos(expires), fromNanos(used), fromNanos(revoked)
	return k, nil
}

// KeyByHash finds a key by the hash of its secret, with its user's current
// role in the key's org. A key whose user is no longer a member is
// ErrNotFound; revoked and expired keys are returned (the caller decides).
func (s *Store) KeyByHash(ctx context.Context, hash string) (*KeyAuth, error) {
	var role string
	var nodeAdmin int
	k, err := scanKey(s.db.QueryRowPrepared(ctx, `SELECT `+keyColumns+`, m.role, u.node_admin FROM api_keys k
		JOIN members m ON m.org_id = k.org_id AND m.user_name = k.user_name
		JOIN users u ON u.name = k.user_name
		WHERE k.hash = ?`, hash), &role, &nodeAdmin)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("API key: %w", errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("API key lookup: %w", err)
	}
	return &KeyAuth{Key: *k, MemberRole: Role(role), NodeAdmin: nodeAdmin != 0}, nil
}

// TouchKey records that a key was used at t.
func (s *Store) TouchKey(ctx context.Context, id string, t time.Time) error {
	_, err := s.db.ExecPrepared(ctx, `UPDATE api_keys SET last_used_at = ? WHERE id = ?`, nanos(t), id)
	return err
}

// ListKeys lists an org's keys (of one user, unless user is ""), newest first.
func (s *Store) ListKeys(ctx context.Context, org, user string) ([]*APIKey, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+keyColumns+` FROM api_keys k WHERE k.org_id = ? AND (? = '' OR k.user_name = ?)
		ORDER BY k.created_at DESC, k.id`, org, user, user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*APIKey
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, rows.Err()
}

// GetKey returns an org's key by id or prefix.
func (s *Store) GetKey(ctx context.Context, org, idOrPrefix string) (*APIKey, error) {
	k, err := scanKey(s.db.QueryRowContext(ctx, `SELECT `+keyColumns+` FROM api_keys k WHERE k.org_id = ? AND (k.id = ? OR k.prefix = ?)`,
		org, idOrPrefix, idOrPrefix))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("API key %q: %w", idOrPrefix, errdefs.ErrNotFound)
	}
	return k, err
}

// RevokeKey revokes a key of an org at t (revoking twice keeps the first time).
func (s *Store) RevokeKey(ctx context.Context, org, id string, t time.Time) error {
	defer s.authChanged()
	res, err := s.db.ExecContext(ctx, `UPDATE api_keys SET revoked_at = ? WHERE org_id = ? AND id = ? AND revoked_at = 0`, nanos(t), org, id)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		if _, err := s.GetKey(ctx, org, id); err != nil {
			return err
		}
	}
	return nil
}

// AuditRecord is one entry of an org's audit trail.
type AuditRecord struct {
	Seq     int64
	OrgID   string
	At      time.Time
	Actor   string // user subject, or workload subject
	Via     string // key prefix, or "sandbox:<id>"
	Peer    string // remote address
	Action  string // Service/Method
	Object  string
	Outcome string // "ok" or an error code
	Detail  string
}

// AddAudit appends a record.
func (s *Store) AddAudit(ctx context.Context, r AuditRecord) error {
	// The fields may carry what a caller sent (an object name, a peer's
	// address): stored as valid UTF-8 without NUL, which PostgreSQL would
	// refuse, losing the record.
	_, err := s.db.ExecPrepared(ctx, `INSERT INTO audit (org_id, at, actor, via, peer, action, object, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		text(r.OrgID), nanos(r.At), text(r.Actor), text(r.Via), text(r.Peer), text(r.Action), text(r.Object), text(r.Outcome), text(r.Detail))
	return err
}

// AddAudits appends records in one transaction (all or none).
func (s *Store) AddAudits(ctx context.Context, recs []AuditRecord) error {
	if len(recs) == 1 {
		return s.AddAudit(ctx, recs[0])
	}
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, r := range recs {
		if _, err := tx.ExecContext(ctx, `INSERT INTO audit (org_id, at, actor, via, peer, action, object, outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			text(r.OrgID), nanos(r.At), text(r.Actor), text(r.Via), text(r.Peer), text(r.Action), text(r.Object), text(r.Outcome), text(r.Detail)); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// auditPruneBatch is how many audit records one DELETE of PruneAudit
// removes: each is its own transaction, so the writers the store serves
// meanwhile (the API's audit writer, creates) wait for one batch at most.
const auditPruneBatch = 2000

// PruneAudit removes the org audit records (every org's) stored with a
// time before before, in batches of auditPruneBatch (each its own
// transaction, found through the audit_at index), and returns how many it
// removed. A cancelled ctx stops it between batches: what was removed
// stays removed, the rest goes at the next call.
func (s *Store) PruneAudit(ctx context.Context, before time.Time) (int64, error) {
	return s.deleteInBatches(ctx, `DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE at < ? ORDER BY at LIMIT ?)`,
		auditPruneBatch, nanos(before))
}

// deleteInBatches runs the DELETE q (its last argument the LIMIT of a
// batch, after args) until a batch removes fewer than batch rows: each
// batch is its own statement, so no pass holds the writer for long. It
// returns how many rows it removed, also with an error.
func (s *Store) deleteInBatches(ctx context.Context, q string, batch int64, args ...any) (int64, error) {
	args = append(args, batch)
	var total int64
	for {
		res, err := s.db.ExecPrepared(ctx, q, args...)
		if err != nil {
			return total, err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, err
		}
		total += n
		if n < batch {
			return total, nil
		}
	}
}

// AuditQuery selects audit records of an org, newest first, at most Limit.
type AuditQuery struct {
	OrgID  string
	Action string
	Since  time.Time
	Limit  int
}

// ListAudit returns the records q selects, newest first.
func (s *Store) ListAudit(ctx context.Context, q AuditQuery) ([]AuditRecord, error) {
	if q.Limit <= 0 || q.Limit > 10000 {
		q.Limit = 100
	}
	rows, err := s.db.QueryContext(ctx, `SELECT seq, org_id, at, actor, via, peer, action, object, outcome, detail FROM audit
		WHERE org_id = ? AND (? = '' OR action = ?) AND at >= ? ORDER BY seq DESC LIMIT ?`,
		q.OrgID, q.Action, q.Action, nanos(q.Since), q.Limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []AuditRecord
	for rows.Next() {
		var r AuditRecord
		var at int64
		if err := rows.Scan(&r.Seq, &r.OrgID, &at, &r.Actor, &r.Via, &r.Peer, &r.Action, &r.Object, &r.Outcome, &r.Detail); err != nil {
			return nil, err
		}
		r.At = fromNanos(at)
		out = append(out, r)
	}
	return out, rows.Err()
}

// AddOrgImages records that an org pulled, built or warmed the images refs
// name (references, content hashes or digests): they are in its view.
func (s *Store) AddOrgImages(ctx context.Context, org string, refs ...string) error {
	for _, r := range refs {
		if r == "" {
			continue
		}
		if _, err := s.db.ExecContext(ctx, `INSERT INTO org_images (org_id, ref) VALUES (?, ?) ON CONFLICT (org_id, ref) DO NOTHING`, org, r); err != nil {
			return err
		}
	}
	return nil
}

// ImageOwners returns the orgs that recorded ref (none: a node-seeded image,
// readable by every org).
func (s *Store) ImageOwners(ctx context.Context, ref string) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT org_id FROM org_images WHERE ref = ? ORDER BY org_id`, ref)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var o string
		if err := rows.Scan(&o); err != nil {
			return nil, err
		}
		out = append(out, o)
	}
	return out, rows.Err()
}

// RemoveOrgImages takes refs out of an org's view.
func (s *Store) RemoveOrgImages(ctx context.Context, org string, refs ...string) error {
	for _, r := range refs {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM org_images WHERE org_id = ? AND ref = ?`, org, r); err != nil {
			return err
		}
	}
	return nil
}

// UploadRef is how an org's upload of content digest is recorded in its
// view (org_images; no image reference has this form).
func UploadRef(digest string) string { return "upload:" + digest }

// AddOrgUpload records that org uploaded content digest of size bytes
// (UploadRef in its view), charging the org's upload budget: with max > 0,
// an upload that would make the org's recorded uploads total more than max
// bytes is refused (resource_exhausted, naming the numbers) and nothing is
// recorded. Content the org recorded already is not charged again (one
// recorded without its size is charged it now). Uploads of one org are
// counted one at a time (a transaction-scoped lock on PostgreSQL; SQLite
// has one writer). added says the record is new: the caller takes it back
// (RemoveOrgImages) if the content then fails to be stored.
func (s *Store) AddOrgUpload(ctx context.Context, org, digest string, size, max int64) (added bool, err error) {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return false, err
	}
	defer tx.Rollback()
	if err := tx.d.lock(ctx, tx, "uploads:"+org); err != nil {
		return false, err
	}
	ref := UploadRef(digest)
	var had int64
	switch err := tx.QueryRowContext(ctx, `SELECT size FROM org_images WHERE org_id = ? AND ref = ?`, org, ref).Scan(&had); {
	case err == nil:
		if had >= size {
			return false, nil
		}
	case errors.Is(err, sql.ErrNoRows):
		had = -1
	default:
		return false, err
	}
	if max > 0 {
		used, err := orgUploadBytes(ctx, tx, org)
		if err != nil {
			return false, err
		}
		if more := size - max0(had); used+more > max {
			return false, fmt.Errorf("upload of %s (%d bytes): org %q has %d bytes of uploads recorded and its upload quota is %d bytes (max_upload_bytes; uploads go when the upload GC removes them, unused for chalkd's --upload-gc-grace): %w",
				digest, size, org, used, max, errdefs.ErrResourceExhausted)
		}
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO org_images (org_id, ref, size) VALUES (?, ?, ?)
		ON CONFLICT (org_id, ref) DO UPDATE SET size = excluded.size`, org, ref, size); err != nil {
		return false, err
	}
	return had < 0, tx.Commit()
}

func max0(n int64) int64 { return max(n, 0) }

// OrgUploadBytes is what org's recorded uploads are charged (AddOrgUpload).
func (s *Store) OrgUploadBytes(ctx context.Context, org string) (int64, error) {
	return orgUploadBytes(ctx, s.db, org)
}

func orgUploadBytes(ctx context.Context, q queryer, org string) (int64, error) {
	var n int64
	err := q.QueryRowContext(ctx, `SELECT COALESCE(SUM(size), 0) FROM org_images WHERE org_id = ? AND ref LIKE 'upload:%'`, org).Scan(&n)
	return n, err
}

// UploadDigests lists the digests of every org's upload records.
func (s *Store) UploadDigests(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT DISTINCT ref FROM org_images WHERE ref LIKE 'upload:%' ORDER BY ref`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var r string
		if err := rows.Scan(&r); err != nil {
			return nil, err
		}
		out = append(out, strings.TrimPrefix(r, "upload:"))
	}
	return out, rows.Err()
}

// RemoveUploads drops every org's record of the uploads of digests (the
// upload GC removed their content): their orgs' budgets are charged for
// them no more.
func (s *Store) RemoveUploads(ctx context.Context, digests ...string) error {
	for _, d := range digests {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM org_images WHERE ref = ?`, UploadRef(d)); err != nil {
			return err
		}
	}
	return nil
}

// SetMemberRole changes a member's role; taking admin from the org's last
// admin is refused (failed precondition).
func (s *Store) SetMemberRole(ctx context.Context, org, user string, role Role) error {
	defer s.authChanged()
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var cur string
	err = tx.QueryRowContext(ctx, `SELECT role FROM members WHERE org_id = ? AND user_name = ?`, org, user).Scan(&cur)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("member %q of org %q: %w", user, org, errdefs.ErrNotFound)
	}
	if err != nil {
		return err
	}
	if Role(cur) == RoleAdmin && role != RoleAdmin {
		var admins int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM members WHERE org_id = ? AND role = ?`, org, string(RoleAdmin)).Scan(&admins); err != nil {
			return err
		}
		if admins <= 1 {
			return fmt.Errorf("user %q is the last admin of org %q; make another admin first: %w", user, org, errdefs.ErrFailedPrecondition)
		}
	}
	if _, err := tx.ExecContext(ctx, `UPDATE members SET role = ? WHERE org_id = ? AND user_name = ?`, string(role), org, user); err != nil {
		return err
	}
	return tx.Commit()
}
