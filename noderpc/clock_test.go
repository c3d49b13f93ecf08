package noderpc

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a clock tests move. The router and the fleet read their
// clock in goroutines of their own (a dial's certificate check during the
// TLS handshake, sweepInflight): install it once, before they run
// (useFakeClock), and move it with Add or Set, never by swapping the
// clock function mid-test.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock(at time.Time) *fakeClock {
	c := &fakeClock{}
	c.Set(at)
	return c
}

// Now is the clock's time.
func (c *fakeClock) Now() time.Time { return time.Unix(0, c.ns.Load()) }

// Add moves the clock by d.
func (c *fakeClock) Add(d time.Duration) { c.ns.Add(int64(d)) }

// Set moves the clock to at.
func (c *fakeClock) Set(at time.Time) { c.ns.Store(at.UnixNano()) }

// useFakeClock makes one fake clock, at the time now, the clock of r and
// of f (either may be nil).
func useFakeClock(r *Router, f *Fleet) *fakeClock {
	c := newFakeClock(time.Now())
	if r != nil {
		r.SetClock(c.Now)
	}
	if f != nil {
		f.SetClock(c.Now)
	}
	return c
}

// TestClockSetWhileRead: the router's and the fleet's clocks may be set
// while their goroutines read them (a data race -race catches otherwise),
// and read what was set last; nil is time.Now again.
func TestClockSetWhileRead(t *testing.T) {
	r := &Router{}
	f := &Fleet{}
	past := time.Unix(1_000_000, 0)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					_, _ = r.now(), f.now()
				}
			}
		}()
	}
	for range 100 {
		r.SetClock(func() time.Time { return past })
		f.SetClock(func() time.Time { return past })
		r.SetClock(nil)
		f.SetClock(nil)
	}
	close(stop)
	wg.Wait()
	r.SetClock(func() time.Time { return past })
	f.SetClock(func() time.Time { return past })
	if !r.now().Equal(past) || !f.now().Equal(past) {
		t.Fatalf("set clocks read %v, %v, want %v", r.now(), f.now(), past)
	}
	r.SetClock(nil)
	f.SetClock(nil)
	if time.Since(r.now()) > time.Hour || time.Since(f.now()) > time.Hour {
		t.Fatal("a clock set to nil is not time.Now")
	}
}
