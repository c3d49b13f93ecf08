package daemon

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/store"
)

// syncBuffer is a log destination for goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// counterValue is chalk_audit_pruned_total's value, as /metrics has it.
func counterValue(t *testing.T) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "chalk_audit_pruned_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("no chalk_audit_pruned_total metric")
	return 0
}

// auditStore is a SQLite store holding, in orgs a and b, 3 audit records
// 48 hours old and 2 an hour old.
func auditStore(t *testing.T) *store.Store {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, t.TempDir()+"/store.db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	now := time.Now()
	var recs []store.AuditRecord
	for i, age := range []time.Duration{48 * time.Hour, 48 * time.Hour, 48 * time.Hour, time.Hour, time.Hour} {
		recs = append(recs, store.AuditRecord{OrgID: []string{"a", "b"}[i%2], At: now.Add(-age), Action: "SandboxService/Exec", Object: "sb", Outcome: "ok"})
	}
	if err := st.AddAudits(ctx, recs); err != nil {
		t.Fatal(err)
	}
	return st
}

// auditCount is how many audit records orgs a and b have.
func auditCount(t *testing.T, st *store.Store) int {
	t.Helper()
	n := 0
	for _, org := range []string{"a", "b"} {
		recs, err := st.ListAudit(context.Background(), store.AuditQuery{OrgID: org, Limit: 100})
		if err != nil {
			t.Fatal(err)
		}
		n += len(recs)
	}
	return n
}

// TestAuditRetentionStart: a daemon's start step prunes the org audit
// trail (every org's records older than Config.AuditRetention) in the
// background, logging and counting what it removed (chalk_audit_pruned_total);
// a retention of 0 or less keeps every record and says so.
func TestAuditRetentionStart(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	forever := auditStore(t)
	for _, r := range []time.Duration{0, -1} {
		var log syncBuffer
		d := &Daemon{cfg: Config{AuditRetention: r}, Store: forever, log: slog.New(slog.NewTextHandler(&log, nil))}
		if err := d.startAuditRetention(ctx); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(log.String(), "kept for ever") {
			t.Fatalf("retention %v: log %q, want it to say the trail is kept for ever", r, log.String())
		}
	}

	st := auditStore(t)
	var log syncBuffer
	before := counterValue(t)
	d := &Daemon{cfg: Config{AuditRetention: 24 * time.Hour}, Store: st, log: slog.New(slog.NewTextHandler(&log, nil))}
	if err := d.startAuditRetention(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for auditCount(t, st) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d audit records after the start, want the 2 newer than the retention", auditCount(t, st))
		}
		time.Sleep(10 * time.Millisecond) // polling the background pass
	}
	for !strings.Contains(log.String(), "records=3") {
		if time.Now().After(deadline) {
			t.Fatalf("log %q: want the pruned records counted", log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := counterValue(t) - before; got != 3 {
		t.Fatalf("chalk_audit_pruned_total grew by %v, want 3", got)
	}
	if n := auditCount(t, forever); n != 5 {
		t.Fatalf("retention 0 or less: %d records left, want all 5", n)
	}
}

// TestAuditRetentionLeader: with replicas, only the leader prunes: ticks
// at which this replica does not lead leave the records, the first tick at
// which it leads removes the old ones.
func TestAuditRetentionLeader(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	st := auditStore(t)
	var mu sync.Mutex
	leads := false
	asked := make(chan bool) // each time the loop asks, what it was told
	leading := func() bool {
		mu.Lock()
		l := leads
		mu.Unlock()
		asked <- l
		return l
	}
	done := make(chan struct{})
	go func() {
		auditRetentionLoop(ctx, slog.New(slog.DiscardHandler), st, 24*time.Hour, time.Millisecond, leading)
		close(done)
	}()
	defer func() {
		cancel()
		for {
			select {
			case <-asked:
			case <-done:
				return
			}
		}
	}()
	for range 5 { // at start and at 4 ticks
		if <-asked {
			t.Fatal("told it leads")
		}
	}
	// The loop asks again only after it handled the tick it asked for, and
	// none of those was one at which it leads.
	if n := auditCount(t, st); n != 5 {
		t.Fatalf("a replica that does not lead pruned: %d records left, want 5", n)
	}
	mu.Lock()
	leads = true
	mu.Unlock()
	for !<-asked { // an ask that read leads before it changed
	}
	<-asked // the pass of the tick at which it leads has run
	if n := auditCount(t, st); n != 2 {
		t.Fatalf("the leader's pass left %d records, want the 2 newer than the retention", n)
	}
}
