package api

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/store"
)

// NodeStatus is a fleet node as the control plane sees it.
type NodeStatus struct {
	store.Node
	Healthy   bool
	Sandboxes int
}

// FleetBackend is the fleet's node administration (noderpc.Router).
type FleetBackend interface {
	Nodes(ctx context.Context) ([]NodeStatus, error)
	SetNodeState(ctx context.Context, id, state string) (NodeStatus, error)
	// WarmImage ensures ref on the named nodes (names or ids; none: every
	// healthy node in state ready), concurrently; progress is called
	// serially, with the node's name. An unknown name fails the whole call
	// before anything is warmed; a node's failure is its result's Err.
	WarmImage(ctx context.Context, ref string, nodes []string, progress func(node string, p nodecache.Progress)) ([]NodeWarm, error)
	// RemoveNode removes a node (id or name) and revokes its certificate:
	// only one unhealthy or draining with no live sandbox unless force,
	// which ends its sandboxes as lost.
	RemoveNode(ctx context.Context, id string, force bool) (NodeRemoved, error)
}

// NodeRemoved is a node removed from the fleet, with the sandboxes that
// were live there (ended as lost; only with force).
type NodeRemoved struct {
	Node store.Node
	Lost []string
}

// NodeWarm is how warming an image went on one node.
type NodeWarm struct {
	ID, Name string
	Image    *nodecache.Image
	Err      error
}

type nodeAdminService struct{ s *Server }

var _ computev1connect.NodeAdminServiceHandler = (*nodeAdminService)(nil)

func (h *nodeAdminService) fleet() (FleetBackend, error) {
	if h.s.cfg.Fleet == nil {
		return nil, fmt.Errorf("this chalkd is not the control plane of a fleet (chalkd control): %w", errdefs.ErrFailedPrecondition)
	}
	return h.s.cfg.Fleet, nil
}

func nodeToPB(n NodeStatus) *v1.Node {
	ts := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format(time.RFC3339Nano)
	}
	return &v1.Node{Id: n.ID, Name: n.Name, Url: n.URL, State: n.State, Healthy: n.Healthy, Cpu: n.CPU, MemoryMb: n.MemoryMB,
		Slots: int32(n.Slots), Sandboxes: int32(n.Sandboxes), LastHeartbeat: ts(n.LastHeartbeat), JoinedAt: ts(n.JoinedAt),
		DrainDeadline: ts(n.DrainDeadline)}
}

func (h *nodeAdminService) List(ctx context.Context, _ *connect.Request[v1.ListNodesRequest]) (*connect.Response[v1.ListNodesResponse], error) {
	f, err := h.fleet()
	if err != nil {
		return nil, err
	}
	ns, err := f.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	out := &v1.ListNodesResponse{}
	for _, n := range ns {
		out.Nodes = append(out.Nodes, nodeToPB(n))
	}
	return connect.NewResponse(out), nil
}

func (h *nodeAdminService) SetState(ctx context.Context, req *connect.Request[v1.SetNodeStateRequest]) (*connect.Response[v1.Node], error) {
	f, err := h.fleet()
	if err != nil {
		return nil, err
	}
	switch req.Msg.State {
	case store.NodeReady, store.NodeCordoned, store.NodeDraining:
	default:
		return nil, invalid("state %q: want ready, cordoned or draining", req.Msg.State)
	}
	var n NodeStatus
	if req.Msg.DeadlineSeconds != 0 {
		n, err = h.drainBy(ctx, f, req.Msg)
	} else {
		n, err = f.SetNodeState(ctx, req.Msg.Id, req.Msg.State)
	}
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(nodeToPB(n)), nil
}

func (h *nodeAdminService) Remove(ctx context.Context, req *connect.Request[v1.RemoveNodeRequest]) (*connect.Response[v1.RemoveNodeResponse], error) {
	f, err := h.fleet()
	if err != nil {
		return nil, err
	}
	if req.Msg.Id == "" {
		return nil, invalid("id: required (a node's id or name)")
	}
	res, err := f.RemoveNode(ctx, req.Msg.Id, req.Msg.Force)
	if err != nil {
		return nil, err
	}
	n := nodeToPB(NodeStatus{Node: res.Node})
	return connect.NewResponse(&v1.RemoveNodeResponse{Node: n, LostSandboxes: res.Lost}), nil
}
