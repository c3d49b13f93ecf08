package noderpc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
)

// fakeEgress records its calls in the fake node's call log (one order).
type fakeEgress struct{ f *fakeNode }

func (e fakeEgress) Apply(_ context.Context, id string, slot int, ps []egress.Policy) (string, error) {
	var names []string
	for _, p := range ps {
		names = append(names, fmt.Sprintf("%s:%v:%s", p.Name, p.AllowAll, strings.Join(p.AllowedHostnames, ",")))
	}
	e.f.call(fmt.Sprintf("egress.Apply %s %d %s", id, slot, strings.Join(names, ";")))
	return "hash-" + id, nil
}
func (e fakeEgress) Ensure(_ context.Context, id string, slot int) error {
	e.f.call(fmt.Sprintf("egress.Ensure %s %d", id, slot))
	return nil
}
func (e fakeEgress) Remove(_ context.Context, id string) { e.f.call("egress.Remove " + id) }
func (e fakeEgress) Drops(id string) []egress.Drop {
	return []egress.Drop{{Time: time.Unix(1700000000, 5), Proto: "tcp", Dst: "10.0.0.1", Port: 80, Name: "lan.test", Count: 3}}
}
func (e fakeEgress) Prune(_ context.Context, live map[string]int) {
	e.f.call(fmt.Sprintf("egress.Prune %d", len(live)))
}

// TestEgressOnTheNode: policies cross with ApplyEgress; Start gives the
// sandbox its baseline rules before the node starts it (whatever the
// control plane sent before); teardown, destroy and restore remove rules;
// a node without egress refuses ApplyEgress rather than ignore it.
func TestEgressOnTheNode(t *testing.T) {
	f := newFakeNode()
	c, srv := serve(t, f)
	ctx := ctxT(t)
	if _, err := c.ApplyEgress(ctx, "sb", 3, nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("ApplyEgress on a node without egress: %v, want failed precondition", err)
	}
	srv.WithEgress(fakeEgress{f})
	h, err := c.ApplyEgress(ctx, "sb", 3, []egress.Policy{{Name: "p", AllowedHostnames: []string{"a.test", "10.0.0.0/8"}}, {Name: "q", AllowAll: true}})
	if err != nil || h != "hash-sb" {
		t.Fatalf("ApplyEgress = %q, %v", h, err)
	}
	if _, err := c.ApplyEgress(ctx, "sb", 0, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ApplyEgress without a slot: %v, want invalid argument", err)
	}
	if _, err := c.ApplyEgress(ctx, "sb", 3, make([]egress.Policy, MaxPolicies+1)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ApplyEgress with %d policies: %v, want invalid argument", MaxPolicies+1, err)
	}
	if _, err := c.Start(ctx, node.StartRequest{ID: "sb2", Slot: 4}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Teardown("sb2", 4, node.KeepUpper{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, "sb", 3); err != nil {
		t.Fatal(err)
	}
	if err := c.Restore(ctx, map[string]int{"x": 1}); err != nil {
		t.Fatal(err)
	}
	drops, err := c.EgressDrops(ctx, "sb")
	if err != nil || len(drops) != 1 || drops[0] != (egress.Drop{Time: time.Unix(1700000000, 5), Proto: "tcp", Dst: "10.0.0.1", Port: 80, Name: "lan.test", Count: 3}) {
		t.Errorf("EgressDrops = %+v, %v", drops, err)
	}
	var egressCalls []string
	for _, call := range f.calls {
		if strings.HasPrefix(call, "egress.") || strings.HasPrefix(call, "Start ") {
			egressCalls = append(egressCalls, call)
		}
	}
	want := []string{
		"egress.Apply sb 3 p:false:a.test,10.0.0.0/8;q:true:",
		"egress.Ensure sb2 4", "Start sb2",
		"egress.Remove sb2", "egress.Remove sb", "egress.Prune 1",
	}
	if !slices.Equal(egressCalls, want) {
		t.Errorf("calls:\n%s\nwant:\n%s", strings.Join(egressCalls, "\n"), strings.Join(want, "\n"))
	}
}
