package store

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestPruneAudit: the org audit records (every org's) older than the cut
// go, in several batches; the records at or after the cut stay, each org's
// newest first as before; a second prune finds nothing; a cancelled
// context removes nothing. The batches' query finds the old records
// through the audit_at index (on SQLite: the plan; on PostgreSQL: the
// index exists), not by scanning the table in its write transaction.
func TestPruneAudit(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		ctx := context.Background()
		cut := time.Unix(1_800_000_000, 0)
		const old = 2*auditPruneBatch + 500 // three batches
		var recs []AuditRecord
		for i := range old + 300 {
			r := AuditRecord{OrgID: []string{"a", "b"}[i%2], Action: "SandboxService/Exec", Object: "sb", Outcome: "ok"}
			switch {
			case i < old:
				r.At = cut.Add(-time.Duration(old-i) * time.Minute)
			case i == old:
				r.At = cut // at the cut: kept
				r.Object = "at-cut"
			default:
				r.At = cut.Add(time.Duration(i) * time.Second)
			}
			recs = append(recs, r)
		}
		if err := s.AddAudits(ctx, recs); err != nil {
			t.Fatal(err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if n, err := s.PruneAudit(cctx, cut); err == nil || n != 0 {
			t.Fatalf("prune under a cancelled context: %d, %v; want an error and nothing removed", n, err)
		}
		n, err := s.PruneAudit(ctx, cut)
		if err != nil || n != old {
			t.Fatalf("pruned %d, %v; want %d", n, err, old)
		}
		left := 0
		for _, org := range []string{"a", "b"} {
			got, err := s.ListAudit(ctx, AuditQuery{OrgID: org, Limit: 10000})
			if err != nil {
				t.Fatal(err)
			}
			for i, r := range got {
				if r.At.Before(cut) {
					t.Fatalf("org %s: a record from %v is left", org, r.At)
				}
				if i > 0 && r.Seq >= got[i-1].Seq {
					t.Fatalf("org %s: not newest first after the prune", org)
				}
			}
			left += len(got)
		}
		if left != 300 {
			t.Fatalf("%d records left, want 300", left)
		}
		if got, _ := s.ListAudit(ctx, AuditQuery{OrgID: "a", Limit: 10000}); got[len(got)-1].Object != "at-cut" {
			t.Fatalf("the record at the cut: oldest left is %+v", got[len(got)-1])
		}
		if n, err := s.PruneAudit(ctx, cut); err != nil || n != 0 {
			t.Fatalf("second prune: %d, %v; want 0", n, err)
		}
		if b.name == "sqlite" {
			var plan []string
			rows, err := s.db.db.QueryContext(ctx, `EXPLAIN QUERY PLAN SELECT seq FROM audit WHERE at < ? ORDER BY at LIMIT ?`, nanos(cut), auditPruneBatch)
			if err != nil {
				t.Fatal(err)
			}
			for rows.Next() {
				var id, parent, unused int
				var detail string
				if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
					t.Fatal(err)
				}
				plan = append(plan, detail)
			}
			rows.Close()
			if p := strings.Join(plan, "; "); !strings.Contains(p, "USING COVERING INDEX audit_at") && !strings.Contains(p, "USING INDEX audit_at") {
				t.Fatalf("the prune's query plan: %s; want the audit_at index", p)
			}
		} else {
			var def string
			if err := s.db.db.QueryRowContext(ctx, `SELECT indexdef FROM pg_indexes WHERE tablename = 'audit' AND indexname = 'audit_at'`).Scan(&def); err != nil || !strings.Contains(def, "(at)") {
				t.Fatalf("index audit_at: %q, %v", def, err)
			}
		}
	})
}

// BenchmarkPruneAudit times PruneAudit on a SQLite audit trail of 200,000
// records: "none" with nothing older than the cut (the query that finds
// that is what every hourly pass ends with), "batch" removing one batch
// (auditPruneBatch records: how long one DELETE holds the writer).
func BenchmarkPruneAudit(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir()+"/store.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	t0 := time.Unix(1_800_000_000, 0)
	const total = 200_000
	next := 0 // the next record's second after t0
	fill := func(n int) {
		recs := make([]AuditRecord, 0, 10_000)
		for range n {
			recs = append(recs, AuditRecord{OrgID: "o", At: t0.Add(time.Duration(next) * time.Second), Actor: "chalk:org:o:user:ann", Via: "chalk_AbCd1234",
				Peer: "10.0.0.1:52314", Action: "SandboxService/Exec", Object: "sb-0123456789abcdef", Outcome: "ok"})
			next++
			if len(recs) == cap(recs) {
				if err := s.AddAudits(ctx, recs); err != nil {
					b.Fatal(err)
				}
				recs = recs[:0]
			}
		}
		if err := s.AddAudits(ctx, recs); err != nil {
			b.Fatal(err)
		}
	}
	fill(total)
	b.Run("none", func(b *testing.B) {
		for b.Loop() {
			if n, err := s.PruneAudit(ctx, t0); err != nil || n != 0 {
				b.Fatal(n, err)
			}
		}
	})
	b.Run("batch", func(b *testing.B) {
		cut := t0
		for b.Loop() {
			cut = cut.Add(auditPruneBatch * time.Second)
			if next-int(cut.Sub(t0)/time.Second) < total/2 { // keep the table at 100,000-200,000 records
				b.StopTimer()
				fill(total / 2)
				b.StartTimer()
			}
			if n, err := s.PruneAudit(ctx, cut); err != nil || n != auditPruneBatch {
				b.Fatal(n, err)
			}
		}
	})
}

// BenchmarkAddAudit stores one record (a create's, before it answers) and
// a batch of 256 (the API's exec audit writer's largest) on SQLite: the
// cost of the audit_at index on the write path.
func BenchmarkAddAudit(b *testing.B) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir()+"/store.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	rec := AuditRecord{OrgID: "o", At: time.Now(), Actor: "chalk:org:o:user:ann", Via: "chalk_AbCd1234",
		Peer: "10.0.0.1:52314", Action: "SandboxService/Exec", Object: "sb-0123456789abcdef", Outcome: "ok"}
	b.Run("1", func(b *testing.B) {
		for b.Loop() {
			rec.At = time.Now()
			if err := s.AddAudit(ctx, rec); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("256", func(b *testing.B) {
		recs := make([]AuditRecord, 256)
		for b.Loop() {
			for i := range recs {
				recs[i], recs[i].At = rec, time.Now()
			}
			if err := s.AddAudits(ctx, recs); err != nil {
				b.Fatal(err)
			}
		}
	})
}
