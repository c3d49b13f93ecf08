package daemon_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestAuditRetentionE2E: chalkd --audit-retention 24h removes, at start,
// the org audit records older than a day (put in its store while it was
// stopped) and keeps the newer ones; /metrics counts what it removed
// (chalk_audit_pruned_total) and the log says it.
func TestAuditRetentionE2E(t *testing.T) {
	n := chalktest.Start(t, "--audit-retention", "24h")
	ctx := ctxT(t, 2*time.Minute)
	c := n.Client()
	who, err := c.WhoAmI(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n.Stop()
	dsn := filepath.Join(n.Dir, "chalk.db")
	if i := slices.Index(n.Args, "--database"); i >= 0 {
		dsn = n.Args[i+1]
	}
	st, err := store.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var recs []store.AuditRecord
	for i := range 7 {
		recs = append(recs, store.AuditRecord{OrgID: who.OrgId, At: now.Add(-time.Duration(30+i) * 24 * time.Hour), Actor: "old", Action: "SandboxService/Exec", Object: "sb-old", Outcome: "ok"})
	}
	recs = append(recs, store.AuditRecord{OrgID: who.OrgId, At: now.Add(-time.Hour), Actor: "recent", Action: "SandboxService/Exec", Object: "sb-recent", Outcome: "ok"})
	if err := st.AddAudits(ctx, recs); err != nil {
		t.Fatal(err)
	}
	st.Close()

	n.Restart()
	c = n.Client()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := c.Audit(ctx, &v1.AuditRequest{Limit: 10000})
		if err != nil {
			t.Fatal(err)
		}
		var old, recent int
		for _, r := range got {
			switch r.Actor {
			case "old":
				old++
			case "recent":
				recent++
			}
		}
		if recent != 1 {
			t.Fatalf("%d records from an hour ago, want 1 (kept)", recent)
		}
		if old == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d records older than --audit-retention left 30 s after the start", old)
		}
		time.Sleep(50 * time.Millisecond) // polling the start's background prune through the API
	}
	if v, err := n.Metric("chalk_audit_pruned_total"); err != nil || v != 7 {
		t.Fatalf("chalk_audit_pruned_total %v, %v; want 7", v, err)
	}
	if !strings.Contains(n.Log(), "records=7") {
		t.Fatalf("chalkd's log does not say what it pruned:\n%s", n.Log())
	}
}
