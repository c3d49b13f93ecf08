package sandboxnet

import (
	"fmt"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// A node's network slots 1..MaxSlot are split in three ranges, top down
// (SplitSlots): build containers at the top, pre-started sandboxes below
// them, and below those the sandboxes the control plane places (their slot
// is chosen by the store, which keeps it across restarts). The first two
// are handed out in memory by a SlotRange each.

// SlotPlan is how a node's slots are split.
type SlotPlan struct {
	Sandboxes int // 1..Sandboxes: placed by the control plane
	PoolLo    int // PoolLo..PoolHi: pre-started sandboxes (empty when PoolLo > PoolHi)
	PoolHi    int
	BuildLo   int // BuildLo..Max: build containers
	Max       int
}

// SplitSlots splits max slots: builds at the top, then pool, then the rest
// for sandboxes (at least one).
func SplitSlots(max, pool, builds int) (SlotPlan, error) {
	p := SlotPlan{Max: max, BuildLo: max - builds + 1, PoolHi: max - builds, PoolLo: max - builds - pool + 1}
	p.Sandboxes = p.PoolLo - 1
	if pool < 0 || builds < 0 || p.Sandboxes < 1 {
		return SlotPlan{}, fmt.Errorf("network slots: %d pre-start and %d build slots do not fit in %d: %w", pool, builds, max, errdefs.ErrInvalidArgument)
	}
	return p, nil
}

// SlotRange hands out the slots lo..hi to owners, lowest first, skipping
// those busy reports (a slot whose network still exists, or one the
// control plane still holds). Safe for concurrent use; busy is called with
// the range's lock held and must not call back into it.
type SlotRange struct {
	lo, hi int
	busy   func(slot int) bool

	mu   sync.Mutex
	held map[int]string // slot -> owner
}

// NewSlotRange returns the range lo..hi (empty when lo > hi); busy may be nil.
func NewSlotRange(lo, hi int, busy func(slot int) bool) *SlotRange {
	return &SlotRange{lo: lo, hi: hi, busy: busy, held: map[int]string{}}
}

// Size is how many slots the range has.
func (r *SlotRange) Size() int { return max(r.hi-r.lo+1, 0) }

// Take gives owner the lowest free slot; ok is false when none is free.
func (r *SlotRange) Take(owner string) (slot int, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := r.lo; s <= r.hi; s++ {
		if _, taken := r.held[s]; !taken && (r.busy == nil || !r.busy(s)) {
			r.held[s] = owner
			return s, true
		}
	}
	return 0, false
}

// Free reports whether Take would find a slot now.
func (r *SlotRange) Free() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for s := r.lo; s <= r.hi; s++ {
		if _, taken := r.held[s]; !taken && (r.busy == nil || !r.busy(s)) {
			return true
		}
	}
	return false
}

// Release frees slot (a no-op if it is not held).
func (r *SlotRange) Release(slot int) {
	r.mu.Lock()
	delete(r.held, slot)
	r.mu.Unlock()
}

// Held returns the owners holding slots, with their slots.
func (r *SlotRange) Held() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int, len(r.held))
	for s, o := range r.held {
		out[o] = s
	}
	return out
}
