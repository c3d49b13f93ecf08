package noderpc

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/identity"
)

// Workloads is the control plane's workload identity as nodes reach it:
// one issuer for the fleet, whose tokens a node's metadata service hands to
// the sandboxes placed on that node.
type Workloads interface {
	// NodeOf is the node sandbox id is placed on ("" if none).
	NodeOf(id string) string
	// Subject is the identity of running sandbox id now; Mint mints its
	// token for audience (ttl 0: the issuer's default).
	Subject(ctx context.Context, id string) (identity.Subject, error)
	Mint(ctx context.Context, sub identity.Subject, audience string, ttl time.Duration) (string, time.Time, error)
	// Issuer is the issuer URL.
	Issuer() string
}

// Workload answers a node for a sandbox placed on it, and only then: the
// node is the one its certificate names, and the sandbox must be placed
// there (a node cannot obtain another node's sandboxes' tokens).
func (f *Fleet) Workload(ctx context.Context, req *connect.Request[nodev1.WorkloadRequest]) (*connect.Response[nodev1.WorkloadResponse], error) {
	peer := NodeFromContext(ctx)
	if peer == "" {
		return nil, fmt.Errorf("workload: a node certificate is required: %w", errdefs.ErrUnauthenticated)
	}
	m := req.Msg
	if f.Workloads == nil {
		return nil, fmt.Errorf("workload: this control plane serves no workload identity to nodes: %w", errdefs.ErrFailedPrecondition)
	}
	if m.SandboxId == "" || len(m.SandboxId) > 128 || len(m.Audience) > 1024 {
		return nil, fmt.Errorf("workload: sandbox_id is required (at most 128 bytes), audience at most 1024 bytes: %w", errdefs.ErrInvalidArgument)
	}
	if m.TtlSeconds < 0 || time.Duration(m.TtlSeconds)*time.Second > identity.MaxTTL {
		return nil, fmt.Errorf("workload: ttl_seconds must be 0 to %d: %w", int(identity.MaxTTL/time.Second), errdefs.ErrInvalidArgument)
	}
	if on := f.Workloads.NodeOf(m.SandboxId); on != peer {
		f.log().Warn("fleet: workload identity for a sandbox not on the node refused", "node", peer, "sandbox", m.SandboxId)
		return nil, fmt.Errorf("workload: sandbox %q is not placed on node %q: %w", m.SandboxId, peer, errdefs.ErrPermissionDenied)
	}
	sub, err := f.Workloads.Subject(ctx, m.SandboxId)
	if err != nil {
		return nil, err
	}
	res := &nodev1.WorkloadResponse{OrgId: sub.OrgID, ImageDigest: sub.ImageDigest, NetworkPolicy: sub.NetworkPolicy,
		CreatedBy: sub.CreatedBy, Issuer: f.Workloads.Issuer()}
	if m.Audience != "" {
		tok, exp, err := f.Workloads.Mint(ctx, sub, m.Audience, time.Duration(m.TtlSeconds)*time.Second)
		if err != nil {
			return nil, err
		}
		res.Token, res.ExpiresUnixMs = tok, exp.UnixMilli()
	}
	return connect.NewResponse(res), nil
}

// WorkloadClient is how a node asks the control plane for its sandboxes'
// identities and tokens (over the fleet channel, with its certificate).
type WorkloadClient struct {
	rpc nodev1connect.FleetServiceClient
}

// NewWorkloadClient calls the control plane at controlURL as node id.
func NewWorkloadClient(id *NodeIdentity, controlURL string) *WorkloadClient {
	return &WorkloadClient{rpc: FleetClient(id, controlURL)}
}

// NewWorkloadClientOver is NewWorkloadClient over fc (FailoverFleetClient:
// any replica of the control plane).
func NewWorkloadClientOver(fc nodev1connect.FleetServiceClient) *WorkloadClient {
	return &WorkloadClient{rpc: fc}
}

// Workload returns sandbox id's identity and, with an audience, a token.
func (c *WorkloadClient) Workload(ctx context.Context, id, audience string, ttl time.Duration) (*nodev1.WorkloadResponse, error) {
	res, err := c.rpc.Workload(ctx, connect.NewRequest(&nodev1.WorkloadRequest{SandboxId: id, Audience: audience, TtlSeconds: int64(ttl / time.Second)}))
	if err != nil {
		return nil, wire(err)
	}
	return res.Msg, nil
}
