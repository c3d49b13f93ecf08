package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/atomicfile"
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
		Local: metadataName, // the node's metadata service, MCP gateway included
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
	nodeEgress{d}.reapply(ctx)
	return nil
}

// nodeEgress is noderpc.Egress on a node's egress manager.
type nodeEgress struct{ d *Daemon }

var _ noderpc.Egress = nodeEgress{}

// appliedPolicies is what a node keeps of a sandbox's rules
// (DataDir/egress-policies/<id>.json), so that a restarted node process
// applies them again to its running sandboxes: the kernel rules outlive
// the process, but the DNS proxy learns its sandboxes only from Apply.
type appliedPolicies struct {
	Slot     int             `json:"slot"`
	Policies []egress.Policy `json:"policies"`
}

func (e nodeEgress) policiesFile(id string) (string, error) {
	if id == "" || len(id) > 128 || strings.ContainsFunc(id, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}) {
		return "", fmt.Errorf("sandbox id %q: want lowercase letters, digits, - and _: %w", id, errdefs.ErrInvalidArgument)
	}
	return filepath.Join(e.d.cfg.DataDir, "egress-policies", id+".json"), nil
}

func (e nodeEgress) apply(ctx context.Context, id string, slot int, ps []egress.Policy, checkSlot bool) (string, error) {
	r, err := egress.Compile(ps...)
	if err != nil {
		return "", fmt.Errorf("sandbox %q: %w", id, err)
	}
	file, err := e.policiesFile(id)
	if err != nil {
		return "", err
	}
	// The rules go on the slot's interface: only the slot the node gave
	// this sandbox (a wrong one would move another sandbox's rules).
	got, ok := e.d.Agent.Slots().Of(id)
	if !ok {
		// A restarted node process learns its live sandboxes' slots only
		// when the control plane restores it: until then, the slot kept
		// with the sandbox's policies.
		got, ok = e.keptSlots()[id]
	}
	if checkSlot && (!ok || got != slot) {
		return "", fmt.Errorf("sandbox %q: slot %d is not its slot on this node: %w", id, slot, errdefs.ErrFailedPrecondition)
	}
	b, err := json.Marshal(appliedPolicies{Slot: slot, Policies: ps})
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		return "", err
	}
	if err := atomicfile.WriteFile(file, b, 0o600); err != nil {
		return "", err
	}
	n := e.d.Agent.Net(id, slot)
	if err := e.d.Egress.Apply(ctx, egress.Sandbox{ID: id, HostIf: n.HostIf, SandboxIP: n.SandboxIP, SandboxIP6: n.SandboxIP6}, r); err != nil {
		return "", fmt.Errorf("sandbox %q egress policy: %w", id, err)
	}
	return r.Hash(), nil
}

func (e nodeEgress) Apply(ctx context.Context, id string, slot int, ps []egress.Policy) (string, error) {
	return e.apply(ctx, id, slot, ps, true)
}

func (e nodeEgress) Ensure(ctx context.Context, id string, slot int) error {
	if _, ok := e.d.Egress.Policy(id); ok {
		return nil
	}
	_, err := e.apply(ctx, id, slot, nil, true)
	return err
}

// Remove also forgets the ended sandbox's workload identity.
func (e nodeEgress) Remove(ctx context.Context, id string) {
	_ = e.d.Egress.Remove(ctx, id)
	if file, err := e.policiesFile(id); err == nil {
		_ = os.Remove(file)
	}
	if e.d.nodeWL != nil {
		e.d.nodeWL.forget(id)
	}
}

// reapply applies again, at a node process's start, the kept policies of
// the sandboxes whose rules the previous process left (those without kept
// policies stay as they are until Prune).
func (e nodeEgress) reapply(ctx context.Context) {
	for _, id := range e.d.Egress.Adopted() {
		file, err := e.policiesFile(id)
		if err != nil {
			continue
		}
		b, err := os.ReadFile(file)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		var ap appliedPolicies
		if err == nil {
			err = json.Unmarshal(b, &ap)
		}
		if err == nil && ap.Slot <= 0 {
			err = fmt.Errorf("slot %d", ap.Slot)
		}
		if err == nil {
			_, err = e.apply(ctx, id, ap.Slot, ap.Policies, false)
		}
		if err != nil {
			e.d.log.Error("egress: apply a running sandbox's policies again", "sandbox", id, "err", err)
		}
	}
}

// Prune removes the rules (and kept policies) of sandboxes not live here:
// those a previous process left, applied again at start or not.
func (e nodeEgress) Prune(ctx context.Context, live map[string]int) {
	ids := e.d.Egress.Adopted()
	ents, _ := os.ReadDir(filepath.Join(e.d.cfg.DataDir, "egress-policies"))
	for _, ent := range ents {
		if id, ok := strings.CutSuffix(ent.Name(), ".json"); ok {
			ids = append(ids, id)
		}
	}
	for _, id := range ids {
		if _, ok := live[id]; !ok {
			e.Remove(ctx, id)
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

// Drops is the sandbox's egress log, kept by its node.
func (b *fleetPolicies) Drops(id string) []*v1.EgressDrop {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ds, err := b.router.EgressDrops(ctx, id)
	if err != nil {
		return nil
	}
	return dropsToProto(ds)
}

func (e nodeEgress) Drops(id string) []egress.Drop { return e.d.Egress.Blocked(id) }

// keptSlots is the slot of every sandbox with kept policies.
func (e nodeEgress) keptSlots() map[string]int {
	out := map[string]int{}
	dir := filepath.Join(e.d.cfg.DataDir, "egress-policies")
	ents, _ := os.ReadDir(dir)
	for _, ent := range ents {
		id, ok := strings.CutSuffix(ent.Name(), ".json")
		if !ok {
			continue
		}
		var ap appliedPolicies
		if b, err := os.ReadFile(filepath.Join(dir, ent.Name())); err == nil && json.Unmarshal(b, &ap) == nil && ap.Slot > 0 {
			out[id] = ap.Slot
		}
	}
	return out
}
