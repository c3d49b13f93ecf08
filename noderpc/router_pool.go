package noderpc

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
)

// Pre-started sandboxes in the fleet. Every node keeps its own pool
// (node.Agent: recently used images, and the counts set with
// SetPrestarted); the router learns what each node has ready from the
// nodes' answers (SetPrestarted's progress, and each Claim's answer, which
// says how many of the image are still ready there) and asks the nodes
// holding one first. A node it believes empty is still asked, after them:
// the hint orders, it never decides, and each ask counts as a use of the
// image there (the node pre-starts it from then on).

// poolClaimer is a node whose claim answer says how many pre-started
// sandboxes of the image it still has ready (Client).
type poolClaimer interface {
	ClaimPooled(req node.StartRequest) (id string, slot, ready int, ok bool)
}

var _ poolClaimer = (*Client)(nil)

// claimID is the form of every sandbox id (api.NewSandboxID): what a node
// answers a claim with is checked against it.
var claimID = regexp.MustCompile(`^sb-[0-9a-f]{16}$`)

// setPooled records that node id has n pre-started sandboxes of digest ready.
func (r *Router) setPooled(id, digest string, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pooled[id] == nil {
		r.pooled[id] = map[string]int{}
	}
	if n > 0 {
		r.pooled[id][digest] = n
	} else {
		delete(r.pooled[id], digest)
	}
}

// claimOrder is candidates(req) with the nodes holding a ready pre-started
// sandbox of req's image first (each part in candidates' order); r.mu held.
func (r *Router) claimOrder(req node.StartRequest) []*member {
	cs := r.candidates(req)
	if req.Image == nil {
		return cs
	}
	slices.SortStableFunc(cs, func(a, b *member) int {
		ha, hb := r.pooled[a.rec.ID][req.Image.Digest] > 0, r.pooled[b.rec.ID][req.Image.Digest] > 0
		switch {
		case ha && !hb:
			return -1
		case hb && !ha:
			return 1
		}
		return 0
	})
	return cs
}

// Claim takes a pre-started sandbox of req's image from a node that has
// one ready, best first (claimOrder). The id a node answers with is the
// sandbox's from here on, so it is checked: a sandbox id in form, on no
// node yet (a node answering with another sandbox's id would take over its
// placement: its calls, its identity tokens).
//
// Under the placement lock, as ReserveSlot: a claim takes cpu, memory and a
// slot on its node too, and another replica's placements count.
func (r *Router) Claim(req node.StartRequest) (claimed string, _ int, ok bool) {
	done := r.lockPlacement()
	defer func() { done(claimed, ok) }()
	r.mu.Lock()
	cs := r.claimOrder(req)
	r.mu.Unlock()
	for _, m := range cs {
		var id string
		var slot, ready int
		var ok bool
		if pc, isPC := m.client.(poolClaimer); isPC {
			id, slot, ready, ok = pc.ClaimPooled(req)
		} else {
			id, slot, ok = m.client.Claim(req)
		}
		if req.Image != nil {
			r.setPooled(m.rec.ID, req.Image.Digest, ready)
		}
		if !ok {
			continue
		}
		if !claimID.MatchString(id) || slot <= 0 {
			r.log.Warn("fleet: a node answered a claim with a malformed sandbox id or slot: ignored", "node", m.rec.ID, "sandbox", id, "slot", slot)
			continue
		}
		r.mu.Lock()
		taken := r.where[id] != nil
		if !taken {
			r.where[id] = &placement{node: m.rec.ID, slot: slot, cpu: req.CPU, memory: req.Memory}
		}
		r.mu.Unlock()
		if taken {
			r.log.Warn("fleet: a node answered a claim with the id of a sandbox already placed: ignored", "node", m.rec.ID, "sandbox", id)
			continue
		}
		r.log.Info("fleet: claimed a pre-started sandbox", "sandbox", id, "node", m.rec.ID)
		return id, slot, true
	}
	return "", 0, false
}

// SetPrestarted sets the pool of every healthy node (progress sums them).
func (r *Router) SetPrestarted(ctx context.Context, img *nodecache.Image, n int, progress func(ready, want int)) error {
	ms := r.healthy()
	var mu sync.Mutex
	ready := make([]int, len(ms))
	var errs []error
	for i, m := range ms {
		err := m.client.SetPrestarted(ctx, img, n, func(rd, _ int) {
			mu.Lock()
			ready[i] = rd
			sum := 0
			for _, v := range ready {
				sum += v
			}
			mu.Unlock()
			if progress != nil {
				progress(sum, n*len(ms))
			}
		})
		mu.Lock()
		rd := ready[i]
		mu.Unlock()
		r.setPooled(m.rec.ID, img.Digest, rd)
		if err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", m.rec.ID, err))
		}
	}
	return errors.Join(errs...)
}

// SetNodePrestarted sets the pool of image img on node id alone (a node
// that just joined gets the control plane's --prestart count of the base
// image).
func (r *Router) SetNodePrestarted(ctx context.Context, id string, img *nodecache.Image, n int) error {
	r.mu.Lock()
	m := r.members[id]
	r.mu.Unlock()
	if m == nil {
		return fmt.Errorf("node %q: not in this fleet: %w", id, errdefs.ErrNotFound)
	}
	rd := 0
	err := m.client.SetPrestarted(ctx, img, n, func(ready, _ int) { rd = ready })
	r.setPooled(id, img.Digest, rd)
	return err
}
