package sandboxnet

import (
	"errors"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestSplitSlots(t *testing.T) {
	for _, tc := range []struct {
		max, pool, builds int
		want              SlotPlan
		err               bool
	}{
		{1020, 16, 64, SlotPlan{Sandboxes: 940, PoolLo: 941, PoolHi: 956, BuildLo: 957, Max: 1020}, false},
		{100, 0, 64, SlotPlan{Sandboxes: 36, PoolLo: 37, PoolHi: 36, BuildLo: 37, Max: 100}, false},
		{80, 16, 64, SlotPlan{}, true}, // nothing left for sandboxes
		{100, -1, 64, SlotPlan{}, true},
	} {
		got, err := SplitSlots(tc.max, tc.pool, tc.builds)
		if tc.err {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("SplitSlots(%d, %d, %d): %v, want invalid argument", tc.max, tc.pool, tc.builds, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("SplitSlots(%d, %d, %d) = %+v, %v; want %+v", tc.max, tc.pool, tc.builds, got, err, tc.want)
		}
	}
}
