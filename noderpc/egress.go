package noderpc

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
)

// Egress enforces the egress rules of a node's sandboxes (the daemon's
// egress manager on the node). The control plane resolves a sandbox's
// network policies and sends them (ApplyEgress); the node holds the rules.
type Egress interface {
	// Apply sets sandbox id's rules, on its slot's interface, from its
	// policies (none: the baseline, every blocked range dropped) and
	// returns their hash.
	Apply(ctx context.Context, id string, slot int, policies []egress.Policy) (string, error)
	// Ensure gives sandbox id the baseline rules unless it has rules: a
	// node starts no sandbox without egress rules, whatever it was sent.
	Ensure(ctx context.Context, id string, slot int) error
	// Remove drops an ended sandbox's rules.
	Remove(ctx context.Context, id string)
	// Prune drops the rules of every sandbox not in live (at a restore).
	Prune(ctx context.Context, live map[string]int)
	// Drops is the sandbox's recent blocked attempts.
	Drops(id string) []egress.Drop
}

// WithEgress makes the server enforce egress rules with e: ApplyEgress
// sets them, Start gives the baseline to a sandbox that has none, and
// Teardown, Destroy and Restore remove those of ended sandboxes.
func (s *Server) WithEgress(e Egress) *Server {
	s.egress = e
	return s
}

// MaxPolicies bounds the policies of one ApplyEgress (the API bounds a
// sandbox's far below).
const MaxPolicies = 64

func (s *Server) ApplyEgress(ctx context.Context, req *connect.Request[nodev1.ApplyEgressRequest]) (*connect.Response[nodev1.ApplyEgressResponse], error) {
	m := req.Msg
	if s.egress == nil {
		return nil, fmt.Errorf("sandbox %q: this node enforces no egress rules: %w", m.Id, errdefs.ErrFailedPrecondition)
	}
	if m.Id == "" || m.Slot <= 0 {
		return nil, invalid("apply egress: id and slot are required")
	}
	if len(m.Policies) > MaxPolicies {
		return nil, invalid("apply egress: %d policies (at most %d)", len(m.Policies), MaxPolicies)
	}
	ps := make([]egress.Policy, 0, len(m.Policies))
	for _, p := range m.Policies {
		ps = append(ps, egress.Policy{Name: p.Name, AllowAll: p.AllowAll, AllowedHostnames: p.AllowedHostnames})
	}
	h, err := s.egress.Apply(ctx, m.Id, int(m.Slot), ps)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.ApplyEgressResponse{Hash: h}), nil
}

// ApplyEgress sends sandbox id's policies to the node (see Egress.Apply).
func (c *Client) ApplyEgress(ctx context.Context, id string, slot int, policies []egress.Policy) (string, error) {
	m := &nodev1.ApplyEgressRequest{Id: id, Slot: int32(slot)}
	for _, p := range policies {
		m.Policies = append(m.Policies, &nodev1.NetworkPolicy{Name: p.Name, AllowAll: p.AllowAll, AllowedHostnames: p.AllowedHostnames})
	}
	res, err := c.rpc.ApplyEgress(ctx, connect.NewRequest(m))
	if err != nil {
		return "", wire(err)
	}
	return res.Msg.Hash, nil
}

// egressNode is a node that takes egress rules (a *Client).
type egressNode interface {
	ApplyEgress(ctx context.Context, id string, slot int, policies []egress.Policy) (string, error)
}

// ApplyEgress sends sandbox id's policies to the node it is placed on.
func (r *Router) ApplyEgress(ctx context.Context, id string, slot int, policies []egress.Policy) (string, error) {
	m, err := r.on(id)
	if err != nil {
		return "", err
	}
	en, ok := m.client.(egressNode)
	if !ok {
		return "", fmt.Errorf("sandbox %q: node %s takes no egress rules: %w", id, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	return en.ApplyEgress(ctx, id, slot, policies)
}

func (s *Server) EgressDrops(_ context.Context, req *connect.Request[nodev1.EgressDropsRequest]) (*connect.Response[nodev1.EgressDropsResponse], error) {
	res := &nodev1.EgressDropsResponse{}
	if s.egress == nil {
		return connect.NewResponse(res), nil
	}
	for _, d := range s.egress.Drops(req.Msg.Id) {
		res.Drops = append(res.Drops, &nodev1.EgressDrop{TimeUnixNano: d.Time.UnixNano(), Proto: d.Proto, Dst: d.Dst, Port: int32(d.Port), Name: d.Name, Count: d.Count})
	}
	return connect.NewResponse(res), nil
}

// EgressDrops is sandbox id's egress log on the node.
func (c *Client) EgressDrops(ctx context.Context, id string) ([]egress.Drop, error) {
	res, err := c.rpc.EgressDrops(ctx, connect.NewRequest(&nodev1.EgressDropsRequest{Id: id}))
	if err != nil {
		return nil, wire(err)
	}
	out := make([]egress.Drop, 0, len(res.Msg.Drops))
	for _, d := range res.Msg.Drops {
		out = append(out, egress.Drop{Time: time.Unix(0, d.TimeUnixNano), Proto: d.Proto, Dst: d.Dst, Port: int(d.Port), Name: d.Name, Count: d.Count})
	}
	return out, nil
}

// EgressDrops is sandbox id's egress log, from the node it is placed on.
func (r *Router) EgressDrops(ctx context.Context, id string) ([]egress.Drop, error) {
	m, err := r.on(id)
	if err != nil {
		return nil, err
	}
	c, ok := m.client.(*Client)
	if !ok {
		return nil, fmt.Errorf("sandbox %q: node %s keeps no egress log: %w", id, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	return c.EgressDrops(ctx, id)
}
