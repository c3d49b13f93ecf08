package noderpc

import (
	"context"
	"time"

	"github.com/chalkcompute/chalkcompute/store"
)

// Control-plane replicas (issue #17): several Routers, one per replica,
// place sandboxes on the same nodes. What one knows of another's placements
// comes from the store: each sandbox record names its node
// (store.Sandbox.Node), a call for a sandbox this router did not place is
// routed by its record (placed), and the live records' cpu, memory and
// slots count in placement (syncPlacements, every Refresh). The slot itself
// is the node's: two replicas asking one node at once get two slots or a
// refusal, and a refused reservation goes to the next candidate.

// placed returns where sandbox id runs by its store record, and remembers
// it (nil if the record names no node or is not live).
func (r *Router) placed(id string) *placement {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sb, err := r.store.GetSandbox(ctx, id)
	if err != nil || sb.Node == "" || !sb.Live() {
		return nil
	}
	p := &placement{node: sb.Node, slot: sb.Slot, cpu: sb.CPU, memory: sb.MemoryMB << 20, recorded: true}
	r.mu.Lock()
	defer r.mu.Unlock()
	if q := r.where[id]; q != nil {
		return q
	}
	r.where[id] = p
	return p
}

// syncPlacements brings the placements in line with the store's live
// records: those another replica made are added; those whose record was
// live and is no more (another replica recorded the end) are dropped. A
// reservation of this router whose record does not exist yet is kept.
func (r *Router) syncPlacements(ctx context.Context) error {
	sbs, err := r.store.ListSandboxes(ctx, "", true)
	if err != nil {
		return err
	}
	live := make(map[string]*store.Sandbox, len(sbs))
	for _, sb := range sbs {
		live[sb.ID] = sb
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for id, p := range r.where {
		if live[id] != nil {
			p.recorded = true
		} else if p.recorded {
			delete(r.where, id)
		}
	}
	for _, sb := range sbs {
		if sb.Node == "" || r.where[sb.ID] != nil {
			continue
		}
		r.where[sb.ID] = &placement{node: sb.Node, slot: sb.Slot, cpu: sb.CPU, memory: sb.MemoryMB << 20, recorded: true}
	}
	return nil
}

// leading reports whether this router does leader-only work (reconciling
// a returned node): always without replicas.
func (r *Router) leading() bool { return r.Leading == nil || r.Leading() }
