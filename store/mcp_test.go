package store

import (
	"context"
	"fmt"
	"strings"
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

// TestAddMCPAuditBatch: every record of a batch is stored with its own
// fields (one statement runs for all of them), a server name that is not
// valid UTF-8 or holds NUL included; a failing batch stores nothing.
func TestAddMCPAuditBatch(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		ctx := context.Background()
		at := time.Unix(1700000000, 0).UTC()
		var recs []MCPAudit
		for i := range 600 { // 9 full chunks of auditRowsPerInsert and a rest
			recs = append(recs, MCPAudit{At: at.Add(time.Duration(i) * time.Millisecond), OrgID: "o", SandboxID: fmt.Sprintf("sb%d", i%3),
				Server: fmt.Sprintf("srv%d", i%5), Method: "tools/call", Tool: fmt.Sprintf("t%d", i), Decision: "allowed", Status: 200, BytesIn: int64(i)})
		}
		recs[8].Server = "bad\xff\x00name"
		if err := s.AddMCPAudit(ctx, recs); err != nil {
			t.Fatal(err)
		}
		got, err := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "o", Limit: 10000})
		if err != nil || len(got) != len(recs) {
			t.Fatalf("%d stored, %v; want %d", len(got), err, len(recs))
		}
		for i, a := range got { // newest first: seq follows the batch's order
			if want := recs[len(recs)-1-i].Tool; a.Tool != want {
				t.Fatalf("record %d from the newest is %q, want %q", i, a.Tool, want)
			}
		}
		byTool := map[string]MCPAudit{}
		for _, a := range got {
			byTool[a.Tool] = a
		}
		for i, r := range recs {
			a, ok := byTool[r.Tool]
			if !ok || a.SandboxID != r.SandboxID || a.BytesIn != r.BytesIn || !a.At.Equal(r.At) || (i != 8 && a.Server != r.Server) {
				t.Fatalf("record %d: stored %+v, want %+v", i, a, r)
			}
		}
		if n, err := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "o", SandboxID: "sb1", Server: "srv2", Limit: 10000}); err != nil || len(n) != 40 {
			t.Fatalf("sb1/srv2: %d, %v; want 40", len(n), err)
		}
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := s.AddMCPAudit(cctx, recs[:10]); err == nil {
			t.Fatal("a batch under a cancelled context was stored")
		}
		if got, _ := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "o", Limit: 10000}); len(got) != len(recs) {
			t.Fatalf("%d records after a failed batch, want %d", len(got), len(recs))
		}
	})
}

// TestAddMCPAuditChunks: batches of any size are stored whole and in order
// through the INSERTs of power-of-two sizes, each prepared once per store
// (not parsed again for every batch).
func TestAddMCPAuditChunks(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		ctx := context.Background()
		at := time.Unix(1700000000, 0).UTC()
		total := 0
		for _, n := range []int{1, 3, 64, 65, 100, 127, 129, 65} {
			recs := make([]MCPAudit, n)
			for i := range recs {
				recs[i] = MCPAudit{At: at, OrgID: "o", SandboxID: "sb", Server: "srv", Method: "tools/call", Tool: fmt.Sprintf("t%d-%d", total, i), Decision: "allowed", Status: 200}
			}
			total++
			if err := s.AddMCPAudit(ctx, recs); err != nil {
				t.Fatal(err)
			}
			got, err := s.ListMCPAudit(ctx, MCPAuditQuery{OrgID: "o", Limit: n})
			if err != nil || len(got) != n {
				t.Fatalf("batch of %d: %d read back, %v", n, len(got), err)
			}
			for i, a := range got { // newest first
				if want := recs[n-1-i]; a.Tool != want.Tool || a.SandboxID != "sb" || a.Server != "srv" || !a.At.Equal(at) || a.Status != 200 {
					t.Fatalf("batch of %d: record %d from the newest is %+v, want %+v", n, i, a, want)
				}
			}
		}
		var inserts []string
		s.db.stmts.Range(func(k, _ any) bool {
			if strings.HasPrefix(k.(string), "INSERT INTO mcp_audit") {
				inserts = append(inserts, k.(string))
			}
			return true
		})
		if len(inserts) != auditSizes {
			t.Fatalf("%d audit INSERTs prepared, want one per size (%d)", len(inserts), auditSizes)
		}
	})
}

// BenchmarkAddMCPAudit stores a batch of the gateway's audit writer in
// SQLite: its largest (512 records), and 65 (what 50 ms brings at ~1,300
// calls/s: one full INSERT and a rest); ns/op over the size is the store's
// cost of one call's record.
func BenchmarkAddMCPAudit(b *testing.B) {
	for _, n := range []int{512, 65} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			s, err := Open(context.Background(), b.TempDir()+"/store.db")
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			recs := make([]MCPAudit, n)
			for i := range recs {
				recs[i] = MCPAudit{At: time.Now(), OrgID: "o", SandboxID: "sb-0123456789abcdef", Subject: "chalk:org:o:sbx:sb-0123456789abcdef", Server: "tools",
					HTTPMethod: "POST", Method: "tools/call", Tool: "add", ArgsSHA256: "4f0b8c5d1a0e2b6f9d3c7a8e5b1f0c2d4e6a8b0c1d3e5f7a9b1c3d5e7f9a1b3c", Decision: "allowed", Status: 200, LatencyMS: 0.3, BytesIn: 120, BytesOut: 180}
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := s.AddMCPAudit(context.Background(), recs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
