package api

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// IdentityBackend mints workload identity tokens and rotates signing keys.
type IdentityBackend interface {
	Mint(ctx context.Context, sb *store.Sandbox, audience string, ttl time.Duration) (string, time.Time, error)
	Rotate(ctx context.Context) ([]string, error)
}

type identityService struct{ s *Server }

var _ computev1connect.IdentityServiceHandler = (*identityService)(nil)

func (h *identityService) WhoAmI(ctx context.Context, _ *connect.Request[v1.WhoAmIRequest]) (*connect.Response[v1.WhoAmIResponse], error) {
	p, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	out := &v1.WhoAmIResponse{Kind: p.Kind, Subject: p.Subject, OrgId: p.OrgID, SandboxId: p.SandboxID, Name: p.Name,
		Role: string(p.Role), KeyPrefix: p.KeyPrefix, NodeAdmin: p.NodeAdmin, User: p.User}
	if p.IsWorkload() {
		out.Name = p.SandboxID
		if sb, err := h.s.store.GetSandbox(ctx, p.SandboxID); err == nil {
			out.User = sb.CreatedBy
		}
	}
	return connect.NewResponse(out), nil
}

func (h *identityService) MintToken(ctx context.Context, req *connect.Request[v1.MintTokenRequest]) (*connect.Response[v1.MintTokenResponse], error) {
	p, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.Identity == nil {
		return nil, fmt.Errorf("workload identity is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	id := req.Msg.SandboxId
	if p.IsWorkload() {
		if id != "" && id != p.SandboxID {
			return nil, fmt.Errorf("workload %s may only mint its own tokens: %w", p.Subject, errdefs.ErrPermissionDenied)
		}
		id = p.SandboxID
	}
	sb, err := h.s.sandboxFor(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := notRunning(sb); err != nil {
		return nil, err
	}
	if req.Msg.Audience == "" {
		return nil, invalid("audience: required")
	}
	tok, exp, err := h.s.cfg.Identity.Mint(ctx, sb, req.Msg.Audience, time.Duration(req.Msg.TtlSeconds)*time.Second)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.MintTokenResponse{Token: tok, ExpiresAt: ts(exp)}), nil
}

func (h *identityService) RotateKeys(ctx context.Context, _ *connect.Request[v1.RotateKeysRequest]) (*connect.Response[v1.RotateKeysResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	if !p.NodeAdmin {
		return nil, fmt.Errorf("key rotation needs the node admin's key: %w", errdefs.ErrPermissionDenied)
	}
	if h.s.cfg.Identity == nil {
		return nil, fmt.Errorf("workload identity is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	kids, err := h.s.cfg.Identity.Rotate(ctx)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RotateKeysResponse{Kids: kids}), nil
}
