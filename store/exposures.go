package store

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Exposure is a sandbox port served on the node's ingress listener (table
// exposures, one row per sandbox and port). Rows of ended sandboxes are
// deleted when they end; the ingress never routes to a sandbox that is not
// running whatever rows remain.
type Exposure struct {
	SandboxID string    `json:"sandbox_id"`
	Port      uint16    `json:"port"`
	OrgID     string    `json:"org_id"`
	Public    bool      `json:"public"`
	CreatedBy string    `json:"created_by"`
	CreatedAt time.Time `json:"created_at"`
}

// PutExposure records (or replaces) an exposure.
func (s *Store) PutExposure(ctx context.Context, e *Exposure) error {
	doc, err := json.Marshal(e)
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO exposures(sandbox_id, port, org_id, doc) VALUES(?,?,?,?)
		ON CONFLICT(sandbox_id, port) DO UPDATE SET org_id = excluded.org_id, doc = excluded.doc`,
		e.SandboxID, int(e.Port), e.OrgID, doc)
	if err != nil {
		return fmt.Errorf("exposure %s:%d: %w", e.SandboxID, e.Port, err)
	}
	return nil
}

// PutExposureLimit is PutExposure refusing (resource exhausted) a new port
// of a sandbox that has max exposures already (replacing one of them is
// allowed); counted under a lock per sandbox.
func (s *Store) PutExposureLimit(ctx context.Context, e *Exposure, max int) error {
	doc, err := json.Marshal(e)
	if err != nil {
		return err
	}
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := tx.d.lock(ctx, tx, "exposures:"+e.SandboxID); err != nil {
		return err
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM exposures WHERE sandbox_id = ? AND port <> ?`, e.SandboxID, int(e.Port)).Scan(&n); err != nil {
		return err
	}
	if n >= max {
		return fmt.Errorf("exposure of port %d of sandbox %q: it has %d exposed ports, the most a sandbox may have; unexpose one first: %w",
			e.Port, e.SandboxID, n, errdefs.ErrResourceExhausted)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO exposures(sandbox_id, port, org_id, doc) VALUES(?,?,?,?)
		ON CONFLICT(sandbox_id, port) DO UPDATE SET org_id = excluded.org_id, doc = excluded.doc`,
		e.SandboxID, int(e.Port), e.OrgID, doc); err != nil {
		return fmt.Errorf("exposure %s:%d: %w", e.SandboxID, e.Port, err)
	}
	return tx.Commit()
}

// DeleteExposure removes one exposure (ErrNotFound if there was none).
func (s *Store) DeleteExposure(ctx context.Context, sandboxID string, port uint16) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM exposures WHERE sandbox_id = ? AND port = ?`, sandboxID, int(port))
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("exposure of port %d of sandbox %q: %w", port, sandboxID, errdefs.ErrNotFound)
	}
	return nil
}

// DeleteExposures removes every exposure of a sandbox.
func (s *Store) DeleteExposures(ctx context.Context, sandboxID string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM exposures WHERE sandbox_id = ?`, sandboxID)
	return err
}

// ListExposures lists a sandbox's exposures ("" = every sandbox's), by sandbox and port.
func (s *Store) ListExposures(ctx context.Context, sandboxID string) ([]*Exposure, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT doc FROM exposures WHERE (? = '' OR sandbox_id = ?) ORDER BY sandbox_id, port`, sandboxID, sandboxID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*Exposure
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		var e Exposure
		if err := json.Unmarshal(doc, &e); err != nil {
			return nil, err
		}
		out = append(out, &e)
	}
	return out, rows.Err()
}

// GetExposure returns one exposure (ErrNotFound if none).
func (s *Store) GetExposure(ctx context.Context, sandboxID string, port uint16) (*Exposure, error) {
	var doc []byte
	err := s.db.QueryRowContext(ctx, `SELECT doc FROM exposures WHERE sandbox_id = ? AND port = ?`, sandboxID, int(port)).Scan(&doc)
	if err != nil {
		return nil, fmt.Errorf("exposure of port %d of sandbox %q: %w", port, sandboxID, errdefs.ErrNotFound)
	}
	var e Exposure
	if err := json.Unmarshal(doc, &e); err != nil {
		return nil, err
	}
	return &e, nil
}
