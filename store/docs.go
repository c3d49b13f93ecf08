package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Named documents: the tables policies, tunnels and mcp_servers each hold
// one JSON document per (org_id, name). These helpers read, list and delete
// them; table is always one of those constant names, never input.

type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// getNamed reads the document (org, name) of table into a new T; a missing
// one is ErrNotFound naming what (e.g. "tunnel") and name.
func getNamed[T any](ctx context.Context, q queryer, table, what, orgID, name string) (*T, error) {
	var doc []byte
	err := q.QueryRowContext(ctx, `SELECT doc FROM `+table+` WHERE org_id = ? AND name = ?`, orgID, name).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%s %q: %w", what, name, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	var v T
	if err := json.Unmarshal(doc, &v); err != nil {
		return nil, fmt.Errorf("%s %q: %w", what, name, err)
	}
	return &v, nil
}

// listNamed returns the org's documents of table by name.
func listNamed[T any](ctx context.Context, db *handle, table, orgID string) ([]*T, error) {
	rows, err := db.QueryContext(ctx, `SELECT doc FROM `+table+` WHERE org_id = ? ORDER BY name`, orgID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*T
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		var v T
		if err := json.Unmarshal(doc, &v); err != nil {
			return nil, err
		}
		out = append(out, &v)
	}
	return out, rows.Err()
}

// deleteNamed removes the document (org, name) of table; a missing one is
// ErrNotFound naming what and name.
func deleteNamed(ctx context.Context, db *handle, table, what, orgID, name string) error {
	res, err := db.ExecContext(ctx, `DELETE FROM `+table+` WHERE org_id = ? AND name = ?`, orgID, name)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%s %q: %w", what, name, errdefs.ErrNotFound)
	}
	return nil
}
