package noderpc

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
)

// TestNodeRemove: a healthy ready node, and a draining one with a live
// sandbox, are refused removal with failed_precondition saying why; with
// force the node goes, its sandboxes' Waits end lost, it leaves node ls (on
// this router and, at its next Refresh, on another control plane's), and
// its certificate is refused from then on: its heartbeats and registry
// access (fleet listener) and the control plane's connections to its API.
// An unhealthy node with no sandbox goes without force. A machine comes
// back only with a new join token, as a new node.
func TestNodeRemove(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	n1 := addNode(t, c, "a", 4, 4096, 10)
	n2 := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	clk := useFakeClock(r, nil)
	other := newRouter(t, c) // another control plane on the same store
	if _, err := r.Start(ctx, node.StartRequest{ID: "sb", Slot: 1}); err != nil {
		t.Fatal(err)
	}
	x, y := n1, n2 // x holds sb
	if r.NodeOf("sb") == n2.id.ID {
		x, y = n2, n1
	}
	xName := map[*fleetNode]string{n1: "a", n2: "b"}[x]
	yName := map[*fleetNode]string{n1: "a", n2: "b"}[y]

	_, err := r.RemoveNode(ctx, xName, false)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "drain it first") {
		t.Fatalf("remove a healthy ready node: %v, want failed_precondition saying to drain", err)
	}
	if _, err := r.SetNodeState(ctx, xName, store.NodeDraining); err != nil {
		t.Fatal(err)
	}
	_, err = r.RemoveNode(ctx, xName, false)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "1 live sandbox(es) (sb)") {
		t.Fatalf("remove a draining node with a sandbox: %v, want failed_precondition naming sb", err)
	}
	if _, err := c.st.GetNode(ctx, x.id.ID); err != nil {
		t.Fatalf("a refused removal removed the record: %v", err)
	}
	// A Wait on x that never ends by itself.
	r.mu.Lock()
	r.where["forever"] = &placement{node: x.id.ID}
	r.mu.Unlock()
	done := make(chan error, 1)
	go func() { _, err := r.Wait(ctx, "forever", 0); done <- err }()
	waitFor(t, "the wait to reach node x", func() bool {
		x.fake.mu.Lock()
		defer x.fake.mu.Unlock()
		return slices.Contains(x.fake.calls, "Wait forever 0")
	})

	res, err := r.RemoveNode(ctx, x.id.ID, true)
	if err != nil || res.Node.ID != x.id.ID || !slices.Equal(res.Lost, []string{"forever", "sb"}) {
		t.Fatalf("remove --force: %+v, %v; want sb and forever lost", res, err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, node.ErrLost) || !strings.Contains(err.Error(), "was removed from the fleet") {
			t.Fatalf("wait on a removed node: %v, want node.ErrLost saying it was removed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the wait did not end when its node was removed")
	}
	if _, err := r.Exec(ctx, "sb", nodeExec(), nil, nil); !errors.Is(err, node.ErrLost) {
		t.Errorf("exec on a removed node: %v, want lost", err)
	}
	listed := func(r *Router) []string {
		ns, err := r.Nodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, n := range ns {
			ids = append(ids, n.ID)
		}
		return ids
	}
	if got := listed(r); !slices.Equal(got, []string{y.id.ID}) {
		t.Fatalf("node ls after the removal: %v, want only %s", got, y.id.ID)
	}
	if err := other.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	other.mu.Lock()
	_, still := other.members[x.id.ID]
	other.mu.Unlock()
	if still || !slices.Equal(listed(other), []string{y.id.ID}) {
		t.Fatal("another control plane still holds the removed node after its refresh")
	}
	for range 3 {
		if _, err := r.Start(ctx, node.StartRequest{ID: "new" + time.Now().String(), Slot: 2}); err != nil {
			t.Fatal(err)
		}
	}
	if x.fake.startCount() != 1 {
		t.Fatalf("sandboxes placed on the removed node: %d starts there", x.fake.startCount())
	}

	// Its certificate is refused on the fleet listener...
	_, err = FleetClient(x.id, c.url).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: x.id.ID, NodeUrl: x.url}))
	if connect.CodeOf(err) != connect.CodePermissionDenied || !strings.Contains(err.Error(), "removed from the fleet") {
		t.Fatalf("heartbeat of a removed node: %v, want permission denied", err)
	}
	if _, err := c.st.GetNode(ctx, x.id.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("a removed node's heartbeat brought its record back: %v", err)
	}
	_, err = FleetClient(x.id, c.url).RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{}))
	if connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("registry access of a removed node: %v, want permission denied", err)
	}
	// ...and by the control plane connecting to its API; y's still works.
	if _, ok := NewClient(HTTPClient(r.nodeTLS(x.id.ID)), x.url, nil).Running(ctx, "up"); ok {
		t.Fatal("the control plane reached a removed node's API")
	}
	if _, ok := NewClient(HTTPClient(r.nodeTLS(y.id.ID)), y.url, nil).Running(ctx, "up"); !ok {
		t.Fatal("the control plane cannot reach a node not removed")
	}
	if _, err := r.RemoveNode(ctx, x.id.ID, true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("remove a removed node: %v, want not found", err)
	}

	// y goes silent: unhealthy, and (its sandboxes destroyed) removed
	// without force.
	r.mu.Lock()
	for id, p := range r.where {
		if p.node == y.id.ID {
			delete(r.where, id)
		}
	}
	r.mu.Unlock()
	clk.Add(2 * DefaultHeartbeatTimeout)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := r.RemoveNode(ctx, yName, false); err != nil {
		t.Fatalf("remove an unhealthy node without sandboxes: %v", err)
	}

	// The machine comes back only by joining again, with a new token: a
	// new node.
	back, err := Join(ctx, t.TempDir(), joinReq(c, c.token(t, time.Hour), xName))
	if err != nil || back.ID == x.id.ID {
		t.Fatalf("rejoin: %v, id %v (removed %s)", err, back, x.id.ID)
	}
	if _, err := FleetClient(back, c.url).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: back.ID, NodeUrl: x.url})); err != nil {
		t.Fatalf("heartbeat of the rejoined node: %v", err)
	}
}

// TestRemovedFromFleet: a removed node's heartbeat is refused with the
// removal marked for that node (RemovedHeader), through the failover
// client a node uses, so the node wipes itself; a node not removed, a
// check of another node's id and a refusal for any other reason (here the
// control plane's store failing) are not taken as a removal.
func TestRemovedFromFleet(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	x := addNode(t, c, "a", 4, 4096, 10)
	y := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	hb := func(n *fleetNode) error {
		_, err := FailoverFleetClient(n.id, []string{c.url}).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: n.id.ID, NodeUrl: n.url}))
		return err
	}
	if err := hb(x); err != nil || RemovedFromFleet(err, x.id.ID) {
		t.Fatalf("heartbeat of a member: %v", err)
	}
	if _, err := r.RemoveNode(ctx, x.id.ID, true); err != nil {
		t.Fatal(err)
	}
	err := hb(x)
	if !RemovedFromFleet(err, x.id.ID) {
		t.Fatalf("heartbeat of a removed node: %v (header %q), want it marked removed", err, metaOf(err))
	}
	if RemovedFromFleet(err, y.id.ID) {
		t.Fatal("x's removal read as y's")
	}
	if err := hb(y); err != nil || RemovedFromFleet(err, y.id.ID) {
		t.Fatalf("heartbeat of the node not removed: %v", err)
	}
	// The certificate check fails (store closed): refused, not removed.
	c.st.Close()
	err = hb(y)
	if err == nil || RemovedFromFleet(err, y.id.ID) {
		t.Fatalf("heartbeat while the control plane's store fails: %v, want refused and not a removal", err)
	}
}

func metaOf(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Meta().Get(RemovedHeader)
	}
	return ""
}
