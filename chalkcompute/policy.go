package chalkcompute

import (
	"context"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// NetworkPolicy is an egress allowlist. AllowAll defaults to true when nil
// (unrestricted egress, as without any policy). Whatever the policy, the
// node's private networks and cloud metadata addresses are blocked (see
// egress.BlockedPrefixes); a CIDR entry inside one (10.20.0.0/16) opens it,
// with AllowAll too. Hostnames never do.
type NetworkPolicy struct {
	Name             string
	AllowAll         *bool
	AllowedHostnames []string // exact names, leading wildcards (*.example.com) and CIDR ranges
	Description      string
}

// Bool returns a pointer to b (for NetworkPolicy.AllowAll).
func Bool(b bool) *bool { return &b }

func (p NetworkPolicy) proto() *v1.NetworkPolicy {
	return &v1.NetworkPolicy{Name: p.Name, AllowAll: p.AllowAll, AllowedHostnames: append([]string(nil), p.AllowedHostnames...), Description: p.Description}
}

func policyFrom(m *v1.NetworkPolicy) NetworkPolicy {
	return NetworkPolicy{Name: m.Name, AllowAll: m.AllowAll, AllowedHostnames: m.AllowedHostnames, Description: m.Description}
}

// CreatePolicy creates a named policy.
func (c *Client) CreatePolicy(ctx context.Context, p NetworkPolicy) (NetworkPolicy, error) {
	resp, err := c.policies.Create(ctx, connect.NewRequest(p.proto()))
	if err != nil {
		return NetworkPolicy{}, err
	}
	return policyFrom(resp.Msg), nil
}

// UpdatePolicy replaces a policy; running sandboxes bound to it follow within a second.
func (c *Client) UpdatePolicy(ctx context.Context, p NetworkPolicy) (NetworkPolicy, error) {
	resp, err := c.policies.Update(ctx, connect.NewRequest(p.proto()))
	if err != nil {
		return NetworkPolicy{}, err
	}
	return policyFrom(resp.Msg), nil
}

// GetPolicy returns a policy by name.
func (c *Client) GetPolicy(ctx context.Context, name string) (NetworkPolicy, error) {
	resp, err := c.policies.Get(ctx, connect.NewRequest(&v1.PolicyName{Name: name}))
	if err != nil {
		return NetworkPolicy{}, err
	}
	return policyFrom(resp.Msg), nil
}

// ListPolicies lists policies.
func (c *Client) ListPolicies(ctx context.Context) ([]NetworkPolicy, error) {
	resp, err := c.policies.List(ctx, connect.NewRequest(&v1.ListPoliciesRequest{}))
	if err != nil {
		return nil, err
	}
	out := make([]NetworkPolicy, 0, len(resp.Msg.Policies))
	for _, m := range resp.Msg.Policies {
		out = append(out, policyFrom(m))
	}
	return out, nil
}

// DeletePolicy deletes a policy no running sandbox uses.
func (c *Client) DeletePolicy(ctx context.Context, name string) error {
	_, err := c.policies.Delete(ctx, connect.NewRequest(&v1.PolicyName{Name: name}))
	return err
}

// WhoAmI returns who the client authenticates as.
func (c *Client) WhoAmI(ctx context.Context) (*v1.WhoAmIResponse, error) {
	resp, err := c.identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// MintToken mints a workload identity token for a sandbox (a workload may only mint its own).
func (c *Client) MintToken(ctx context.Context, sandboxID, audience string, ttlSeconds int64) (*v1.MintTokenResponse, error) {
	resp, err := c.identity.MintToken(ctx, connect.NewRequest(&v1.MintTokenRequest{SandboxId: sandboxID, Audience: audience, TtlSeconds: ttlSeconds}))
	if err != nil {
		return nil, err
	}
	return resp.Msg, nil
}

// RotateKeys forces a signing key rotation (admin).
func (c *Client) RotateKeys(ctx context.Context) ([]string, error) {
	resp, err := c.identity.RotateKeys(ctx, connect.NewRequest(&v1.RotateKeysRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Kids, nil
}
