package store

import (
	"context"
	"testing"
	"time"
)

// TestPruneMCPAudit: records older than the cut go, newer ones stay.
func TestPruneMCPAudit(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		ctx := context.Background()
		now := time.Now()
		var recs []MCPAudit
		for i := range 12000 {
			at := now.Add(-40 * 24 * time.Hour)
			if i%4 == 0 {
				at = now.Add(-time.Hour)
			}
			recs = append(recs, MCPAudit{At: at, OrgID: "o", SandboxID: "s", Server: "x", Decision: "allowed"})
		}
		if err := s.AddMCPAudit(ctx, recs); err != nil {
			t.Fatal(err)
		}
		n, err := s.PruneMCPAudit(ctx, now.Add(-30*24*time.Hour))
		if err != nil || n != 9000 {
			t.Fatalf("pruned %d, %v; want 9000", n, err)
		}
		left, err := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "o", Limit: 10000})
		if err != nil || len(left) != 3000 {
			t.Fatalf("%d left, %v", len(left), err)
		}
	})
}
