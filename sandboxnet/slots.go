package sandboxnet

import (
	"fmt"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// A node's network slots 1..MaxSlot are split in three ranges, top down
// (SplitSlots): build containers at the top, pre-started sandboxes below
// them, and below those the sandboxes started cold. The node's one
// allocator (node.Slots) hands them all out.

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
