package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
)

// policies enforces network policies through the egress manager.
type policies struct {
	m     *egress.Manager
	agent *node.Agent
}

var _ api.PolicyBackend = (*policies)(nil)

func toEgress(ps []*store.Policy) []egress.Policy {
	out := make([]egress.Policy, 0, len(ps))
	for _, p := range ps {
		out = append(out, egress.Policy{Name: p.Name, AllowAll: p.AllowAll, AllowedHostnames: p.AllowedHostnames, Description: p.Description})
	}
	return out
}

func (b *policies) Validate(p *store.Policy) error {
	if _, err := egress.Compile(toEgress([]*store.Policy{p})...); err != nil {
		return fmt.Errorf("network policy %q: %w", p.Name, err)
	}
	return nil
}

// AllowAllPolicyHash is the network_policy claim of a sandbox whose egress is
// unrestricted (no policy, or one that allows all): a hash like any other,
// of the effective policy "allow-all" in egress's hash format.
var AllowAllPolicyHash = func() string {
	h := sha256.Sum256([]byte("chalk-egress-v1\nallow-all\n"))
	return "sha256:" + hex.EncodeToString(h[:])
}()

func (b *policies) Hash(ps []*store.Policy) (string, error) {
	r, err := egress.Compile(toEgress(ps)...)
	if err != nil {
		return "", err
	}
	if h := r.Hash(); h != "allow-all" {
		return h, nil
	}
	return AllowAllPolicyHash, nil
}

func (b *policies) Apply(ctx context.Context, sb *store.Sandbox, ps []*store.Policy) error {
	r, err := egress.Compile(toEgress(ps)...)
	if err != nil {
		return err
	}
	n := b.agent.Net(sb.ID, sb.Slot)
	if err := b.m.Apply(ctx, egress.Sandbox{ID: sb.ID, HostIf: n.HostIf, SandboxIP: n.SandboxIP, SandboxIP6: n.SandboxIP6}, r); err != nil {
		return fmt.Errorf("sandbox %q egress policy: %w", sb.ID, err)
	}
	return nil
}

func (b *policies) Drops(id string) []*v1.EgressDrop { return dropsToProto(b.m.Blocked(id)) }

func dropsToProto(ds []egress.Drop) []*v1.EgressDrop {
	var out []*v1.EgressDrop
	for _, d := range ds {
		out = append(out, &v1.EgressDrop{Time: d.Time.UTC().Format(time.RFC3339Nano), Proto: d.Proto, Dst: d.Dst, Port: int32(d.Port), Name: d.Name, Count: d.Count})
	}
	return out
}

// remove drops a sandbox's rules once it has ended.
func (b *policies) remove(ctx context.Context, sb *store.Sandbox) {
	_ = b.m.Remove(ctx, sb.ID)
}

// resume re-applies the stored policies of a sandbox found running at start.
func (b *policies) resume(ctx context.Context, st *store.Store, sb *store.Sandbox) error {
	var ps []*store.Policy
	for _, name := range sb.Policies {
		p, err := st.GetPolicy(ctx, sb.OrgID, name)
		if err != nil {
			return fmt.Errorf("sandbox %q policy %q: %w", sb.ID, name, errdefs.ErrNotFound)
		}
		ps = append(ps, p)
	}
	return b.Apply(ctx, sb, ps)
}
