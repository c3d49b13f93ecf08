package store

import (
	"context"
	"fmt"
)

// UploadLock serialises what is done with uploaded content digest among
// control-plane replicas sharing this store (and its blob directory): an
// upload's write of the content and the record of it (CommitUpload), and
// the upload GC's look at the content and its removal of it with every
// org's record of it (Forget). The upload GC of one replica never removes
// content or records an upload through another replica committed after the
// GC looked; it removes them before, and the upload then stores and records
// them again. On PostgreSQL it is a transaction-scoped advisory lock, and
// the records change in its transaction; on SQLite, which one process
// uses, it is nothing (the blob store's own lock serialises in process) and
// the records change at once.
type UploadLock struct {
	s      *Store
	tx     *txn // nil on SQLite
	digest string
}

// LockUpload takes the upload lock of digest (waiting while another holder
// has it, until ctx ends). Release it.
func (s *Store) LockUpload(ctx context.Context, digest string) (*UploadLock, error) {
	l := &UploadLock{s: s, digest: digest}
	if s.dsn == "" {
		return l, nil
	}
	// The transaction outlives ctx (which only bounds the wait): it ends
	// at Release.
	tx, err := s.db.BeginTx(context.WithoutCancel(ctx))
	if err != nil {
		return nil, err
	}
	if err := tx.d.lock(ctx, tx, "upload:"+digest); err != nil {
		_ = tx.Rollback()
		return nil, fmt.Errorf("upload lock of %s: %w", digest, err)
	}
	// A replica that died holding it (its host gone without closing the
	// connection) gives it up after this long idle.
	if _, err := tx.tx.ExecContext(ctx, `SET LOCAL idle_in_transaction_session_timeout = '60s'`); err != nil {
		_ = tx.Rollback()
		return nil, fmt.Errorf("upload lock of %s: %w", digest, err)
	}
	l.tx = tx
	return l, nil
}

func (l *UploadLock) exec(ctx context.Context, q string, args ...any) error {
	var err error
	if l.tx != nil {
		_, err = l.tx.ExecContext(ctx, q, args...)
	} else {
		_, err = l.s.db.ExecContext(ctx, q, args...)
	}
	return err
}

// Forget drops every org's record of the upload (the upload GC removes its
// content): their budgets are charged for it no more. On PostgreSQL it
// takes effect at Release.
func (l *UploadLock) Forget(ctx context.Context) error {
	return l.exec(ctx, `DELETE FROM org_images WHERE ref = ?`, UploadRef(l.digest))
}

// record records org's upload of the content (size bytes), with no charge
// beyond the one AddOrgUpload checked before the write.
func (l *UploadLock) record(ctx context.Context, org string, size int64) error {
	return l.exec(ctx, `INSERT INTO org_images (org_id, ref, size) VALUES (?, ?, ?)
		ON CONFLICT (org_id, ref) DO UPDATE SET size = excluded.size WHERE org_images.size < excluded.size`,
		org, UploadRef(l.digest), size)
}

// Release commits what was done under the lock and lets it go; an error
// means the records did not change (the content may have). Calls after
// the first do nothing.
func (l *UploadLock) Release() error {
	if l.tx == nil {
		return nil
	}
	tx := l.tx
	l.tx = nil
	if err := tx.Commit(); err != nil {
		_ = tx.Rollback()
		return fmt.Errorf("upload lock of %s: %w", l.digest, err)
	}
	return nil
}

// CommitUpload stores org's upload of content digest (size bytes) and
// records it, under the upload lock of digest: write stores the content
// (a write of content already stored restarts its grace), then the org's
// record (charged with AddOrgUpload before) is made again if the upload GC
// dropped it meanwhile. So once it returns nil, the content and the record
// are there and no upload GC pass that looked before removes them.
func (s *Store) CommitUpload(ctx context.Context, org, digest string, size int64, write func() error) error {
	l, err := s.LockUpload(ctx, digest)
	if err != nil {
		return err
	}
	defer l.Release()
	if err := write(); err != nil {
		return err
	}
	if err := l.record(ctx, org, size); err != nil {
		return err
	}
	return l.Release()
}
