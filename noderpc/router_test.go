package noderpc

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/store"
)

// fleetNode is a joined node serving a fake agent over mTLS.
type fleetNode struct {
	id   *NodeIdentity
	fake *fakeNode
	url  string
}

// addNode joins a node with capacity (cpu, memory MiB, slots) and serves
// its API; its first heartbeat tells the control plane where.
func addNode(t *testing.T, c *control, name string, cpu float64, memMB int64, slots int) *fleetNode {
	t.Helper()
	ctx := ctxT(t)
	req := joinReq(c, c.token(t, time.Hour), name)
	req.CPU, req.MemoryMB, req.Slots = cpu, memMB, slots
	id, err := Join(ctx, t.TempDir(), req)
	if err != nil {
		t.Fatal(err)
	}
	f := newFakeNode()
	mux := http.NewServeMux()
	mux.Handle(NewServer(f, nil).Handler())
	hs := httptest.NewUnstartedServer(mux)
	hs.EnableHTTP2 = true
	hs.TLS = NodeServerTLS(id)
	hs.StartTLS()
	t.Cleanup(hs.Close)
	n := &fleetNode{id: id, fake: f, url: hs.URL}
	n.heartbeat(t, c)
	return n
}

func (n *fleetNode) heartbeat(t *testing.T, c *control) {
	t.Helper()
	if _, err := FleetClient(n.id, c.url).Heartbeat(ctxT(t), connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: n.id.ID, NodeUrl: n.url})); err != nil {
		t.Fatal(err)
	}
}

func newRouter(t *testing.T, c *control) *Router {
	r := NewRouter(c.st, c.ca, c.cert, nil)
	// A returned node's reconcile is over when Refresh returns (the
	// machine may be loaded; TestReconcileDoesNotHoldRefresh sets less).
	r.ReconcileWait = time.Minute
	if err := r.Refresh(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestPlacementSpreads: sandboxes go to the node with the largest free
// share, so equal nodes take turns; cordoned nodes and full nodes take
// none; with no room anywhere the start is refused as resource exhausted.
func TestPlacementSpreads(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	b := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	count := map[string]int{}
	for i := range 6 {
		id := "sb" + string(rune('0'+i))
		if _, err := r.Start(ctx, node.StartRequest{ID: id, Slot: i + 1, CPU: 0.5, Memory: 256 << 20}); err != nil {
			t.Fatal(err)
		}
		count[r.NodeOf(id)]++
	}
	if count[a.id.ID] != 3 || count[b.id.ID] != 3 {
		t.Fatalf("placement %v: want 3 on each node", count)
	}
	// Exec reaches the sandbox's node only.
	if _, err := r.Exec(ctx, "sb0", nodeExec(), nil, nil); err != nil {
		t.Fatal(err)
	}
	on := map[string]*fakeNode{a.id.ID: a.fake, b.id.ID: b.fake}[r.NodeOf("sb0")]
	if on == nil || len(on.procs) != 1 {
		t.Fatal("the exec did not reach the sandbox's node")
	}
	// Cordon b: everything goes to a.
	if st, err := r.SetNodeState(ctx, "b", store.NodeCordoned); err != nil || st.State != store.NodeCordoned || st.Sandboxes != 3 || !st.Healthy {
		t.Fatalf("cordon b by name: %+v, %v", st, err)
	}
	b.heartbeat(t, c) // a heartbeat does not undo it
	r.Refresh(ctx)
	if n, _ := c.st.GetNode(ctx, b.id.ID); n.State != store.NodeCordoned {
		t.Fatalf("b is %s after its heartbeat", n.State)
	}
	if _, err := r.SetNodeState(ctx, "nope", store.NodeCordoned); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("cordon an unknown node: %v", err)
	}
	for i := range 3 {
		id := "sc" + string(rune('0'+i))
		if _, err := r.Start(ctx, node.StartRequest{ID: id, Slot: 20 + i, CPU: 0.5}); err != nil {
			t.Fatal(err)
		}
		if r.NodeOf(id) != a.id.ID {
			t.Errorf("%s on %s, want a (b is cordoned)", id, r.NodeOf(id))
		}
	}
	// a has 4 cpus, 3 taken + 1.5: a 2-cpu sandbox fits nowhere.
	if _, err := r.Start(ctx, node.StartRequest{ID: "big", Slot: 40, CPU: 2}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("start without room: %v, want resource exhausted", err)
	}
	if r.NodeOf("big") != "" {
		t.Error("a refused start stays placed")
	}
	// Destroy frees the room.
	for _, id := range []string{"sb0", "sb1", "sb2", "sb3", "sb4", "sb5"} {
		if err := r.Destroy(ctx, id, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Start(ctx, node.StartRequest{ID: "big", Slot: 40, CPU: 2}); err != nil {
		t.Errorf("start after destroys: %v", err)
	}
}

// TestNodeLost: a node that stops heartbeating is unhealthy within the
// timeout; the Waits of its sandboxes return node.ErrLost, calls for them
// fail as lost, nothing more is placed there; when it heartbeats again the
// sandboxes destroyed meanwhile are destroyed there.
func TestNodeLost(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	n1 := addNode(t, c, "a", 4, 4096, 10)
	n2 := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	clk := useFakeClock(r, c.fleet)
	if _, err := r.Start(ctx, node.StartRequest{ID: "sb", Slot: 1}); err != nil {
		t.Fatal(err)
	}
	// a is the node sb landed on, b the other.
	a, b := n1, n2
	if r.NodeOf("sb") == n2.id.ID {
		a, b = n2, n1
	}
	// Wait for a sandbox that is on a (a Wait that never ends there).
	r.mu.Lock()
	r.where["forever"] = &placement{node: a.id.ID}
	r.mu.Unlock()
	done := make(chan error, 1)
	go func() { _, err := r.Wait(ctx, "forever", 0); done <- err }()
	waitFor(t, "the wait to reach node a", func() bool {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		return slices.Contains(a.fake.calls, "Wait forever 0")
	})
	// a stops heartbeating (b goes on): the clock moves past the timeout.
	clk.Add(2 * DefaultHeartbeatTimeout)
	b.heartbeat(t, c)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, node.ErrLost) {
			t.Fatalf("wait on a lost node: %v, want node.ErrLost", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the wait did not end when its node was lost")
	}
	if _, err := r.Exec(ctx, "sb", nodeExec(), nil, nil); !errors.Is(err, node.ErrLost) {
		t.Errorf("exec on a lost node: %v", err)
	}
	if _, err := r.Start(ctx, node.StartRequest{ID: "new", Slot: 2}); err != nil || r.NodeOf("new") != b.id.ID {
		t.Errorf("placement with a lost: %v on %q, want b", err, r.NodeOf("new"))
	}
	// The control plane ends the lost sandbox (its end tears it down): no
	// call reaches a now.
	if kept, err := r.Teardown("sb", 1, node.KeepUpper{For: time.Minute, MaxBytes: 1 << 20}); err != nil || kept != 0 {
		t.Fatalf("teardown on a lost node: kept %d, %v", kept, err)
	}
	a.fake.mu.Lock()
	early := slices.Contains(a.fake.calls, "Destroy sb 1")
	a.fake.mu.Unlock()
	if early {
		t.Fatal("destroyed on a lost node")
	}
	// a returns.
	a.heartbeat(t, c)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	a.fake.mu.Lock()
	calls := slices.Clone(a.fake.calls)
	a.fake.mu.Unlock()
	if !slices.Contains(calls, "Destroy sb 1") {
		t.Errorf("the lost sandbox was not destroyed on its returned node: %q", calls)
	}
	// The returned node (it may have restarted) learns the slots of the
	// sandboxes live on it: "forever", not the lost one.
	if !slices.Contains(calls, "Restore 1") {
		t.Errorf("the returned node was not restored with its live sandbox: %q", calls)
	}
	// What else the node has that no live sandbox owns (the fake always
	// reports runc:old and netns:old) is removed too, once.
	if n := slices.Index(calls, "Destroy old 0"); n < 0 || slices.Index(calls[n+1:], "Destroy old 0") >= 0 {
		t.Errorf("the node's leftover was not destroyed once: %q", calls)
	}
}

func nodeExec() (r procapi.ExecRequest) {
	r.Argv = []string{"true"}
	return r
}

// TestRouterStartGrace: a control plane that was down saw no heartbeats;
// right after it starts its nodes count as healthy (for one timeout), so
// reconcile finds their sandboxes instead of ending them all.
func TestRouterStartGrace(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	if _, err := c.st.UpdateNode(ctx, a.id.ID, func(n *store.Node) error {
		n.LastHeartbeat = time.Now().Add(-time.Hour) // the control plane was down
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// "up" was placed by the previous control-plane process: all of a's cpus.
	if err := c.st.CreateSandbox(ctx, &store.Sandbox{ID: "up", OrgID: "o", State: store.StateRunning, Slot: 3, CPU: 4, MemoryMB: 64}); err != nil {
		t.Fatal(err)
	}
	r := newRouter(t, c)
	clk := useFakeClock(r, nil)
	if pid, ok := r.Running(ctx, "up"); !ok || pid != 77 || r.NodeOf("up") != a.id.ID {
		t.Fatalf("reconcile after a control-plane restart: running %v pid %d on %q", ok, pid, r.NodeOf("up"))
	}
	// What it takes there counts, as for a sandbox placed by this process.
	if _, err := r.ReserveSlot(node.StartRequest{ID: "more", CPU: 1}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("a node full of a re-learned sandbox took another: %v", err)
	}
	// Past the grace, a node that still does not heartbeat is lost.
	clk.Add(2 * DefaultHeartbeatTimeout)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Exec(ctx, "up", nodeExec(), nil, nil); !errors.Is(err, node.ErrLost) {
		t.Errorf("after the grace: %v, want lost", err)
	}
}

// TestPlacementLocality: a node that has the image is preferred until it
// is warmBonus fuller than one without; then placement spreads again.
func TestPlacementLocality(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	b := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	img, err := r.EnsureImage(ctx, "python", nil) // warms it on one node
	if err != nil {
		t.Fatal(err)
	}
	warmNode := a.id.ID
	if !slices.ContainsFunc(a.fake.calls, func(s string) bool { return s == "EnsureImage python" }) {
		warmNode = b.id.ID
	}
	var got []string
	for i := range 4 {
		id := "sb" + string(rune('0'+i))
		if _, err := r.Start(ctx, node.StartRequest{ID: id, Slot: i + 1, Image: img}); err != nil {
			t.Fatal(err)
		}
		got = append(got, r.NodeOf(id))
	}
	// Free slot shares 1.0, 0.9, 0.8 (+0.25) beat the cold node's 1.0; 0.7+0.25 does not.
	if got[0] != warmNode || got[1] != warmNode || got[2] != warmNode || got[3] == warmNode {
		t.Errorf("placements %v, want the first three on the warm node %s", got, warmNode)
	}
}

// TestReserveSlotPlaces: a reservation places the sandbox (the node gives
// the slot), counts against that node's room before the sandbox starts,
// and Start, Kill and Teardown go to that node; Unclaim forgets it.
func TestReserveSlotPlaces(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 2, 4096, 10)
	b := addNode(t, c, "b", 2, 4096, 10)
	r := newRouter(t, c)
	fakes := map[string]*fakeNode{a.id.ID: a.fake, b.id.ID: b.fake}
	called := func(f *fakeNode, call string) bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return slices.Contains(f.calls, call)
	}
	for _, id := range []string{"r0", "r1"} {
		slot, err := r.ReserveSlot(node.StartRequest{ID: id, CPU: 2})
		if err != nil || slot != 123 {
			t.Fatalf("reserve %s: slot %d, %v", id, slot, err)
		}
		if !called(fakes[r.NodeOf(id)], "ReserveSlot "+id+" 2 0") {
			t.Fatalf("%s: the slot did not come from its node", id)
		}
	}
	if r.NodeOf("r0") == r.NodeOf("r1") {
		t.Fatalf("both reservations on %s: a reservation must take the node's room", r.NodeOf("r0"))
	}
	// Both nodes' cpus are reserved: nothing more fits.
	if _, err := r.ReserveSlot(node.StartRequest{ID: "r2", CPU: 1}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("reserve without room: %v, want resource exhausted", err)
	}
	on := fakes[r.NodeOf("r0")]
	if _, err := r.Start(ctx, node.StartRequest{ID: "r0", Slot: 123, CPU: 2}); err != nil {
		t.Fatal(err)
	}
	if !called(on, "Start r0") {
		t.Fatal("the start of r0 did not go to its reserved node")
	}
	if err := r.Kill(ctx, "r0"); err != nil || !called(on, "Kill r0") {
		t.Fatalf("kill of r0 on its node: %v", err)
	}
	if _, err := r.Teardown("r0", 123, node.KeepUpper{}); err != nil || !called(on, "Teardown r0 123 0s 0") {
		t.Fatalf("teardown of r0 on its node: %v", err)
	}
	if r.NodeOf("r0") != "" {
		t.Fatal("a torn down sandbox stays placed")
	}
	// A create that fails before Start gives its reservation back.
	r.Unclaim("r1")
	if r.NodeOf("r1") != "" {
		t.Fatal("an unclaimed reservation stays placed")
	}
	// A node refusing the slot: the error names it.
	if _, err := r.ReserveSlot(node.StartRequest{ID: "full", CPU: 1}); !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "no node gave a slot") {
		t.Fatalf("every node full: %v", err)
	}
	if r.NodeOf("full") != "" {
		t.Fatal("a refused reservation stays placed")
	}
}

// TestRouterWarmImage: a fleet-wide warm ensures the image on every healthy
// ready node (not a cordoned one), or on the named ones (by name or id,
// cordoned too), with each node's progress named; an unknown name fails
// the call before any node is asked; a node's failure is its own result.
func TestRouterWarmImage(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	b := addNode(t, c, "b", 4, 4096, 10)
	cn := addNode(t, c, "c", 4, 4096, 10)
	r := newRouter(t, c)
	if _, err := r.SetNodeState(ctx, "c", store.NodeCordoned); err != nil {
		t.Fatal(err)
	}
	ensured := func(n *fleetNode, ref string) int {
		n.fake.mu.Lock()
		defer n.fake.mu.Unlock()
		k := 0
		for _, s := range n.fake.calls {
			if s == "EnsureImage "+ref {
				k++
			}
		}
		return k
	}
	var progressed []string
	res, err := r.WarmImage(ctx, "python", nil, func(node string, p nodecache.Progress) { progressed = append(progressed, node+" "+p.Phase) })
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 || res[0].Name != "a" || res[1].Name != "b" || res[0].Err != nil || res[1].Err != nil || res[0].Image.Digest != "sha256:d-python" {
		t.Fatalf("warm on every ready node: %+v", res)
	}
	if ensured(a, "python") != 1 || ensured(b, "python") != 1 || ensured(cn, "python") != 0 {
		t.Errorf("ensured on a %d, b %d, cordoned c %d times", ensured(a, "python"), ensured(b, "python"), ensured(cn, "python"))
	}
	slices.Sort(progressed)
	if !slices.Equal(progressed, []string{"a pull", "b pull"}) {
		t.Errorf("progress %v, want each node's named", progressed)
	}
	// Warm counts in placement on both.
	if !r.warm[a.id.ID]["sha256:d-python"] || !r.warm[b.id.ID]["sha256:d-python"] {
		t.Errorf("warm not recorded for placement: %v", r.warm)
	}

	res, err = r.WarmImage(ctx, "busybox", []string{"c", b.id.ID, "b"}, nil)
	if err != nil || len(res) != 2 || res[0].Name != "b" || res[1].Name != "c" || ensured(a, "busybox") != 0 {
		t.Fatalf("warm on named nodes: %+v, %v", res, err)
	}
	if _, err := r.WarmImage(ctx, "busybox", []string{"a", "nope"}, nil); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("warm on an unknown node: %v", err)
	}
	if ensured(a, "busybox") != 0 {
		t.Error("a warmed although the call named an unknown node")
	}
	res, err = r.WarmImage(ctx, "missing", []string{"a"}, nil)
	if err != nil || len(res) != 1 || !errors.Is(res[0].Err, errdefs.ErrNotFound) {
		t.Errorf("warm of a missing image: %+v, %v", res, err)
	}
}

// TestPlacementPrestarted: a claim goes first to a node the router knows
// to hold a ready pre-started sandbox of the image (from the nodes' answers
// to SetPrestarted and to claims), ahead of a node that would win on free
// capacity; nodes believed empty are still asked after it (each ask is a use
// there); with none anywhere, the claim fails and nothing is placed.
func TestPlacementPrestarted(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	b := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	img, err := r.EnsureImage(ctx, "alpine", nil)
	if err != nil {
		t.Fatal(err)
	}
	// The node that ensured the image is warm: it wins placement (a).
	if slices.Contains(b.fake.calls, "EnsureImage alpine") {
		a, b = b, a
	}
	req := node.StartRequest{Image: img}
	a.fake.prestart(img.Digest) // a pool, empty
	b.fake.prestart(img.Digest, "sb-00000000000000b1", "sb-00000000000000b2")
	// Nothing known yet: a (spread) is asked first and has none; b serves.
	id, slot, ok := r.Claim(req)
	if !ok || id != "sb-00000000000000b1" || slot != 250 || r.NodeOf(id) != b.id.ID {
		t.Fatalf("first claim: %q %d %v on %q, want b's sb-...b1", id, slot, ok, r.NodeOf(id))
	}
	if a.fake.claims() != 1 {
		t.Fatalf("a asked %d times, want once", a.fake.claims())
	}
	// b said it has one more ready: it is asked first now, although a
	// wins placement and has a member of its own meanwhile.
	a.fake.prestart(img.Digest, "sb-00000000000000a1")
	id, _, ok = r.Claim(req)
	if !ok || id != "sb-00000000000000b2" || a.fake.claims() != 1 {
		t.Fatalf("second claim: %q %v (a asked %d times), want b's sb-...b2 without asking a", id, ok, a.fake.claims())
	}
	// b said it has none left: a (asked first again) serves.
	id, _, ok = r.Claim(req)
	if !ok || id != "sb-00000000000000a1" || r.NodeOf(id) != a.id.ID {
		t.Fatalf("third claim: %q %v on %q, want a's sb-...a1", id, ok, r.NodeOf(id))
	}
	if id, _, ok := r.Claim(req); ok {
		t.Fatalf("a claim with no pre-started sandbox anywhere gave %q", id)
	}
	// SetPrestarted's answers are learned too: after b reports 2 ready
	// (the fake reports any count it is asked), b goes first.
	if err := r.SetNodePrestarted(ctx, b.id.ID, img, 2); err != nil {
		t.Fatal(err)
	}
	b.fake.prestart(img.Digest, "sb-00000000000000b3")
	a.fake.prestart(img.Digest, "sb-00000000000000a2")
	before := a.fake.claims()
	if id, _, ok := r.Claim(req); !ok || id != "sb-00000000000000b3" || a.fake.claims() != before {
		t.Fatalf("claim after SetNodePrestarted on b: %q %v, want b's without asking a", id, ok)
	}
}

// TestClaimChecksNodeAnswer: the id a node answers a claim with becomes
// the sandbox's, so a node cannot answer with a sandbox already placed
// (on another node: it would take over its calls and identity tokens) or
// with a malformed id; such an answer is ignored and the claim goes on.
func TestClaimChecksNodeAnswer(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 8, 8192, 20)
	b := addNode(t, c, "b", 4, 4096, 10)
	r := newRouter(t, c)
	img, err := r.EnsureImage(ctx, "alpine", nil)
	if err != nil {
		t.Fatal(err)
	}
	victim := "sb-000000000000000f"
	if _, err := r.Start(ctx, node.StartRequest{ID: victim, Slot: 3}); err != nil {
		t.Fatal(err)
	}
	home := r.NodeOf(victim)
	hostile, honest := a, b
	if home == a.id.ID {
		hostile, honest = b, a
	}
	hostile.fake.prestart(img.Digest, victim, "../../etc", "sb-0000000000000001x")
	honest.fake.prestart(img.Digest, "sb-00000000000000c1")
	for range 3 {
		id, _, ok := r.Claim(node.StartRequest{Image: img})
		if ok && id != "sb-00000000000000c1" {
			t.Fatalf("claim gave %q from a node's bad answer", id)
		}
		if r.NodeOf(victim) != home {
			t.Fatalf("sandbox %s moved to %q after a node's claim answer", victim, r.NodeOf(victim))
		}
	}
	if r.NodeOf("sb-00000000000000c1") != honest.id.ID {
		t.Fatal("the honest node's pre-started sandbox was never claimed")
	}
}

// TestReconcileByTheLeader: with replicas, a node that returns is
// reconciled only by the replica holding the leader lease; one that takes
// the lease later reconciles what came back while it did not lead.
func TestReconcileByTheLeader(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	r := newRouter(t, c)
	var leads atomic.Bool
	r.Leading = leads.Load
	restored := func() bool {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		return slices.ContainsFunc(a.fake.calls, func(s string) bool { return strings.HasPrefix(s, "Restore") })
	}
	clk := useFakeClock(r, c.fleet)
	clk.Add(2 * DefaultHeartbeatTimeout)
	if err := r.Refresh(ctx); err != nil { // a is lost
		t.Fatal(err)
	}
	a.heartbeat(t, c) // and back
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if restored() {
		t.Fatal("a replica that does not lead reconciled a returned node")
	}
	leads.Store(true)
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if !restored() {
		t.Fatal("the new leader did not reconcile the node that returned before it led")
	}
}

// TestNodeRestartRestored: a node whose process restarts within the
// heartbeat timeout (a new boot id, never unhealthy) is restored with the
// live sandboxes placed on it; a hostile boot id is refused.
func TestNodeRestartRestored(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	r := newRouter(t, c)
	if _, err := r.Start(ctx, node.StartRequest{ID: "sb", Slot: 3}); err != nil {
		t.Fatal(err)
	}
	beat := func(boot string) error {
		_, err := FleetClient(a.id, c.url).Heartbeat(ctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: a.id.ID, NodeUrl: a.url, BootId: boot}))
		return err
	}
	restores := func() int {
		a.fake.mu.Lock()
		defer a.fake.mu.Unlock()
		n := 0
		for _, c := range a.fake.calls {
			if strings.HasPrefix(c, "Restore") {
				n++
			}
		}
		return n
	}
	for _, boot := range []string{"boot-1", "boot-1"} {
		if err := beat(boot); err != nil {
			t.Fatal(err)
		}
		if err := r.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := restores(); n != 0 {
		t.Fatalf("restored %d times without a restart", n)
	}
	if err := beat("boot-2"); err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	a.fake.mu.Lock()
	calls := slices.Clone(a.fake.calls)
	a.fake.mu.Unlock()
	if !slices.Contains(calls, "Restore 1") {
		t.Fatalf("a node restarted within the timeout was not restored with its live sandbox: %q", calls)
	}
	for _, bad := range []string{strings.Repeat("x", 65), "a b", "boot\n1", "ü"} {
		if err := beat(bad); !errors.Is(wire(err), errdefs.ErrInvalidArgument) {
			t.Errorf("boot id %q: %v, want invalid argument", bad, err)
		}
	}
	if n, err := c.st.GetNode(ctx, a.id.ID); err != nil || n.BootID != "boot-2" {
		t.Fatalf("the node's boot id after hostile heartbeats: %+v, %v", n, err)
	}
}

// TestCordonAtAnotherReplica: with replicas, a cordon set through one
// router holds at the other's very next placement, not only after its next
// refresh (the placement lock reads the node states).
func TestCordonAtAnotherReplica(t *testing.T) {
	c := newControl(t)
	ctx := ctxT(t)
	a := addNode(t, c, "a", 4, 4096, 10)
	addNode(t, c, "b", 4, 4096, 10)
	ra, rb := newRouter(t, c), newRouter(t, c)
	for _, r := range []*Router{ra, rb} {
		r.Leading = func() bool { return false } // replicas
	}
	if _, err := ra.SetNodeState(ctx, "b", store.NodeCordoned); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		id := fmt.Sprintf("sb-cordon%d", i)
		if _, err := rb.ReserveSlot(node.StartRequest{ID: id, CPU: 0.5, Memory: 64 << 20}); err != nil {
			t.Fatal(err)
		}
		if got := rb.NodeOf(id); got != a.id.ID {
			t.Fatalf("placement %d through the other replica went to %s, want a (b is cordoned)", i, got)
		}
		rb.Unclaim(id)
	}
}
