package chalkcompute

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Nodes lists the fleet's node agents (node admin only; a chalkd that is
// not a fleet's control plane answers failed_precondition).
func (c *Client) Nodes(ctx context.Context) ([]*v1.Node, error) {
	resp, err := c.nodes.List(ctx, connect.NewRequest(&v1.ListNodesRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Nodes, nil
}

// DrainNode drains a node (id or name) and has the control plane terminate
// its sandboxes still running after deadline (end_reason "drained").
func (c *Client) DrainNode(ctx context.Context, node string, deadline time.Duration) (*v1.Node, error) {
	if deadline <= 0 || deadline%time.Second != 0 {
		return nil, fmt.Errorf("drain deadline %v: want a positive whole number of seconds", deadline)
	}
	resp, err := c.nodes.SetState(ctx, connect.NewRequest(&v1.SetNodeStateRequest{Id: node, State: "draining", DeadlineSeconds: int64(deadline / time.Second)}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// SetNodeState sets a node's state (by id or name): ready, cordoned (no new
// sandboxes) or draining (none either; its running sandboxes are left to end).
func (c *Client) SetNodeState(ctx context.Context, node, state string) (*v1.Node, error) {
	resp, err := c.nodes.SetState(ctx, connect.NewRequest(&v1.SetNodeStateRequest{Id: node, State: state}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// RemoveNode removes a fleet node (id or name) and revokes its certificate
// (node admin). Without force the node must be unhealthy or draining and
// have no live sandbox; force ends its sandboxes as lost (listed in the
// answer).
func (c *Client) RemoveNode(ctx context.Context, node string, force bool) (*v1.RemoveNodeResponse, error) {
	resp, err := c.nodes.Remove(ctx, connect.NewRequest(&v1.RemoveNodeRequest{Id: node, Force: force}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}
