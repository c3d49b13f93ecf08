package api

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TestReadoptLost: a sandbox reported lost (its Wait returns at the loss,
// state stopped, end_reason lost) is revived by ReadoptLost only as it
// was (its node, its init pid, within the grace): then it is running
// again with no end, live (identity, Wait), the Resumed hook ran, and it
// ends again as any running sandbox (terminate).
func TestReadoptLost(t *testing.T) {
	ctx := context.Background()
	var hl hookLog
	tn := newTestNode(t, Config{Hooks: hl.hooks()})
	c := tn.user("mia")
	sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
	rec, err := tn.store.GetSandbox(ctx, sb.Id)
	if err != nil {
		t.Fatal(err)
	}
	rec.Node = "n1" // as the fleet records it
	if err := tn.store.UpdateSandbox(ctx, rec); err != nil {
		t.Fatal(err)
	}
	tn.node.loseSandbox(sb.Id)
	got := waitSandbox(t, c, sb.Id)
	if got.State != "stopped" || got.EndReason != "lost" {
		t.Fatalf("after the loss: %s %s, want stopped lost", got.State, got.EndReason)
	}
	if tn.srv.IsActive(ctx, sb.Id) {
		t.Fatal("a lost sandbox is still active (its identity would be served)")
	}
	// Its node is back and runs it still.
	tn.node.run(sb.Id, 4242)
	since := time.Now().Add(-time.Minute)
	for _, bad := range []struct {
		name, node string
		pid        int
		since      time.Time
	}{
		{"another pid", "n1", 4243, since},
		{"another node", "n2", 4242, since},
		{"after the grace", "n1", 4242, time.Now().Add(time.Minute)},
	} {
		if tn.srv.ReadoptLost(ctx, sb.Id, bad.node, bad.pid, bad.since) {
			t.Errorf("re-adopted with %s", bad.name)
		}
	}
	if r, _ := tn.store.GetSandbox(ctx, sb.Id); r.State != "stopped" || r.EndReason != "lost" {
		t.Fatalf("a refused re-adoption changed the record: %s %s", r.State, r.EndReason)
	}
	if !tn.srv.ReadoptLost(ctx, sb.Id, "n1", 4242, since) {
		t.Fatal("not re-adopted")
	}
	if tn.srv.ReadoptLost(ctx, sb.Id, "n1", 4242, since) {
		t.Error("re-adopted twice")
	}
	r, err := c.sandbox.Get(ctx, connect.NewRequest(&v1.GetSandboxRequest{Id: sb.Id}))
	if err != nil {
		t.Fatal(err)
	}
	if r.Msg.State != "running" || r.Msg.EndReason != "" || r.Msg.EndedAt != "" || r.Msg.Error != "" {
		t.Fatalf("re-adopted: %s %q %q %q, want running with no end", r.Msg.State, r.Msg.EndReason, r.Msg.EndedAt, r.Msg.Error)
	}
	if !tn.srv.IsActive(ctx, sb.Id) {
		t.Error("a re-adopted sandbox is not active (its identity is not served)")
	}
	if !strings.Contains(hl.String(), "resumed:"+sb.Id) {
		t.Errorf("hooks: %q, want resumed", hl.String())
	}
	end, err := c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id}))
	if err != nil || end.Msg.State != "stopped" || end.Msg.EndReason != "terminated" {
		t.Fatalf("terminate the re-adopted sandbox: %v %v", end, err)
	}
}
