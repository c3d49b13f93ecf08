package api

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/store"
)

// fakeFleet is a FleetBackend with drain deadlines, over fixed nodes.
type fakeFleet struct {
	mu    sync.Mutex
	nodes map[string]*NodeStatus
}

var (
	_ FleetBackend = (*fakeFleet)(nil)
	_ NodeDrainer  = (*fakeFleet)(nil)
)

func (f *fakeFleet) Nodes(context.Context) ([]NodeStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []NodeStatus
	for _, n := range f.nodes {
		out = append(out, *n)
	}
	return out, nil
}

func (f *fakeFleet) SetNodeState(_ context.Context, id, state string) (NodeStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[id]
	n.State, n.DrainDeadline = state, time.Time{}
	return *n, nil
}

func (f *fakeFleet) DrainNode(_ context.Context, id string, deadline time.Time) (NodeStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := f.nodes[id]
	n.State, n.DrainDeadline = store.NodeDraining, deadline
	return *n, nil
}

func (f *fakeFleet) RemoveNode(context.Context, string, bool) (NodeRemoved, error) {
	return NodeRemoved{}, errdefs.ErrFailedPrecondition
}

func (f *fakeFleet) WarmImage(context.Context, string, []string, func(string, nodecache.Progress)) ([]NodeWarm, error) {
	return nil, nil
}

// TestDrainDeadline: `node drain --deadline` is checked (draining only,
// 1 s to 30 days); once the deadline passes, the sandboxes still running on
// the node are terminated as drained, with the node named in their error;
// those on other nodes run on.
func TestDrainDeadline(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	ff := &fakeFleet{nodes: map[string]*NodeStatus{
		"n1": {Node: store.Node{ID: "n1", Name: "one", State: store.NodeReady}},
		"n2": {Node: store.Node{ID: "n2", Name: "two", State: store.NodeReady}},
	}}
	tn := newTestNode(t, Config{Fleet: ff})
	c := tn.user("mia")
	admin := computev1connect.NewNodeAdminServiceClient(http.DefaultClient, tn.url, connect.WithInterceptors(bearer(tn.keys["alice"])))
	for _, bad := range []*v1.SetNodeStateRequest{
		{Id: "n1", State: "cordoned", DeadlineSeconds: 60},
		{Id: "n1", State: "draining", DeadlineSeconds: -1},
		{Id: "n1", State: "draining", DeadlineSeconds: int64(MaxDrainDeadline/time.Second) + 1},
	} {
		if _, err := admin.SetState(ctx, connect.NewRequest(bad)); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("%v: %v, want invalid argument", bad, err)
		}
	}
	res, err := admin.SetState(ctx, connect.NewRequest(&v1.SetNodeStateRequest{Id: "n1", State: "draining", DeadlineSeconds: 600}))
	if err != nil {
		t.Fatal(err)
	}
	dl, err := time.Parse(time.RFC3339Nano, res.Msg.DrainDeadline)
	if err != nil || dl.Before(time.Now().Add(590*time.Second)) || dl.After(time.Now().Add(610*time.Second)) {
		t.Fatalf("drain deadline %q (%v), want ten minutes from now", res.Msg.DrainDeadline, err)
	}
	on := map[string]string{}
	for _, n := range []string{"n1", "n2"} {
		sb := create(t, c, &v1.CreateSandboxRequest{Image: "busybox"})
		rec, err := tn.store.GetSandbox(ctx, sb.Id)
		if err != nil {
			t.Fatal(err)
		}
		rec.Node = n
		if err := tn.store.UpdateSandbox(ctx, rec); err != nil {
			t.Fatal(err)
		}
		on[n] = sb.Id
	}
	// Before the deadline nothing ends.
	if err := tn.srv.drainOnce(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if !tn.srv.IsRunning(ctx, on["n1"]) {
		t.Fatal("a sandbox of a draining node ended before its deadline")
	}
	if err := tn.srv.drainOnce(ctx, dl.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	got := waitSandbox(t, c, on["n1"])
	if got.EndReason != "drained" || !strings.Contains(got.Error, "node one (n1) drained") {
		t.Fatalf("after the deadline: reason %q error %q, want drained naming the node", got.EndReason, got.Error)
	}
	if !tn.srv.IsRunning(ctx, on["n2"]) {
		t.Fatal("a sandbox on another node was ended by n1's drain")
	}
	// Uncordoning clears the deadline.
	res, err = admin.SetState(ctx, connect.NewRequest(&v1.SetNodeStateRequest{Id: "n1", State: "ready"}))
	if err != nil || res.Msg.DrainDeadline != "" {
		t.Fatalf("ready again: %+v, %v", res.Msg, err)
	}
}
