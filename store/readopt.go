package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// ReviveLost puts a sandbox reported lost back to running (issue #17:
// its node returned within the grace period and still runs it with the
// same init pid). It is a compare-and-swap: only a record in state
// stopped with end_reason "lost", on node, with init pid and ended no
// earlier than since changes (two control-plane replicas that both
// believe they lead revive it once). It returns the revived record, or
// nil when the record is not such a lost sandbox.
func (s *Store) ReviveLost(ctx context.Context, id, node string, pid int, since time.Time) (*Sandbox, error) {
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	var doc []byte
	err = tx.QueryRowContext(ctx, `SELECT doc FROM sandboxes WHERE id = ? AND state = ?`+tx.d.forUpdate, id, StateStopped).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("sandbox %q: %w", id, err)
	}
	var sb Sandbox
	if err := json.Unmarshal(doc, &sb); err != nil {
		return nil, fmt.Errorf("sandbox %q record: %w", id, err)
	}
	if sb.EndReason != "lost" || sb.Node != node || node == "" || sb.Pid != pid || pid <= 0 || sb.EndedAt.Before(since) {
		return nil, nil
	}
	sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode, sb.Error = StateRunning, "", time.Time{}, 0, ""
	sb.LastActive = time.Now().UTC()
	if doc, err = json.Marshal(&sb); err != nil {
		return nil, err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET state = ?, doc = ? WHERE id = ? AND state = ?`, StateRunning, doc, id, StateStopped); err != nil {
		return nil, fmt.Errorf("sandbox %q: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	return &sb, nil
}
