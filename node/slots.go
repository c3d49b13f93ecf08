package node

import (
	"fmt"
	"maps"
	"sync"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// A network slot is a node-local resource (its /30, its veth pair, the
// egress rules keyed by its interface, its uid range): the node hands them
// out, from one allocator, and the control plane only records the slot a
// sandbox got. Every node of a fleet has its own subnet, so slots are never
// chosen centrally.
//
// The slots 1..MaxSlot are split in three ranges, top down
// (sandboxnet.SplitSlots): build containers at the top, pre-started sandboxes
// below them, and below those the sandboxes started cold. A slot is held by
// its owner (a sandbox or build id) from Take until Release, which comes
// only once everything keyed by the slot is gone: the sandbox's network,
// and before that, the control plane's hold on it (its egress rules are
// removed when its end is recorded, before its teardown starts). A slot
// whose network still exists (a failed teardown's) is never handed out
// either. After a restart the allocator is seeded with the slots of the live
// sandboxes and of the teardowns still to finish (Agent.Restore).

// SlotKind is the range a slot is taken from.
type SlotKind int

const (
	SlotSandbox SlotKind = iota // sandboxes started cold
	SlotPool                    // pre-started sandboxes (and the sandboxes they become)
	SlotBuild                   // build containers
)

func (k SlotKind) String() string {
	switch k {
	case SlotSandbox:
		return "sandbox"
	case SlotPool:
		return "pre-start"
	case SlotBuild:
		return "build"
	}
	return fmt.Sprintf("SlotKind(%d)", int(k))
}

// Slots is a node's network slot allocator. Safe for concurrent use. busy
// is called without its lock held (a netlink round trip, which a burst's
// creates queued behind one by one when Take called it under the lock:
// issue #18 round 6); it must not call back into it.
type Slots struct {
	plan sandboxnet.SlotPlan
	busy func(slot int) bool

	mu    sync.Mutex
	owner map[int]string // slot -> owner
	slot  map[string]int // owner -> slot
}

// NewSlots splits max slots (SplitSlots: builds at the top, then pool, the
// rest for sandboxes started cold) and hands them out. busy (nil: none)
// reports slots whose network still exists.
func NewSlots(max, pool, builds int, busy func(slot int) bool) (*Slots, error) {
	plan, err := sandboxnet.SplitSlots(max, pool, builds)
	if err != nil {
		return nil, err
	}
	return &Slots{plan: plan, busy: busy, owner: map[int]string{}, slot: map[string]int{}}, nil
}

// Range is the first and last slot of kind (lo > hi: empty).
func (s *Slots) Range(k SlotKind) (lo, hi int) {
	switch k {
	case SlotSandbox:
		return 1, s.plan.Sandboxes
	case SlotPool:
		return s.plan.PoolLo, s.plan.PoolHi
	case SlotBuild:
		return s.plan.BuildLo, s.plan.Max
	}
	return 1, 0
}

// Size is how many slots kind has.
func (s *Slots) Size(k SlotKind) int {
	lo, hi := s.Range(k)
	return max(hi-lo+1, 0)
}

// Take gives owner the lowest free slot of kind. An owner holds one slot:
// taking again returns the one it holds (an owner's calls must not
// overlap: the slot under check is already its own). ErrResourceExhausted
// when none is free.
func (s *Slots) Take(k SlotKind, owner string) (int, error) {
	if owner == "" {
		return 0, fmt.Errorf("network slot: no owner: %w", errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	if slot, ok := s.slot[owner]; ok {
		s.mu.Unlock()
		return slot, nil
	}
	var skip map[int]bool // slots found busy by this call
	for {
		slot, ok := s.unheldLocked(k, skip)
		if !ok {
			s.mu.Unlock()
			return 0, fmt.Errorf("node is full: all %d %s network slots are in use: %w", s.Size(k), k, errdefs.ErrResourceExhausted)
		}
		// Held while its network is looked for, outside the lock: no
		// other Take gets it meanwhile, and a busy one is given back.
		s.owner[slot], s.slot[owner] = owner, slot
		s.mu.Unlock()
		if s.busy == nil || !s.busy(slot) {
			return slot, nil
		}
		s.mu.Lock()
		if s.owner[slot] == owner {
			delete(s.owner, slot)
		}
		if s.slot[owner] == slot {
			delete(s.slot, owner)
		}
		if skip == nil {
			skip = map[int]bool{}
		}
		skip[slot] = true
	}
}

// unheldLocked is the lowest slot of kind that no owner holds, and not in
// skip.
func (s *Slots) unheldLocked(k SlotKind, skip map[int]bool) (int, bool) {
	lo, hi := s.Range(k)
	for slot := lo; slot <= hi; slot++ {
		if _, held := s.owner[slot]; !held && !skip[slot] {
			return slot, true
		}
	}
	return 0, false
}

// Free reports whether Take(k, ...) would find a slot now.
func (s *Slots) Free(k SlotKind) bool {
	var skip map[int]bool
	for {
		s.mu.Lock()
		slot, ok := s.unheldLocked(k, skip)
		s.mu.Unlock()
		if !ok {
			return false
		}
		if s.busy == nil || !s.busy(slot) {
			return true
		}
		if skip == nil {
			skip = map[int]bool{}
		}
		skip[slot] = true
	}
}

// Hold records that owner holds slot (a live sandbox found at a restart, a
// teardown to finish). Holding what one holds already is a no-op; a slot
// another owner holds, or one outside 1..max, is refused.
func (s *Slots) Hold(owner string, slot int) error {
	if owner == "" || slot < 1 || slot > s.plan.Max {
		return fmt.Errorf("network slot %d of %q: out of range 1..%d: %w", slot, owner, s.plan.Max, errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if o, held := s.owner[slot]; held && o != owner {
		return fmt.Errorf("network slot %d of %q: held by %q: %w", slot, owner, o, errdefs.ErrAlreadyExists)
	}
	if cur, ok := s.slot[owner]; ok && cur != slot {
		return fmt.Errorf("network slot %d of %q: it holds slot %d: %w", slot, owner, cur, errdefs.ErrAlreadyExists)
	}
	s.owner[slot], s.slot[owner] = owner, slot
	return nil
}

// Release frees owner's slot (a no-op if it holds none).
func (s *Slots) Release(owner string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slot, ok := s.slot[owner]; ok {
		delete(s.slot, owner)
		delete(s.owner, slot)
	}
}

// Of returns the slot owner holds.
func (s *Slots) Of(owner string) (int, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot, ok := s.slot[owner]
	return slot, ok
}

// Held returns every owner with its slot.
func (s *Slots) Held() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.slot)
}
