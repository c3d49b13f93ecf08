package sandboxnet

import (
	"errors"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

// TestFlowForgetterCoalesces: teardowns that ask while a conntrack walk runs
// share the next walk, which covers all their addresses; none returns
// before a walk that started after it asked has ended, and each gets that
// walk's error.
func TestFlowForgetterCoalesces(t *testing.T) {
	first := netip.MustParseAddr("10.213.0.6")
	entered := make(chan struct{})
	release := make(chan struct{})
	var mu sync.Mutex
	var batches []flowsOf
	f := &flowForgetter{gap: -1, do: func(b flowsOf) error {
		mu.Lock()
		batches = append(batches, b)
		n := len(batches)
		mu.Unlock()
		if n == 1 {
			close(entered)
			<-release // the first walk runs while the others ask
			return nil
		}
		return errors.New("walk failed")
	}}
	firstDone := make(chan error, 1)
	go func() { firstDone <- f.forget(first) }()
	<-entered
	const k = 5
	var addrs []netip.Addr
	for i := range k {
		addrs = append(addrs, netip.AddrFrom4([4]byte{10, 213, 0, byte(10 + 4*i)}))
	}
	errs := make(chan error, k)
	for _, a := range addrs {
		go func() { errs <- f.forget(a) }()
	}
	// Every late caller is waiting for the next walk before the first ends.
	for {
		f.mu.Lock()
		n := len(f.waiters)
		f.mu.Unlock()
		if n == k {
			break
		}
		select {
		case err := <-errs:
			t.Fatalf("a call returned (%v) before any walk covering it", err)
		default:
			runtime.Gosched()
		}
	}
	close(release)
	if err := <-firstDone; err != nil {
		t.Fatalf("first: %v", err)
	}
	for range k {
		if err := <-errs; err == nil || err.Error() != "walk failed" {
			t.Errorf("late call: %v, want the second walk's error", err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(batches) != 2 {
		t.Fatalf("%d walks for %d calls, want 2", len(batches), k+1)
	}
	if len(batches[0]) != 1 || !batches[0][first] {
		t.Errorf("first walk %v, want only %v", batches[0], first)
	}
	for _, a := range addrs {
		if !batches[1][a] {
			t.Errorf("second walk %v misses %v", batches[1], a)
		}
	}
	if batches[1][first] {
		t.Errorf("second walk repeats %v", first)
	}
}

// TestFlowForgetterGap: walks start at least the gap apart, even for calls
// that come one after the other; the calls that arrive meanwhile share the
// next walk.
func TestFlowForgetterGap(t *testing.T) {
	const gap = 50 * time.Millisecond
	var mu sync.Mutex
	var starts []time.Time
	var sizes []int
	f := &flowForgetter{gap: gap, do: func(b flowsOf) error {
		mu.Lock()
		starts = append(starts, time.Now())
		sizes = append(sizes, len(b))
		mu.Unlock()
		return nil
	}}
	if err := f.forget(netip.MustParseAddr("10.213.0.6")); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.forget(netip.AddrFrom4([4]byte{10, 213, 0, byte(10 + 4*i)})); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(starts) < 2 {
		t.Fatalf("%d walks", len(starts))
	}
	for i := 1; i < len(starts); i++ {
		if d := starts[i].Sub(starts[i-1]); d < gap {
			t.Errorf("walk %d started %v after the previous, want >= %v", i, d, gap)
		}
	}
	total := 0
	for _, n := range sizes[1:] {
		total += n
	}
	if total != 3 {
		t.Errorf("walks after the first covered %v addresses, want the 3 asked", sizes[1:])
	}
}

// TestWalkGap: walks are at least flowWalkGap apart, further the longer a
// walk took (so that they take a bounded share of a CPU), never more than
// flowWalkMaxGap.
func TestWalkGap(t *testing.T) {
	for _, c := range []struct{ cost, want time.Duration }{
		{0, flowWalkGap},
		{time.Millisecond, flowWalkGap},
		{2 * time.Millisecond, flowWalkGap},
		{5 * time.Millisecond, 250 * time.Millisecond},
		{10 * time.Millisecond, 500 * time.Millisecond},
		{time.Second, flowWalkMaxGap},
	} {
		if got := walkGap(c.cost); got != c.want {
			t.Errorf("walkGap(%v) = %v, want %v", c.cost, got, c.want)
		}
	}
}

// TestFlowForgetterGapFollowsCost: without a fixed gap, the walk after a
// slow walk waits walkGap of the slow walk's duration.
func TestFlowForgetterGapFollowsCost(t *testing.T) {
	const cost = 4 * time.Millisecond // walkGap: 200 ms
	var mu sync.Mutex
	var starts []time.Time
	f := &flowForgetter{do: func(flowsOf) error {
		mu.Lock()
		starts = append(starts, time.Now())
		mu.Unlock()
		time.Sleep(cost) // the walk's own duration, not a synchronisation
		return nil
	}}
	for i := range 2 {
		if err := f.forget(netip.AddrFrom4([4]byte{10, 213, 0, byte(2 + 4*i)})); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(starts) != 2 {
		t.Fatalf("%d walks, want 2", len(starts))
	}
	if d, want := starts[1].Sub(starts[0]), walkGap(cost); d < want {
		t.Errorf("second walk started %v after the first, want >= %v", d, want)
	}
}
