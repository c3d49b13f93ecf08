package api

import (
	"context"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// PolicyBackend compiles network policies and enforces them on sandboxes.
type PolicyBackend interface {
	// Validate rejects a policy with an error naming the bad entry.
	Validate(p *store.Policy) error
	// Hash is a stable hash of the effective (union) policy.
	Hash(ps []*store.Policy) (string, error)
	// Apply installs or replaces the sandbox's rules (live update).
	Apply(ctx context.Context, sb *store.Sandbox, ps []*store.Policy) error
	// Drops is the sandbox's recent blocked attempts.
	Drops(sandboxID string) []*v1.EgressDrop
}

type policyService struct{ s *Server }

var _ computev1connect.PolicyServiceHandler = (*policyService)(nil)

func policyFromProto(orgID string, m *v1.NetworkPolicy) *store.Policy {
	allowAll := true
	if m.AllowAll != nil {
		allowAll = *m.AllowAll
	}
	return &store.Policy{OrgID: orgID, Name: strings.TrimSpace(m.Name), AllowAll: allowAll,
		AllowedHostnames: m.AllowedHostnames, Description: m.Description}
}

func policyToProto(p *store.Policy) *v1.NetworkPolicy {
	allowAll := p.AllowAll
	return &v1.NetworkPolicy{Name: p.Name, AllowAll: &allowAll, AllowedHostnames: p.AllowedHostnames,
		Description: p.Description, CreatedAt: ts(p.CreatedAt), UpdatedAt: ts(p.UpdatedAt)}
}

// Bounds of network policies. Every sandbox a policy is bound to gets its
// networks as elements of its own nftables sets (kernel memory no cgroup of
// the sandbox counts, written in the nftables transactions every create
// and teardown of the node waits for) and its names in the DNS proxy's
// matcher: without bounds one policy (or a create's inline policies) could
// carry about a million entries, the API's message limit.
const (
	MaxPolicyEntries      = 1024 // allowed_hostnames of one policy
	MaxPoliciesPerSandbox = 16   // named and inline policies of one create
)

func (s *Server) validatePolicy(p *store.Policy) error {
	if p.Name == "" || len(p.Name) > 128 || strings.ContainsAny(p.Name, " /\t\n") {
		return invalid("network policy name %q: must be 1-128 characters without spaces or '/'", p.Name)
	}
	if n := len(p.AllowedHostnames); n > MaxPolicyEntries {
		return invalid("network policy %q: %d allowed_hostnames entries, at most %d (api.MaxPolicyEntries)", p.Name, n, MaxPolicyEntries)
	}
	if s.cfg.Policies != nil {
		return s.cfg.Policies.Validate(p)
	}
	return nil
}

// resolvePolicies loads named policies and creates or updates inline ones.
func (s *Server) resolvePolicies(ctx context.Context, orgID string, names []string, inline []*v1.NetworkPolicy) ([]*store.Policy, error) {
	if (len(names) > 0 || len(inline) > 0) && s.cfg.Policies == nil {
		return nil, fmt.Errorf("network policies are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	if n := len(names) + len(inline); n > MaxPoliciesPerSandbox {
		return nil, invalid("network policies: %d given, a sandbox may have at most %d (api.MaxPoliciesPerSandbox)", n, MaxPoliciesPerSandbox)
	}
	var out []*store.Policy
	for _, m := range inline {
		p := policyFromProto(orgID, m)
		if err := s.validatePolicy(p); err != nil {
			return nil, err
		}
		now := time.Now().UTC()
		p.UpdatedAt = now
		if old, err := s.store.GetPolicy(ctx, orgID, p.Name); err == nil {
			p.CreatedAt = old.CreatedAt
			if err := s.store.PutPolicy(ctx, p, false); err != nil {
				return nil, err
			}
			s.reapplyPolicy(ctx, orgID, p.Name)
		} else {
			p.CreatedAt = now
			if err := s.store.PutPolicy(ctx, p, true); err != nil {
				return nil, err
			}
		}
		out = append(out, p)
	}
	for _, n := range names {
		p, err := s.store.GetPolicy(ctx, orgID, n)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// PolicyHash is the network_policy claim of sb now: the hash of the union of
// the policies currently bound to it (read from the store, so updates of a
// bound policy, by Update or by another sandbox's inline policy of that name,
// show at once). Identity tokens carry it as minted, never as it was at create.
func (s *Server) PolicyHash(ctx context.Context, sb *store.Sandbox) (string, error) {
	return PolicyHash(ctx, s.store, s.cfg.Policies, sb)
}

// PolicyHash is Server.PolicyHash for those built before the server (the
// identity issuer's subjects): policies may be nil (none enforced).
func PolicyHash(ctx context.Context, st *store.Store, policies PolicyBackend, sb *store.Sandbox) (string, error) {
	if policies == nil {
		return sb.PolicyHash, nil
	}
	ps := make([]*store.Policy, 0, len(sb.Policies))
	for _, n := range sb.Policies {
		p, err := st.GetPolicy(ctx, sb.OrgID, n)
		if err != nil {
			return "", fmt.Errorf("sandbox %s: network policy %q: %w", sb.ID, n, err)
		}
		ps = append(ps, p)
	}
	return policies.Hash(ps)
}

// reapplyPolicy pushes a changed policy to every running sandbox that uses it.
func (s *Server) reapplyPolicy(ctx context.Context, orgID, name string) {
	if s.cfg.Policies == nil {
		return
	}
	sbs, err := s.store.ListSandboxes(ctx, orgID, true)
	if err != nil {
		s.log.Error("reapply policy", "policy", name, "err", err)
		return
	}
	for _, sb := range sbs {
		uses := false
		for _, n := range sb.Policies {
			uses = uses || n == name
		}
		if !uses || sb.State != store.StateRunning {
			continue
		}
		var ps []*store.Policy
		for _, n := range sb.Policies {
			if p, err := s.store.GetPolicy(ctx, orgID, n); err == nil {
				ps = append(ps, p)
			}
		}
		if err := s.cfg.Policies.Apply(ctx, sb, ps); err != nil {
			s.log.Error("reapply policy", "policy", name, "sandbox", sb.ID, "err", err)
		}
	}
}

func (h *policyService) Create(ctx context.Context, req *connect.Request[v1.NetworkPolicy]) (*connect.Response[v1.NetworkPolicy], error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	p := policyFromProto(u.OrgID, req.Msg)
	if err := h.s.validatePolicy(p); err != nil {
		return nil, err
	}
	p.CreatedAt = time.Now().UTC()
	p.UpdatedAt = p.CreatedAt
	if err := h.s.store.PutPolicy(ctx, p, true); err != nil {
		return nil, err
	}
	return connect.NewResponse(policyToProto(p)), nil
}

func (h *policyService) Update(ctx context.Context, req *connect.Request[v1.NetworkPolicy]) (*connect.Response[v1.NetworkPolicy], error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	p := policyFromProto(u.OrgID, req.Msg)
	if err := h.s.validatePolicy(p); err != nil {
		return nil, err
	}
	old, err := h.s.store.GetPolicy(ctx, u.OrgID, p.Name)
	if err != nil {
		return nil, err
	}
	p.CreatedAt, p.UpdatedAt = old.CreatedAt, time.Now().UTC()
	if err := h.s.store.PutPolicy(ctx, p, false); err != nil {
		return nil, err
	}
	h.s.reapplyPolicy(ctx, u.OrgID, p.Name)
	return connect.NewResponse(policyToProto(p)), nil
}

func (h *policyService) Get(ctx context.Context, req *connect.Request[v1.PolicyName]) (*connect.Response[v1.NetworkPolicy], error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	p, err := h.s.store.GetPolicy(ctx, u.OrgID, req.Msg.Name)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(policyToProto(p)), nil
}

func (h *policyService) List(ctx context.Context, _ *connect.Request[v1.ListPoliciesRequest]) (*connect.Response[v1.ListPoliciesResponse], error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	ps, err := h.s.store.ListPolicies(ctx, u.OrgID)
	if err != nil {
		return nil, err
	}
	out := &v1.ListPoliciesResponse{}
	for _, p := range ps {
		out.Policies = append(out.Policies, policyToProto(p))
	}
	return connect.NewResponse(out), nil
}

func (h *policyService) Delete(ctx context.Context, req *connect.Request[v1.PolicyName]) (*connect.Response[v1.DeletePolicyResponse], error) {
	u, err := user(ctx)
	if err != nil {
		return nil, err
	}
	sbs, err := h.s.store.ListSandboxes(ctx, u.OrgID, true)
	if err != nil {
		return nil, err
	}
	for _, sb := range sbs {
		for _, n := range sb.Policies {
			if n == req.Msg.Name {
				return nil, fmt.Errorf("network policy %q is in use by running sandbox %s: %w", n, sb.ID, errdefs.ErrFailedPrecondition)
			}
		}
	}
	if err := h.s.store.DeletePolicy(ctx, u.OrgID, req.Msg.Name); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.DeletePolicyResponse{}), nil
}
