package chalkcompute

import (
	"context"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// ExposeOption configures Expose.
type ExposeOption func(*v1.ExposeRequest)

// Public makes the exposed port open to anyone who has the URL. By
// default it is private: callers need an API key of the sandbox's org
// (Authorization: Bearer) or the signed URL Expose returns.
func Public() ExposeOption { return func(r *v1.ExposeRequest) { r.Public = true } }

// WithTokenTTL sets how long the signed URL of a private port works
// (default 1 h, at most 7 days).
func WithTokenTTL(d time.Duration) ExposeOption {
	return func(r *v1.ExposeRequest) { r.TokenTtlSeconds = int64(d / time.Second) }
}

// Expose serves port of the sandbox on chalkd's ingress listener and
// returns the exposure: URL (host-routed when the node has an ingress
// domain), PathUrl, and for a private port the Token and SignedUrl.
func (s *Sandbox) Expose(ctx context.Context, port int, opts ...ExposeOption) (*v1.Exposure, error) {
	req := &v1.ExposeRequest{SandboxId: s.id, Port: uint32(port)}
	for _, o := range opts {
		o(req)
	}
	resp, err := s.c.sandbox.Expose(ctx, connect.NewRequest(req))
	if err != nil {
		return nil, fromConnect(err)
	}
	return resp.Msg, nil
}

// Unexpose stops serving port: the URL stops working at once and open
// connections to it are closed.
func (s *Sandbox) Unexpose(ctx context.Context, port int) error {
	_, err := s.c.sandbox.Unexpose(ctx, connect.NewRequest(&v1.UnexposeRequest{SandboxId: s.id, Port: uint32(port)}))
	return fromConnect(err)
}

// Exposures lists the sandbox's exposed ports.
func (s *Sandbox) Exposures(ctx context.Context) ([]*v1.Exposure, error) {
	resp, err := s.c.sandbox.ListExposures(ctx, connect.NewRequest(&v1.ListExposuresRequest{SandboxId: s.id}))
	if err != nil {
		return nil, fromConnect(err)
	}
	return resp.Msg.Exposures, nil
}
