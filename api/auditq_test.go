package api

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestExecAuditBatched: an exec's audit record is stored by the batching
// writer, and the Audit call sees every exec made before it (it flushes the
// queue first), with the same fields as a synchronously stored record.
func TestExecAuditBatched(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	mia := tn.user("mia")
	sb, err := mia.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	const n = 25
	for i := 0; i < n; i++ {
		s, err := mia.sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Msg.Id, Argv: []string{"true"}}))
		if err != nil {
			t.Fatal(err)
		}
		for s.Receive() {
		}
		if err := s.Err(); err != nil {
			t.Fatal(err)
		}
	}
	// A refused exec is recorded too (a viewer may not exec).
	s, err := tn.user("vic").sandbox.Exec(ctx, connect.NewRequest(&v1.ExecRequest{SandboxId: sb.Msg.Id, Argv: []string{"true"}}))
	if err == nil {
		for s.Receive() {
		}
		err = s.Err()
	}
	wantCode(t, "a viewer execs", err, connect.CodePermissionDenied)
	res, err := tn.user("alice").team.Audit(ctx, connect.NewRequest(&v1.AuditRequest{Action: "SandboxService/Exec"}))
	if err != nil {
		t.Fatal(err)
	}
	recs := res.Msg.Records
	if len(recs) != n+1 {
		t.Fatalf("audit: %d exec records, want %d: %+v", len(recs), n+1, recs)
	}
	if r := recs[0]; r.Outcome != "permission_denied" || r.Actor != UserSubject("a", "vic") || r.Object != sb.Msg.Id {
		t.Fatalf("refused exec record: %+v", r)
	}
	for _, r := range recs[1:] {
		if r.Outcome != "ok" || r.Actor != UserSubject("a", "mia") || r.Object != sb.Msg.Id || r.Peer == "" || r.Via == "" {
			t.Fatalf("exec record: %+v", r)
		}
	}
}

// TestAuditWriterNeverDrops: a full queue makes the caller store its record
// at once; Close stores what is queued; a record added after Close is
// stored by its caller.
func TestAuditWriterNeverDrops(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	count := func() int {
		t.Helper()
		recs, err := st.ListAudit(ctx, store.AuditQuery{OrgID: "o"})
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	rec := func(obj string) store.AuditRecord {
		return store.AuditRecord{OrgID: "o", At: time.Now(), Actor: "a", Action: "SandboxService/Exec", Object: obj, Outcome: "ok"}
	}
	// A writer whose loop has not started and a queue of one: the second
	// record finds it full.
	w := &auditWriter{st: st, log: slog.New(slog.DiscardHandler), delay: time.Hour,
		q: make(chan store.AuditRecord, 1), flushReq: make(chan chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	w.add(ctx, rec("queued"))
	if got := count(); got != 0 {
		t.Fatalf("%d records stored, want the first still queued", got)
	}
	w.add(ctx, rec("overflow"))
	if got := count(); got != 1 {
		t.Fatalf("%d records stored after the queue was full, want the overflowing one", got)
	}
	go w.run()
	// An hour's gathering delay: only Close stores the queued record.
	w.Close()
	if got := count(); got != 2 {
		t.Fatalf("%d records stored after Close, want 2", got)
	}
	w.add(ctx, rec("late"))
	if got := count(); got != 3 {
		t.Fatalf("%d records stored after an add past Close, want 3", got)
	}
	w.Close() // twice is fine
}

// TestAuditWriterFlush: Flush returns once the records queued before it are
// stored, though the gathering delay has not passed.
func TestAuditWriterFlush(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "chalk.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	w := newAuditWriter(st, slog.New(slog.DiscardHandler), time.Hour)
	defer w.Close()
	for i := 0; i < 300; i++ { // more than one batch
		w.add(ctx, store.AuditRecord{OrgID: "o", At: time.Now(), Action: "SandboxService/Exec", Outcome: "ok"})
	}
	w.Flush(ctx)
	recs, err := st.ListAudit(ctx, store.AuditQuery{OrgID: "o", Limit: 1000})
	if err != nil || len(recs) != 300 {
		t.Fatalf("after Flush: %d records (%v), want 300", len(recs), err)
	}
}
