package store

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/pressly/goose/v3"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// CopyTo copies every record of a SQLite store s into dst, an empty
// PostgreSQL store at the same schema version, in one transaction of dst
// (a failure leaves dst empty). Tables are found in the schema, so a table
// added by a migration is copied with no change here. Sandboxes keep their
// order (newest first); the audit sequences continue after the copied ones.
// Text PostgreSQL cannot hold (NUL bytes, invalid UTF-8, which SQLite
// kept) is copied with U+FFFD in their place.
// progress (if not nil) is told each table's row count as it is copied.
// chalkd must not be running on s.
func (s *Store) CopyTo(ctx context.Context, dst *Store, progress func(table string, rows int)) error {
	if s.db.d.postgres || !dst.db.d.postgres {
		return fmt.Errorf("copy the store: from SQLite to PostgreSQL only: %w", errdefs.ErrInvalidArgument)
	}
	tables, err := s.tables(ctx)
	if err != nil {
		return err
	}
	var srcV, dstV int64
	if err := s.db.QueryRowContext(ctx, `SELECT max(version_id) FROM `+goose.DefaultTablename).Scan(&srcV); err != nil {
		return fmt.Errorf("source schema version: %w", err)
	}
	if err := dst.db.QueryRowContext(ctx, `SELECT max(version_id) FROM `+goose.DefaultTablename).Scan(&dstV); err != nil {
		return fmt.Errorf("destination schema version: %w", err)
	}
	if srcV != dstV {
		return fmt.Errorf("copy the store: schema version %d to %d: open both with the same chalkd: %w", srcV, dstV, errdefs.ErrFailedPrecondition)
	}
	tx, err := dst.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, t := range tables {
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM `+t).Scan(&n); err != nil {
			return fmt.Errorf("destination table %s: %w", t, err)
		}
		if n > 0 {
			return fmt.Errorf("copy the store: destination table %s has %d rows; copy into an empty database: %w", t, n, errdefs.ErrFailedPrecondition)
		}
		n, err := s.copyTable(ctx, tx, t)
		if err != nil {
			return fmt.Errorf("copy table %s: %w", t, err)
		}
		if progress != nil {
			progress(t, n)
		}
	}
	// Identity columns continue after the copied values.
	for _, seq := range [][2]string{{"audit", "seq"}, {"mcp_audit", "seq"}} {
		if !slices.Contains(tables, seq[0]) {
			continue
		}
		if _, err := tx.ExecContext(ctx, `SELECT setval(pg_get_serial_sequence('`+seq[0]+`', '`+seq[1]+`'),
			(SELECT COALESCE(max(`+seq[1]+`), 0) + 1 FROM `+seq[0]+`), false)`); err != nil {
			return fmt.Errorf("sequence of %s: %w", seq[0], err)
		}
	}
	return tx.Commit()
}

// tables lists the store's tables (not goose's or SQLite's own), each
// after the tables its foreign keys reference.
func (s *Store) tables(ctx context.Context) ([]string, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name <> ? ORDER BY name`, goose.DefaultTablename)
	if err != nil {
		return nil, err
	}
	var names []string
	for rows.Next() {
		var t string
		if err := rows.Scan(&t); err != nil {
			rows.Close()
			return nil, err
		}
		names = append(names, t)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	refs := map[string][]string{}
	for _, t := range names {
		rows, err := s.db.QueryContext(ctx, `SELECT "table" FROM pragma_foreign_key_list(?)`, t)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var r string
			if err := rows.Scan(&r); err != nil {
				rows.Close()
				return nil, err
			}
			if r != t {
				refs[t] = append(refs[t], r)
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	var out []string
	state := map[string]int{} // 1: visiting, 2: done
	var visit func(t string) error
	visit = func(t string) error {
		switch state[t] {
		case 1:
			return fmt.Errorf("foreign keys of table %s form a cycle", t)
		case 2:
			return nil
		}
		state[t] = 1
		for _, r := range refs[t] {
			if err := visit(r); err != nil {
				return err
			}
		}
		state[t] = 2
		out = append(out, t)
		return nil
	}
	for _, t := range names {
		if err := visit(t); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// copyTable copies the rows of table t, in insertion (rowid) order, and
// returns how many.
func (s *Store) copyTable(ctx context.Context, tx *txn, t string) (int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT * FROM `+t+` ORDER BY rowid`)
	if err != nil {
		return 0, err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return 0, err
	}
	types, err := rows.ColumnTypes()
	if err != nil {
		return 0, err
	}
	n := 0
	insert := `INSERT INTO ` + t + ` (` + strings.Join(cols, ", ") + `) VALUES (` + strings.TrimSuffix(strings.Repeat("?, ", len(cols)), ", ") + `)`
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return n, err
		}
		for i, v := range vals {
			// A JSON document written as text into a BLOB column (or the
			// reverse) goes in as the destination column expects.
			switch strings.ToUpper(types[i].DatabaseTypeName()) {
			case "BLOB":
				if str, ok := v.(string); ok {
					vals[i] = []byte(str)
				}
			case "TEXT":
				if b, ok := v.([]byte); ok {
					v = string(b)
				}
				if str, ok := v.(string); ok {
					vals[i] = text(str) // SQLite kept NUL or invalid UTF-8; PostgreSQL cannot
				}
			}
		}
		if _, err := tx.ExecContext(ctx, insert, vals...); err != nil {
			return n, err
		}
		n++
	}
	return n, rows.Err()
}
