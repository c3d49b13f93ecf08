package sandboxnet

import (
	"errors"
	"fmt"
	"sync"
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

func TestSlotRange(t *testing.T) {
	busy := map[int]bool{11: true}
	var mu sync.Mutex
	r := NewSlotRange(10, 14, func(s int) bool { mu.Lock(); defer mu.Unlock(); return busy[s] })
	if r.Size() != 5 || NewSlotRange(5, 4, nil).Size() != 0 {
		t.Fatal("Size")
	}
	// Lowest first, skipping busy slots.
	if s, ok := r.Take("a"); !ok || s != 10 {
		t.Fatalf("first take %d %v", s, ok)
	}
	if s, ok := r.Take("b"); !ok || s != 12 {
		t.Fatalf("second take %d %v, want 12 (11 is busy)", s, ok)
	}
	r.Release(10)
	if s, _ := r.Take("c"); s != 10 {
		t.Fatalf("a released slot is not reused first: %d", s)
	}
	if got := r.Held(); len(got) != 2 || got["b"] != 12 || got["c"] != 10 {
		t.Fatalf("held %v", got)
	}
	// Concurrent takes never share a slot, and stop at the range's end.
	var wg sync.WaitGroup
	var tmu sync.Mutex
	taken := map[int]string{}
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if s, ok := r.Take(fmt.Sprint("x", i)); ok {
				tmu.Lock()
				defer tmu.Unlock()
				if o, dup := taken[s]; dup {
					t.Errorf("slot %d given to %s and x%d", s, o, i)
				}
				taken[s] = fmt.Sprint("x", i)
			}
		}()
	}
	wg.Wait()
	if len(taken) != 2 || r.Free() {
		t.Fatalf("took %v; free left: %v (want 13 and 14, none left)", taken, r.Free())
	}
	mu.Lock()
	busy[11] = false
	mu.Unlock()
	if !r.Free() {
		t.Fatal("a slot no longer busy is not free")
	}
}
