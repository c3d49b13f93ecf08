package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// RemoveNode removes node id from the fleet: its record is deleted and its
// id (with its certificate's serial) enters the revocation set, in one
// transaction, so no moment exists where the node is neither listed nor
// refused. A node's certificate names only its id, and ids are never
// reused: a node removed can come back only by joining anew (a new id).
func (s *Store) RemoveNode(ctx context.Context, id string, now time.Time) error {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	n, err := getNodeTx(ctx, tx, id)
	if err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO revoked_nodes(id, serial, revoked_at) VALUES(?,?,?)
		ON CONFLICT(id) DO NOTHING`, id, n.CertSerial, now.Unix()); err != nil {
		return fmt.Errorf("node %s: revoke: %w", id, err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM nodes WHERE id = ?`, id); err != nil {
		return fmt.Errorf("node %s: remove: %w", id, err)
	}
	return tx.Commit()
}

func getNodeTx(ctx context.Context, tx *txn, id string) (*Node, error) {
	n, _, err := scanNode(id, tx.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
	}
	return n, err
}

// NodeRevoked reports whether node id was removed from the fleet (its
// certificate revoked). An error reading the store is returned as such:
// callers refuse the node then too.
func (s *Store) NodeRevoked(ctx context.Context, id string) (bool, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM revoked_nodes WHERE id = ?`, id).Scan(&n); err != nil {
		return false, fmt.Errorf("node %q: revocation: %w", id, err)
	}
	return n > 0, nil
}
