package daemon

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/store"
)

// TestMCPAuditQueueLossIsRecorded: records a full queue drops are counted
// and reported in the org's audit, not lost silently.
func TestMCPAuditQueueLossIsRecorded(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, t.TempDir()+"/store.db")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m := &mcpGateway{st: st, log: slog.New(slog.DiscardHandler), audit: make(chan store.MCPAudit, 10), droppedBy: map[string]int64{}}
	before := m.dropped.Load()
	for range 25 { // the writer is not running: 10 fit, 15 are dropped
		m.record(store.MCPAudit{OrgID: "org1", SandboxID: "sb", Server: "x", Decision: "allowed"})
	}
	if got := m.dropped.Load() - before; got != 15 {
		t.Fatalf("dropped %d, want 15", got)
	}
	m.reportDropped(ctx)
	recs, err := st.ListMCPAudit(ctx, store.MCPAuditQuery{OrgID: "org1"})
	if err != nil || len(recs) != 1 || !strings.HasPrefix(recs[0].Decision, "dropped: 15 records lost") {
		t.Fatalf("the org's audit: %+v %v", recs, err)
	}
}
