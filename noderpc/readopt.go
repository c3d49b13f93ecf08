package noderpc

import (
	"cmp"
	"context"
	"maps"
	"slices"
	"sync"
	"time"
)

// Re-adoption (issue #17). A sandbox whose node goes silent is reported
// lost at once (its Wait returns node.ErrLost and the API records it
// stopped, end_reason "lost"), but nothing of it is destroyed on the node
// yet: it is an orphan there (orphan). When the node heartbeats again
// within LostGrace of the sandbox's recorded end and still runs it with
// the same init pid, the leader re-adopts it: its record goes back to
// running (store.ReviveLost, a compare-and-swap), its placement counts
// again, and the API watches it again (Readopter). Otherwise (it is not
// running there, its pid differs, or the grace has passed) it is destroyed
// on the node, as before.

// DefaultLostGrace is how long after a sandbox is reported lost its
// returning node may still have it re-adopted.
const DefaultLostGrace = 5 * time.Minute

// Readopter is the API's side of a re-adoption: it revives sandbox id's
// record if it is a sandbox reported lost on node, with init pid, ended
// at since or later, and watches it again. It reports whether it did.
type Readopter func(ctx context.Context, id, node string, pid int, since time.Time) bool

// SetReadopter sets what revives a lost sandbox found running on its
// returned node (nil: none is, every lost sandbox is destroyed there).
func (r *Router) SetReadopter(f Readopter) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.readopter = f
}

// SetLostFinal sets what the router tells when the loss of a sandbox is
// final: its node answered again (its reconcile reached it) and it was not
// re-adopted (not running there, another pid, refused). What was kept for a
// possible re-adoption (its ingress exposures) may go then.
func (r *Router) SetLostFinal(f func(ctx context.Context, id string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lostFinal = f
}

// readopt re-adopts what may be on returned node nodeID among its orphans
// and the records reported lost on it within the grace (another replica,
// leading before, may have recorded them): each one the node still runs
// and the API revives is placed there again and leaves orphans; it
// returns the slots of those re-adopted, by id, and the others it
// considered (their loss is final once the node is found answering).
func (r *Router) readopt(ctx context.Context, m *member, nodeID string, orphans, live map[string]int) (map[string]int, []string) {
	r.mu.Lock()
	f := r.readopter
	r.mu.Unlock()
	grace := r.LostGrace
	if f == nil || grace <= 0 {
		return nil, nil
	}
	since := r.now().Add(-grace)
	type cand struct {
		slot   int
		cpu    float64
		memory int64
	}
	cands := map[string]cand{}
	for id, slot := range orphans {
		cands[id] = cand{slot: slot}
	}
	// Only this node's lost records within the grace are read
	// (store.LostOn), not every sandbox record.
	if sbs, err := r.store.LostOn(ctx, nodeID, since); err != nil {
		r.log.Warn("fleet: lost sandboxes of a returned node", "node", nodeID, "err", err)
	} else {
		for _, sb := range sbs {
			cands[sb.ID] = cand{slot: sb.Slot, cpu: sb.CPU, memory: sb.MemoryMB << 20}
		}
	}
	ids := make([]string, 0, len(cands))
	for id := range cands {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var rest []string
	pids := map[string]int{}
	for _, id := range ids {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pid, running := m.client.Running(cctx, id)
		cancel()
		if !running {
			rest = append(rest, id)
			continue
		}
		pids[id] = pid
	}
	if len(pids) > 0 {
		// The node learns them as live before they are (its slots: its
		// ingress dial finds the sandbox once its record says running).
		with := maps.Clone(live)
		for id := range pids {
			with[id] = cands[id].slot
		}
		if err := m.client.Restore(ctx, with); err != nil {
			r.log.Warn("fleet: restore a returned node before re-adoption", "node", nodeID, "err", err)
		}
	}
	out := map[string]int{}
	for _, id := range ids {
		c := cands[id]
		pid, running := pids[id]
		if !running {
			continue
		}
		// Placed there again before its record says running, so that the
		// API's watch (Wait) finds it; undone if it is not revived.
		r.mu.Lock()
		if r.where[id] != nil {
			r.mu.Unlock()
			continue
		}
		r.where[id] = &placement{node: nodeID, slot: c.slot, cpu: c.cpu, memory: c.memory}
		r.mu.Unlock()
		if !f(ctx, id, nodeID, pid, since) {
			r.forget(id)
			rest = append(rest, id)
			continue
		}
		out[id] = c.slot
		r.log.Info("fleet: re-adopted a lost sandbox on its returned node", "node", nodeID, "sandbox", id, "pid", pid)
	}
	return out, rest
}

// ReconcileStart reconciles every node as a returned node, once the
// control plane's start has watched the sandboxes still running and ended
// the others (api.Server.Reconcile): a sandbox recorded lost before the
// start (its node went silent, then the control plane restarted) that its
// node still runs with the recorded init pid is re-adopted from its record
// (readopt), and what the node holds of no live sandbox is removed. Only the
// leader reconciles (toReconcile; a replica that takes the lease later
// reconciles the nodes then). A node that does not answer now is
// reconciled in the background, and again at a later Refresh while it
// counts as healthy (reconcile), or when it returns after it was found
// silent.
func (r *Router) ReconcileStart(ctx context.Context) {
	r.mu.Lock()
	for id := range r.members {
		r.unreconciled[id] = true
	}
	back := r.toReconcile()
	r.mu.Unlock()
	r.reconcileBounded(ctx, back)
}

// DefaultReconcileWait is how long Refresh waits for the reconciles it
// started before it returns (they go on in the background): a node that
// stops answering in the middle of its reconcile (frozen, partitioned
// again) delays the health of no node by more (Router.ReconcileWait).
const DefaultReconcileWait = time.Second

// reconcileBounded reconciles the returned nodes ids, each in its own
// goroutine (one at a time per node: a node whose reconcile still runs
// is reconciled again at the next Refresh), and waits for them for at
// most ReconcileWait.
func (r *Router) reconcileBounded(ctx context.Context, ids []string) {
	if len(ids) == 0 {
		return
	}
	var wg sync.WaitGroup
	for _, id := range ids {
		r.mu.Lock()
		busy := r.reconciling[id]
		if busy {
			r.unreconciled[id] = true // again, once the running one ends
		} else {
			r.reconciling[id] = true
		}
		r.mu.Unlock()
		if busy {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				r.mu.Lock()
				delete(r.reconciling, id)
				r.mu.Unlock()
			}()
			r.reconcile(context.WithoutCancel(ctx), id)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(cmp.Or(r.ReconcileWait, DefaultReconcileWait))
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		r.log.Warn("fleet: a returned node's reconcile goes on in the background", "nodes", ids)
	}
}
