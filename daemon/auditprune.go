package daemon

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/internal/periodic"
	"github.com/chalkcompute/chalkcompute/store"
)

// The org audit trail's retention: every audited call adds a record (each
// exec, in batches), so without one the trail only grew. Records older
// than Config.AuditRetention (chalkd --audit-retention) are removed at
// start and every auditPruneEvery, by the leader when replicas share the
// store (store.PruneAudit: in batches, each its own short transaction).

// DefaultAuditRetention is --audit-retention's default.
const DefaultAuditRetention = 90 * 24 * time.Hour

// auditPruneEvery is how often the trail is pruned.
const auditPruneEvery = time.Hour

var auditPruned = prometheus.NewCounter(prometheus.CounterOpts{Name: "chalk_audit_pruned_total",
	Help: "Org audit trail records removed because they were older than --audit-retention."})

func init() { prometheus.MustRegister(auditPruned) }

// startAuditRetention starts the org audit trail's pruning: a pass now (if
// this process leads: with replicas the leader is chosen after the start,
// so the first pass is an interval later) and then every auditPruneEvery
// while it leads, until ctx ends. The passes run in the background: the
// first one after an upgrade may remove a long backlog, and the start does
// not wait for it. A retention of 0 or less keeps the records for ever:
// nothing runs.
func (d *Daemon) startAuditRetention(ctx context.Context) error {
	retention := d.cfg.AuditRetention
	if retention <= 0 {
		d.log.Info("org audit trail: kept for ever (--audit-retention 0)")
		return nil
	}
	go auditRetentionLoop(ctx, d.log.With("component", "audit-retention"), d.Store, retention, auditPruneEvery, d.leaderFunc())
	return nil
}

// auditRetentionLoop prunes st's org audit trail now if leading (nil:
// always) says this process leads, then every interval at which it leads,
// until ctx ends.
func auditRetentionLoop(ctx context.Context, log *slog.Logger, st *store.Store, retention, every time.Duration, leading func() bool) {
	pass := func() { pruneAudit(ctx, log, st, retention) }
	if leading == nil || leading() {
		pass()
	}
	periodic.WhileLeading(ctx, every, leading, pass)
}

// pruneAudit removes the org audit records older than retention, logging
// and counting what it removed.
func pruneAudit(ctx context.Context, log *slog.Logger, st *store.Store, retention time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	before := time.Now().Add(-retention)
	n, err := st.PruneAudit(ctx, before)
	auditPruned.Add(float64(n))
	if n > 0 {
		log.Info("org audit trail: pruned records older than the retention", "records", n, "retention", retention, "before", before.UTC().Format(time.RFC3339))
	}
	if err != nil && ctx.Err() == nil {
		log.Error("org audit trail: prune", "removed", n, "err", err)
	}
}
