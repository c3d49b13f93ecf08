package daemon

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/store"
)

// Egress in fleet mode. The rules are a node's: each `chalkd node` runs the
// egress manager (nftables chains keyed by the slot's interface, the DNS
// proxy at the sandboxes' gateway) as the all-in-one daemon does; the
// control plane resolves a sandbox's network policies and sends them
// (noderpc ApplyEgress) before its Start and when they change, and a node
// gives the baseline rules (every blocked range dropped) to a sandbox it
// is asked to start without any.

// startNodeEgress starts the egress manager of `chalkd node`.
func (d *Daemon) startNodeEgress(ctx context.Context) (err error) {
	if d.Egress, err = egress.New(egress.Config{
		Table: d.Net.Table(), Logger: d.cfg.Logger, Upstream: d.cfg.DNSUpstream,
		ListenAddrs: []string{
			netip.AddrPortFrom(d.Net.ServiceAddr(), 53).String(),
			netip.AddrPortFrom(d.Net.ServiceAddr6(), 53).String(),
		},
	}); err != nil {
		return err
	}
	if err := d.Egress.Start(ctx); err != nil {
		return fmt.Errorf("egress: %w", err)
	}
	return nil
}

// nodeEgress is noderpc.Egress on a node's egress manager.
type nodeEgress struct{ d *Daemon }

var _ noderpc.Egress = nodeEgress{}

func (e nodeEgress) apply(ctx context.Context, id string, slot int, r *egress.Rules) error {
	// The rules go on the slot's interface: only the slot the node gave
	// this sandbox (a wrong one would move another sandbox's rules).
	if got, ok := e.d.Agent.Slots().Of(id); !ok || got != slot {
		return fmt.Errorf("sandbox %q: slot %d is not its slot on this node: %w", id, slot, errdefs.ErrFailedPrecondition)
	}
	n := e.d.Agent.Net(id, slot)
	if err := e.d.Egress.Apply(ctx, egress.Sandbox{ID: id, HostIf: n.HostIf, SandboxIP: n.SandboxIP, SandboxIP6: n.SandboxIP6}, r); err != nil {
		return fmt.Errorf("sandbox %q egress policy: %w", id, err)
	}
	return nil
}

func (e nodeEgress) Apply(ctx context.Context, id string, slot int, ps []egress.Policy) (string, error) {
	r, err := egress.Compile(ps...)
	if err != nil {
		return "", fmt.Errorf("sandbox %q: %w", id, err)
	}
	if err := e.apply(ctx, id, slot, r); err != nil {
		return "", err
	}
	return r.Hash(), nil
}

func (e nodeEgress) Ensure(ctx context.Context, id string, slot int) error {
	if _, ok := e.d.Egress.Policy(id); ok {
		return nil
	}
	r, err := egress.Compile()
	if err != nil {
		return err
	}
	return e.apply(ctx, id, slot, r)
}

// Remove also forgets the ended sandbox's workload identity.
func (e nodeEgress) Remove(ctx context.Context, id string) {
	_ = e.d.Egress.Remove(ctx, id)
	if e.d.nodeWL != nil {
		e.d.nodeWL.forget(id)
	}
}

func (e nodeEgress) Prune(ctx context.Context, live map[string]int) {
	for _, id := range e.d.Egress.Adopted() {
		if _, ok := live[id]; !ok {
			_ = e.d.Egress.Remove(ctx, id)
		}
	}
}

// fleetPolicies is the control plane's api.PolicyBackend: it validates and
// hashes as the all-in-one daemon does, and sends the rules to the
// sandbox's node.
type fleetPolicies struct {
	policies // Validate, Hash (no egress manager here)
	router   *noderpc.Router
}

func (b *fleetPolicies) Apply(ctx context.Context, sb *store.Sandbox, ps []*store.Policy) error {
	if _, err := b.router.ApplyEgress(ctx, sb.ID, sb.Slot, toEgress(ps)); err != nil {
		return fmt.Errorf("sandbox %q egress policy: %w", sb.ID, err)
	}
	return nil
}

// Drops: the egress log is the node's, not carried over the node API yet.
func (b *fleetPolicies) Drops(string) []*v1.EgressDrop { return nil }
