package node

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestSlotsRanges: the three ranges split the node's slots top down, each
// hands out its own slots lowest first, and a full range is
// ErrResourceExhausted naming it.
func TestSlotsRanges(t *testing.T) {
	s, err := NewSlots(10, 3, 2, nil) // 1..5 sandboxes, 6..8 pool, 9..10 builds
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		k      SlotKind
		lo, hi int
	}{{SlotSandbox, 1, 5}, {SlotPool, 6, 8}, {SlotBuild, 9, 10}} {
		if lo, hi := s.Range(tc.k); lo != tc.lo || hi != tc.hi || s.Size(tc.k) != tc.hi-tc.lo+1 {
			t.Fatalf("%s: %d..%d (size %d), want %d..%d", tc.k, lo, hi, s.Size(tc.k), tc.lo, tc.hi)
		}
		for want := tc.lo; want <= tc.hi; want++ {
			got, err := s.Take(tc.k, fmt.Sprintf("%s-%d", tc.k, want))
			if err != nil || got != want {
				t.Fatalf("%s: took %d (%v), want %d", tc.k, got, err, want)
			}
		}
		if s.Free(tc.k) {
			t.Fatalf("%s: free when full", tc.k)
		}
		_, err := s.Take(tc.k, "one-more")
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), tc.k.String()) {
			t.Fatalf("%s full: %v", tc.k, err)
		}
	}
	if _, err := NewSlots(10, 6, 4, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("no slot left for sandboxes: %v", err)
	}
}

// TestSlotsHoldRelease: an owner holds one slot until it releases it;
// Release frees only the owner's; Hold (restart seeding) refuses a slot
// another owner holds and slots outside the node's range; a slot whose
// network still exists (busy) is skipped.
func TestSlotsHoldRelease(t *testing.T) {
	busy := map[int]bool{2: true}
	var mu sync.Mutex
	s, err := NewSlots(8, 0, 0, func(slot int) bool { mu.Lock(); defer mu.Unlock(); return busy[slot] })
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Hold("live", 1); err != nil {
		t.Fatal(err)
	}
	if err := s.Hold("live", 1); err != nil {
		t.Fatalf("holding again: %v", err)
	}
	for _, tc := range []struct {
		owner string
		slot  int
		want  error
	}{
		{"other", 1, errdefs.ErrAlreadyExists},
		{"live", 3, errdefs.ErrAlreadyExists}, // it holds 1
		{"x", 0, errdefs.ErrInvalidArgument},
		{"x", 9, errdefs.ErrInvalidArgument},
		{"", 4, errdefs.ErrInvalidArgument},
	} {
		if err := s.Hold(tc.owner, tc.slot); !errors.Is(err, tc.want) {
			t.Errorf("Hold(%q, %d): %v, want %v", tc.owner, tc.slot, err, tc.want)
		}
	}
	a, err := s.Take(SlotSandbox, "a")
	if err != nil || a != 3 {
		t.Fatalf("take: %d %v, want 3 (1 held, 2 busy)", a, err)
	}
	if again, _ := s.Take(SlotSandbox, "a"); again != 3 {
		t.Fatalf("taking again gave %d, want the held 3", again)
	}
	s.Release("nobody")
	if slot, ok := s.Of("a"); !ok || slot != 3 {
		t.Fatalf("a: %d %v after another owner's release", slot, ok)
	}
	s.Release("a")
	if _, ok := s.Of("a"); ok {
		t.Fatal("a still holds its slot")
	}
	mu.Lock()
	busy[2] = false
	mu.Unlock()
	if b, _ := s.Take(SlotSandbox, "b"); b != 2 {
		t.Fatalf("after the network is gone: %d, want 2", b)
	}
	if held := s.Held(); len(held) != 2 || held["live"] != 1 || held["b"] != 2 {
		t.Fatalf("held %v", held)
	}
}

// TestSlotsConcurrent: racing takers never share a slot.
func TestSlotsConcurrent(t *testing.T) {
	s, err := NewSlots(64, 0, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	got := make([]int, 100)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], _ = s.Take(SlotSandbox, fmt.Sprint("o", i))
		}()
	}
	wg.Wait()
	seen := map[int]bool{}
	n := 0
	for _, slot := range got {
		if slot == 0 {
			continue
		}
		if seen[slot] {
			t.Fatalf("slot %d handed out twice", slot)
		}
		seen[slot] = true
		n++
	}
	if n != 64 {
		t.Fatalf("%d slots handed out, want all 64", n)
	}
}

// TestSlotsBusyOutsideLock: the busy check (a netlink round trip) runs
// without the allocator's lock, so concurrent creates do not queue behind
// each other's: a Take whose check is slow does not hold up another Take,
// Free, Of or Release; the slot under check is not handed to anyone else;
// a busy slot is skipped and given back.
func TestSlotsBusyOutsideLock(t *testing.T) {
	checking, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	var mu sync.Mutex
	busySlots := map[int]bool{3: true}
	s, err := NewSlots(8, 0, 0, func(slot int) bool {
		if slot == 1 {
			once.Do(func() { close(checking); <-release })
		}
		mu.Lock()
		defer mu.Unlock()
		return busySlots[slot]
	})
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan int, 1)
	go func() {
		slot, err := s.Take(SlotSandbox, "a")
		if err != nil {
			t.Error(err)
		}
		first <- slot
	}()
	<-checking // "a"'s check of slot 1 blocks until the others are done
	if slot, err := s.Take(SlotSandbox, "b"); err != nil || slot != 2 {
		t.Fatalf("Take(b) = %d, %v; want 2 (1 is under check for a)", slot, err)
	}
	if slot, err := s.Take(SlotSandbox, "c"); err != nil || slot != 4 {
		t.Fatalf("Take(c) = %d, %v; want 4 (3 is busy)", slot, err)
	}
	if !s.Free(SlotSandbox) {
		t.Fatal("Free = false with slots 5-8 free")
	}
	s.Release("b")
	if _, ok := s.Of("b"); ok {
		t.Fatal("b still holds a slot after Release")
	}
	close(release)
	if slot := <-first; slot != 1 {
		t.Fatalf("Take(a) = %d, want 1", slot)
	}
	mu.Lock()
	busySlots[2] = true // a failed teardown's network is left on 2
	mu.Unlock()
	if slot, err := s.Take(SlotSandbox, "d"); err != nil || slot != 5 {
		t.Fatalf("Take(d) = %d, %v; want 5 (1, 4 held; 2, 3 busy)", slot, err)
	}
	if got := s.Held(); len(got) != 3 || got["a"] != 1 || got["c"] != 4 || got["d"] != 5 {
		t.Fatalf("Held = %v", got)
	}
}
