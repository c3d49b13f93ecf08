package daemon

import (
	"context"
	"log/slog"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/mcpgw"
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

// TestMCPAuditWriterBatches: the writer stores a queue holding a batch's
// worth at once (not after its gathering delay, here an hour), what is left
// on FlushAudit or when it stops, and every record exactly once.
func TestMCPAuditWriterBatches(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, t.TempDir()+"/store.db")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m := &mcpGateway{st: st, log: slog.New(slog.DiscardHandler), audit: make(chan store.MCPAudit, 8192), full: make(chan struct{}, 1),
		flushReq: make(chan chan struct{}), droppedBy: map[string]int64{}, stop: make(chan struct{}), done: make(chan struct{}),
		batchDelay: time.Hour, retention: DefaultMCPAuditRetention}
	if m.gw, err = mcpgw.New(mcpgw.Config{
		Upstream: func(context.Context, string, string) (*mcpgw.Upstream, error) { return nil, errdefs.ErrNotFound },
		Verify: func(context.Context, string, string) (mcpgw.Claims, error) {
			return mcpgw.Claims{}, errdefs.ErrNotFound
		},
		Caller: func(*http.Request) (mcpgw.Caller, bool) { return mcpgw.Caller{}, false },
	}); err != nil {
		t.Fatal(err)
	}
	go m.writeAudit()
	stopped := false
	defer func() {
		if !stopped {
			close(m.stop)
			<-m.done
		}
	}()
	count := func() int {
		recs, err := st.ListMCPAudit(ctx, store.MCPAuditQuery{OrgID: "org1", Limit: 10000})
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	deadline := time.Now().Add(20 * time.Second)
	for i := range auditBatchMax {
		m.record(store.MCPAudit{OrgID: "org1", SandboxID: "sb", Server: "x", Tool: strconv.Itoa(i), Decision: "allowed"})
		for i == 0 && len(m.audit) > 0 { // the writer holds the first while it gathers
			if time.Now().After(deadline) {
				t.Fatal("the writer did not take the first record")
			}
			runtime.Gosched()
		}
	}
	for count() < auditBatchMax {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d records stored: a full queue waited for the gathering delay", count(), auditBatchMax)
		}
		runtime.Gosched()
	}
	for i := range 3 {
		m.record(store.MCPAudit{OrgID: "org1", SandboxID: "sb", Server: "x", Tool: "late" + strconv.Itoa(i), Decision: "allowed"})
	}
	fctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	m.FlushAudit(fctx)
	if n := count(); n != auditBatchMax+3 {
		t.Fatalf("%d records stored after FlushAudit, want %d", n, auditBatchMax+3)
	}
	// Records queued while the writer gathers are stored when it stops.
	for i := range 3 {
		m.record(store.MCPAudit{OrgID: "org1", SandboxID: "sb", Server: "x", Tool: "last" + strconv.Itoa(i), Decision: "allowed"})
	}
	close(m.stop)
	<-m.done
	stopped = true
	if n := count(); n != auditBatchMax+6 {
		t.Fatalf("%d records stored after the writer stopped, want %d", n, auditBatchMax+6)
	}
}
