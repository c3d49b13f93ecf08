package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Node states the control plane holds (NodeState*): ready takes new
// sandboxes; cordoned and draining take none (draining: its running
// sandboxes are left to end).
const (
	NodeReady    = "ready"
	NodeCordoned = "cordoned"
	NodeDraining = "draining"
)

// Node is a node agent that joined the fleet (table nodes).
type Node struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	// URL is where the node serves the node API (https://host:port).
	URL   string `json:"url"`
	State string `json:"state"`
	// Capacity the node offers sandboxes.
	CPU      float64 `json:"cpu"`
	MemoryMB int64   `json:"memory_mb"`
	Slots    int     `json:"slots"`
	// CertSerial is the serial (hex) of the node's current certificate:
	// issued at join, replaced at each renewal (RenewNodeCert).
	// SupersededSerial is the one the last renewal replaced, accepted
	// until SupersededUntil (the grace in which the node moves its
	// connections to the new one; "" and zero: none). The three are
	// columns of their own (not in doc): UpdateNode never changes them.
	CertSerial       string    `json:"-"`
	SupersededSerial string    `json:"-"`
	SupersededUntil  time.Time `json:"-"`
	JoinedAt         time.Time `json:"joined_at"`
	LastHeartbeat    time.Time `json:"last_heartbeat"`
	// BootID is the node process's, from its heartbeats: a new one means
	// it restarted.
	BootID string `json:"boot_id,omitempty"`
	// DrainDeadline, while draining, is when its sandboxes still running
	// are terminated (zero: none).
	DrainDeadline time.Time `json:"drain_deadline,omitempty"`
}

// nodeCols are the columns a Node is read from (scanNode).
const nodeCols = `doc, cert_serial, superseded_serial, superseded_until`

// PutNode records (or replaces) a node, its certificate serials with it.
func (s *Store) PutNode(ctx context.Context, n *Node) error {
	doc, err := json.Marshal(n)
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO nodes(id, name, doc, cert_serial, superseded_serial, superseded_until) VALUES(?,?,?,?,?,?)
		ON CONFLICT(id) DO UPDATE SET name = excluded.name, doc = excluded.doc, cert_serial = excluded.cert_serial,
		superseded_serial = excluded.superseded_serial, superseded_until = excluded.superseded_until`,
		n.ID, n.Name, string(doc), n.CertSerial, n.SupersededSerial, unixNanoOrZero(n.SupersededUntil))
	if err != nil {
		return fmt.Errorf("node %s: %w", n.ID, err)
	}
	return nil
}

func unixNanoOrZero(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func timeOrZero(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// scanNode reads a row of nodeCols; doc is the raw document.
func scanNode(id string, row interface{ Scan(...any) error }) (n *Node, doc string, err error) {
	var serial, superseded string
	var until int64
	if err := row.Scan(&doc, &serial, &superseded, &until); err != nil {
		return nil, "", err
	}
	if n, err = decodeNode(id, doc); err != nil {
		return nil, "", err
	}
	n.CertSerial, n.SupersededSerial, n.SupersededUntil = serial, superseded, timeOrZero(until)
	return n, doc, nil
}

// GetNode returns a node (ErrNotFound if none).
func (s *Store) GetNode(ctx context.Context, id string) (*Node, error) {
	n, _, err := scanNode(id, s.db.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
	}
	return n, err
}

func decodeNode(id, doc string) (*Node, error) {
	var n Node
	if err := json.Unmarshal([]byte(doc), &n); err != nil {
		return nil, fmt.Errorf("node %q: %w", id, err)
	}
	return &n, nil
}

// ListNodes lists the nodes by id.
func (s *Store) ListNodes(ctx context.Context) ([]*Node, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, `+nodeCols+` FROM nodes ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Node
	for rows.Next() {
		var id, doc, serial, superseded string
		var until int64
		if err := rows.Scan(&id, &doc, &serial, &superseded, &until); err != nil {
			return nil, err
		}
		n, err := decodeNode(id, doc)
		if err != nil {
			return nil, err
		}
		n.CertSerial, n.SupersededSerial, n.SupersededUntil = serial, superseded, timeOrZero(until)
		out = append(out, n)
	}
	return out, rows.Err()
}

// AddJoinToken records a join token by its hash, valid until expires.
func (s *Store) AddJoinToken(ctx context.Context, hash string, expires time.Time) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO join_tokens(hash, expires_at, used) VALUES(?,?,0)`, hash, expires.Unix())
	return err
}

// UseJoinToken consumes the join token with this hash: it succeeds once, for
// a token that exists and has not expired at now; otherwise
// ErrPermissionDenied (which of the three is not said).
func (s *Store) UseJoinToken(ctx context.Context, hash string, now time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE join_tokens SET used = 1 WHERE hash = ? AND used = 0 AND expires_at > ?`, hash, now.Unix())
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return fmt.Errorf("join token: unknown, expired or already used: %w", errdefs.ErrPermissionDenied)
	}
	return nil
}

// UpdateNode changes node id with fn, atomically against other updates (a
// compare-and-swap on the record, retried): a heartbeat never undoes a
// cordon made meanwhile. fn's error aborts the update. The certificate
// serials are not changed here (RenewNodeCert does, under its own
// compare-and-swap): fn's changes to them are ignored.
func (s *Store) UpdateNode(ctx context.Context, id string, fn func(*Node) error) (*Node, error) {
	for range 20 {
		n, old, err := scanNode(id, s.db.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE id = ?`, id))
		if errors.Is(err, sql.ErrNoRows) {
			return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
		} else if err != nil {
			return nil, err
		}
		serial, superseded, until := n.CertSerial, n.SupersededSerial, n.SupersededUntil
		if err := fn(n); err != nil {
			return nil, err
		}
		n.CertSerial, n.SupersededSerial, n.SupersededUntil = serial, superseded, until
		doc, err := json.Marshal(n)
		if err != nil {
			return nil, err
		}
		res, err := s.db.ExecContext(ctx, `UPDATE nodes SET name = ?, doc = ? WHERE id = ? AND doc = ?`, n.Name, string(doc), id, old)
		if err != nil {
			return nil, err
		}
		if k, _ := res.RowsAffected(); k == 1 {
			return n, nil
		}
	}
	return nil, fmt.Errorf("node %q: too many concurrent updates: %w", id, errdefs.ErrUnavailable)
}

// NodeCert is what admitting a node by its certificate needs, read in one
// query: whether the node was removed (revoked), whether it has a record,
// and its serials (Node's CertSerial, SupersededSerial, SupersededUntil).
type NodeCert struct {
	Revoked          bool
	Member           bool
	Serial           string
	SupersededSerial string
	SupersededUntil  time.Time
}

// Accepts says whether a certificate with serial is node's at now: the
// current one, or the superseded one before its deadline. (Revoked and
// Member are the caller's to check first.)
func (c NodeCert) Accepts(serial string, now time.Time) bool {
	if serial == "" {
		return false
	}
	return serial == c.Serial || serial == c.SupersededSerial && now.Before(c.SupersededUntil)
}

// NodeCertOf reads node id's NodeCert (every node request asks: one
// prepared query). An error reading the store is returned as such:
// callers refuse the node then (fail safe).
func (s *Store) NodeCertOf(ctx context.Context, id string) (NodeCert, error) {
	var revoked int
	var serial, superseded sql.NullString
	var until sql.NullInt64
	if err := s.db.QueryRowPrepared(ctx, `SELECT (SELECT count(*) FROM revoked_nodes WHERE id = ?),
		(SELECT cert_serial FROM nodes WHERE id = ?), (SELECT superseded_serial FROM nodes WHERE id = ?),
		(SELECT superseded_until FROM nodes WHERE id = ?)`, id, id, id, id).Scan(&revoked, &serial, &superseded, &until); err != nil {
		return NodeCert{}, fmt.Errorf("node %q: certificate check: %w", id, err)
	}
	return NodeCert{Revoked: revoked > 0, Member: serial.Valid, Serial: serial.String,
		SupersededSerial: superseded.String, SupersededUntil: timeOrZero(until.Int64)}, nil
}

// RenewNodeCert records node id's new certificate serial, issued to the
// holder of the certificate with serial presented, atomically against
// other renewals and checks (a compare-and-swap on the serials):
//   - presented is the current serial: the new one becomes current and
//     presented is superseded, accepted until now+grace;
//   - presented is the superseded one, before its deadline (the node's
//     last renewal answer was lost, so it still holds only that one): the
//     new one becomes current, the superseded one and its deadline stay
//     (never extended: renewing again and again from an old certificate
//     gains no time), and the certificate issued in between, which the
//     node never received, is accepted no more;
//   - anything else (an old certificate past its deadline, one never
//     recorded): ErrPermissionDenied, nothing changes.
//
// ErrNotFound if the node has no record.
func (s *Store) RenewNodeCert(ctx context.Context, id, presented, serial string, now time.Time, grace time.Duration) error {
	for range 20 {
		c, err := s.NodeCertOf(ctx, id)
		if err != nil {
			return err
		}
		if !c.Member {
			return fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
		}
		next := c
		switch {
		case presented != "" && presented == c.Serial:
			next.SupersededSerial, next.SupersededUntil = presented, now.Add(grace)
		case c.Accepts(presented, now):
			// the superseded one, in time: it and its deadline stay
		default:
			return fmt.Errorf("node %s: its certificate (serial %s) was superseded by a renewal: %w", id, presented, errdefs.ErrPermissionDenied)
		}
		next.Serial = serial
		res, err := s.db.ExecContext(ctx, `UPDATE nodes SET cert_serial = ?, superseded_serial = ?, superseded_until = ?
			WHERE id = ? AND cert_serial = ? AND superseded_serial = ? AND superseded_until = ?`,
			next.Serial, next.SupersededSerial, unixNanoOrZero(next.SupersededUntil),
			id, c.Serial, c.SupersededSerial, unixNanoOrZero(c.SupersededUntil))
		if err != nil {
			return fmt.Errorf("node %q: renew: %w", id, err)
		}
		if k, _ := res.RowsAffected(); k == 1 {
			return nil
		}
	}
	return fmt.Errorf("node %q: too many concurrent renewals: %w", id, errdefs.ErrUnavailable)
}
