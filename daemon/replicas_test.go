package daemon

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/internal/chalktest"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestRunLeader: of two replicas' leader loops on one PostgreSQL database,
// exactly one leads; when it stops (its lease session ends), the other
// leads within seconds, and the first no longer does.
func TestRunLeader(t *testing.T) {
	chalktest.RequireRoot(t)
	dsn := chalktest.PostgresDB(t)
	ctx := context.Background()
	replica := func() *Daemon {
		st, err := store.Open(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return &Daemon{Store: st, log: slog.New(slog.DiscardHandler), leader: &leadership{}}
	}
	a, b := replica(), replica()
	waitLeads := func(d *Daemon, name string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !d.leader.Leading() {
			if time.Now().After(deadline) {
				t.Fatalf("%s does not lead", name)
			}
			time.Sleep(10 * time.Millisecond) // polling the loop's lease
		}
	}
	actx, stopA := context.WithCancel(ctx)
	aDone := make(chan struct{})
	go func() { a.runLeader(actx); close(aDone) }()
	waitLeads(a, "the first replica")
	bctx, stopB := context.WithCancel(ctx)
	defer stopB()
	go b.runLeader(bctx)
	for range 20 { // 200 ms in which the second must not lead
		if b.leader.Leading() {
			t.Fatal("two replicas lead at once")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopA()
	<-aDone
	if a.leader.Leading() {
		t.Fatal("a stopped replica still says it leads")
	}
	waitLeads(b, "the second replica, after the first stopped")
}
