package api

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

// IngressBackend serves exposed sandbox ports on the node's ingress
// listener (package ingress). The store holds the exposures; the backend
// holds the routes in force.
type IngressBackend interface {
	// Route starts (or replaces) serving e; addr is the sandbox's address.
	Route(e *store.Exposure, addr netip.Addr)
	// Unroute stops serving port of sandbox id (0: every port) and closes
	// the route's open connections.
	Unroute(id string, port uint16)
	// URLs are e's host-routed and path-routed URLs.
	URLs(id string, port uint16) (host, path string)
	// Sign mints a token for port of sandbox id, valid until exp.
	Sign(id string, port uint16, exp time.Time) string
}

// Token lifetimes of private exposures.
const (
	DefaultIngressTokenTTL = time.Hour
	MaxIngressTokenTTL     = 7 * 24 * time.Hour
)

func (s *Server) ingress() (IngressBackend, error) {
	if s.cfg.Ingress == nil {
		return nil, fmt.Errorf("ingress is %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	return s.cfg.Ingress, nil
}

// MaxExposuresPerSandbox bounds a sandbox's exposed ports: each is a row,
// a route in memory and an entry of every prune; without a bound one
// member could expose all 65,535 ports of each of its sandboxes.
const MaxExposuresPerSandbox = 64

func validPort(p uint32) error {
	if p == 0 || p > 65535 {
		return invalid("port %d: want 1-65535", p)
	}
	return nil
}

func (h *sandboxService) Expose(ctx context.Context, req *connect.Request[v1.ExposeRequest]) (*connect.Response[v1.Exposure], error) {
	ib, err := h.s.ingress()
	if err != nil {
		return nil, err
	}
	r := req.Msg
	if err := validPort(r.Port); err != nil {
		return nil, err
	}
	ttl := DefaultIngressTokenTTL
	if r.TokenTtlSeconds < 0 || time.Duration(r.TokenTtlSeconds)*time.Second > MaxIngressTokenTTL {
		return nil, invalid("token_ttl_seconds %d: want 0 (default %s) to %d", r.TokenTtlSeconds, DefaultIngressTokenTTL, int64(MaxIngressTokenTTL/time.Second))
	} else if r.TokenTtlSeconds > 0 {
		ttl = time.Duration(r.TokenTtlSeconds) * time.Second
	}
	sb, err := h.s.runningFor(ctx, r.SandboxId)
	if err != nil {
		return nil, err
	}
	addr, err := netip.ParseAddr(sb.IP)
	if err != nil {
		return nil, fmt.Errorf("sandbox %q has no address: %w", sb.ID, errdefs.ErrFailedPrecondition)
	}
	p, _ := caller(ctx)
	e := &store.Exposure{SandboxID: sb.ID, Port: uint16(r.Port), OrgID: sb.OrgID, Public: r.Public, CreatedBy: p.Subject, CreatedAt: time.Now().UTC()}
	if err := h.s.store.PutExposureLimit(ctx, e, MaxExposuresPerSandbox); err != nil {
		return nil, err
	}
	ib.Route(e, addr)
	// The sandbox may have ended since the check, its Ended hook running
	// before the record or the route existed: check again after both.
	if !h.s.IsRunning(ctx, sb.ID) {
		ib.Unroute(sb.ID, 0)
		_ = h.s.store.DeleteExposures(context.WithoutCancel(ctx), sb.ID)
		return nil, notRunning(&store.Sandbox{ID: sb.ID, State: store.StateStopped})
	}
	out := exposureToProto(ib, e)
	if !e.Public {
		exp := time.Now().Add(ttl).UTC()
		out.Token = ib.Sign(e.SandboxID, e.Port, exp)
		out.TokenExpiresAt = ts(exp)
		out.SignedUrl = out.Url + "?chalk_token=" + out.Token
	}
	return connect.NewResponse(out), nil
}

func (h *sandboxService) Unexpose(ctx context.Context, req *connect.Request[v1.UnexposeRequest]) (*connect.Response[v1.UnexposeResponse], error) {
	ib, err := h.s.ingress()
	if err != nil {
		return nil, err
	}
	if err := validPort(req.Msg.Port); err != nil {
		return nil, err
	}
	sb, err := h.s.sandboxFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	derr := h.s.store.DeleteExposure(ctx, sb.ID, uint16(req.Msg.Port))
	ib.Unroute(sb.ID, uint16(req.Msg.Port)) // whatever the store said: nothing stays served
	if derr != nil {
		return nil, derr
	}
	return connect.NewResponse(&v1.UnexposeResponse{}), nil
}

func (h *sandboxService) ListExposures(ctx context.Context, req *connect.Request[v1.ListExposuresRequest]) (*connect.Response[v1.ListExposuresResponse], error) {
	ib, err := h.s.ingress()
	if err != nil {
		return nil, err
	}
	sb, err := h.s.sandboxFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	es, err := h.s.store.ListExposures(ctx, sb.ID)
	if err != nil {
		return nil, err
	}
	out := &v1.ListExposuresResponse{}
	for _, e := range es {
		out.Exposures = append(out.Exposures, exposureToProto(ib, e))
	}
	return connect.NewResponse(out), nil
}

func exposureToProto(ib IngressBackend, e *store.Exposure) *v1.Exposure {
	host, path := ib.URLs(e.SandboxID, e.Port)
	return &v1.Exposure{SandboxId: e.SandboxID, Port: uint32(e.Port), Public: e.Public, Url: host, PathUrl: path, CreatedAt: ts(e.CreatedAt)}
}
