package noderpc

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
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

// The placement lock (store.PlacementLock) is this process's while any
// placement of it is between its reservation and its record: taken by the
// first, released when the last is recorded (or given back). In process,
// placements are serialised by placeMu and count each other in memory.
type placementHold struct {
	release     func() // nil: not held
	outstanding map[string]*time.Timer
	placing     bool
}

// placementWait bounds how long a placement waits for its record: a
// create that never reports back does not hold placement for good.
const placementWait = 30 * time.Second

// lockPlacement serialises this placement with every other (in process,
// then among replicas through the store) and reads the live placements
// under it. done(id, ok) ends it: ok means sandbox id is reserved and
// holds the lock until its record exists (Recorded).
func (r *Router) lockPlacement() (done func(id string, ok bool)) {
	r.placeMu.Lock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r.mu.Lock()
	h := &r.hold
	h.placing = true
	held := h.release != nil
	r.mu.Unlock()
	if !held {
		rel, err := r.store.PlacementLock(ctx)
		if err != nil {
			r.log.Warn("fleet: placement lock (placing on what this replica knows)", "err", err)
			rel = func() {}
		}
		r.mu.Lock()
		h.release = rel
		r.mu.Unlock()
	}
	// What other replicas placed counts: read it from the store now.
	if err := r.syncPlacements(ctx); err != nil {
		r.log.Warn("fleet: placements from the store", "err", err)
	}
	if r.Leading != nil {
		// With replicas, a cordon or drain set at another one holds from
		// the next placement on, not from this one's next refresh.
		r.syncNodeStates(ctx)
	}
	return func(id string, ok bool) {
		r.mu.Lock()
		h.placing = false
		if ok {
			if h.outstanding == nil {
				h.outstanding = map[string]*time.Timer{}
			}
			h.outstanding[id] = time.AfterFunc(placementWait, func() { r.Recorded(id) })
		}
		rel := r.releasable()
		r.mu.Unlock()
		r.placeMu.Unlock()
		if rel != nil {
			rel()
		}
	}
}

// releasable returns the placement lock's release when nothing of this
// process needs it any more (and forgets it). r.mu is held.
func (r *Router) releasable() func() {
	h := &r.hold
	if h.placing || len(h.outstanding) > 0 || h.release == nil {
		return nil
	}
	rel := h.release
	h.release = nil
	return rel
}

// Recorded says that sandbox id's record (naming its node) is in the
// store: once every placement of this process is, the placement lock
// passes to other replicas.
func (r *Router) Recorded(id string) {
	r.mu.Lock()
	if t := r.hold.outstanding[id]; t != nil {
		t.Stop()
		delete(r.hold.outstanding, id)
	}
	rel := r.releasable()
	r.mu.Unlock()
	if rel != nil {
		rel()
	}
}

// toReconcile returns the returned nodes to reconcile now: those still
// healthy, when this router leads (a replica that takes the lease
// reconciles what came back while another led, which may have died
// before it did). r.mu is held.
func (r *Router) toReconcile() []string {
	if !r.leading() {
		return nil
	}
	var back []string
	now := r.now()
	for id := range r.unreconciled {
		m := r.members[id]
		if m != nil && m.healthy && now.Before(r.retryAt[id]) {
			continue // its last reconcile did not reach it: not yet again
		}
		if m != nil && m.healthy {
			back = append(back, id)
		}
		delete(r.unreconciled, id)
		delete(r.retryAt, id)
	}
	slices.Sort(back)
	return back
}

// noteBoot notices a node whose process restarted (a new boot id in its
// heartbeats) while it stayed healthy: it is reconciled as a returned
// node (its allocator learns its live sandboxes' slots, it finishes its
// journalled teardowns). r.mu is held.
func (r *Router) noteBoot(m *member, rec *store.Node) {
	if rec.BootID == "" || rec.BootID == m.boot {
		return
	}
	if m.boot != "" && m.healthy {
		r.log.Info("fleet: node restarted: restoring it", "node", rec.ID)
		r.unreconciled[rec.ID] = true
	}
	m.boot = rec.BootID
}

// Lost reports whether sandbox id is on a node that stopped answering.
func (r *Router) Lost(id string) bool {
	_, err := r.on(id)
	return errors.Is(err, node.ErrLost)
}

// checkBootID refuses a boot id that is not a short token (what a node
// sends is hostile input: it is stored and logged).
func checkBootID(id string) error {
	if len(id) > 64 {
		return fmt.Errorf("heartbeat boot_id: %d bytes, at most 64: %w", len(id), errdefs.ErrInvalidArgument)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("heartbeat boot_id: want [A-Za-z0-9-]: %w", errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// syncNodeStates takes the node records' states (ready, cordoned,
// draining) from the store for the nodes this router knows; health stays
// Refresh's.
func (r *Router) syncNodeStates(ctx context.Context) {
	recs, err := r.store.ListNodes(ctx)
	if err != nil {
		r.log.Warn("fleet: node states from the store", "err", err)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range recs {
		if m := r.members[rec.ID]; m != nil && m.url == rec.URL {
			m.rec = rec
		}
	}
}
