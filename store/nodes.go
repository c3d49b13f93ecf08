package store

import (
	"context"
	"encoding/json"
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
	// CertSerial is the serial of the certificate issued at join (hex).
	CertSerial    string    `json:"cert_serial"`
	JoinedAt      time.Time `json:"joined_at"`
	LastHeartbeat time.Time `json:"last_heartbeat"`
	// BootID is the node process's, from its heartbeats: a new one means
	// it restarted.
	BootID string `json:"boot_id,omitempty"`
	// DrainDeadline, while draining, is when its sandboxes still running
	// are terminated (zero: none).
	DrainDeadline time.Time `json:"drain_deadline,omitempty"`
}

// PutNode records (or replaces) a node.
func (s *Store) PutNode(ctx context.Context, n *Node) error {
	doc, err := json.Marshal(n)
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO nodes(id, name, doc) VALUES(?,?,?)
		ON CONFLICT(id) DO UPDATE SET name = excluded.name, doc = excluded.doc`, n.ID, n.Name, string(doc))
	if err != nil {
		return fmt.Errorf("node %s: %w", n.ID, err)
	}
	return nil
}

// GetNode returns a node (ErrNotFound if none).
func (s *Store) GetNode(ctx context.Context, id string) (*Node, error) {
	var doc string
	if err := s.db.QueryRowContext(ctx, `SELECT doc FROM nodes WHERE id = ?`, id).Scan(&doc); err != nil {
		return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
	}
	return decodeNode(id, doc)
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
	rows, err := s.db.QueryContext(ctx, `SELECT doc FROM nodes ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Node
	for rows.Next() {
		var doc string
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		var n Node
		if err := json.Unmarshal([]byte(doc), &n); err != nil {
			return nil, err
		}
		out = append(out, &n)
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
// cordon made meanwhile. fn's error aborts the update.
func (s *Store) UpdateNode(ctx context.Context, id string, fn func(*Node) error) (*Node, error) {
	for range 20 {
		var old string
		if err := s.db.QueryRowContext(ctx, `SELECT doc FROM nodes WHERE id = ?`, id).Scan(&old); err != nil {
			return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
		}
		var n Node
		if err := json.Unmarshal([]byte(old), &n); err != nil {
			return nil, fmt.Errorf("node %q: %w", id, err)
		}
		if err := fn(&n); err != nil {
			return nil, err
		}
		doc, err := json.Marshal(&n)
		if err != nil {
			return nil, err
		}
		res, err := s.db.ExecContext(ctx, `UPDATE nodes SET name = ?, doc = ? WHERE id = ? AND doc = ?`, n.Name, string(doc), id, old)
		if err != nil {
			return nil, err
		}
		if k, _ := res.RowsAffected(); k == 1 {
			return &n, nil
		}
	}
	return nil, fmt.Errorf("node %q: too many concurrent updates: %w", id, errdefs.ErrUnavailable)
}
