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
	if _, err := tx.ExecContext(ctx, `UPDATE sandboxes SET state = ?, lost_node = '', lost_at = 0, doc = ? WHERE id = ? AND state = ?`, StateRunning, doc, id, StateStopped); err != nil {
		return nil, fmt.Errorf("sandbox %q: %w", id, err)
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	return &sb, nil
}

// lostCols are the lost_node and lost_at columns of sb: its node and the
// time it ended if it is recorded lost, else "" and 0.
func lostCols(sb *Sandbox) (string, int64) {
	if sb.State != StateStopped || sb.EndReason != "lost" || sb.Node == "" {
		return "", 0
	}
	return sb.Node, nanos(sb.EndedAt)
}

// LostOn lists the sandboxes recorded lost on node (stopped, end_reason
// lost) that ended at since or later, by id: the candidates for
// re-adoption when the node returns. Only those records are read (an
// index on lost_node, lost_at).
func (s *Store) LostOn(ctx context.Context, node string, since time.Time) ([]*Sandbox, error) {
	if node == "" {
		return nil, nil
	}
	return s.querySandboxes(ctx, func(sb *Sandbox) bool {
		return sb.EndReason == "lost" && sb.Node == node // as the columns say
	}, `SELECT doc FROM sandboxes WHERE lost_node = ? AND lost_at >= ? AND state = ? ORDER BY id`,
		node, nanos(since), StateStopped)
}
