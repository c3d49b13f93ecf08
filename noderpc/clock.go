package noderpc

import (
	"sync/atomic"
	"time"
)

// clock is the router's and the fleet's clock: time.Now unless set (tests
// move it). It is read by goroutines of their own (a dial's certificate
// check during the TLS handshake, sweepInflight), so setting it while
// they run is atomic, never a data race. The zero value is time.Now.
type clock struct {
	now atomic.Pointer[func() time.Time]
}

// Now is the time by the clock.
func (c *clock) Now() time.Time {
	if f := c.now.Load(); f != nil {
		return (*f)()
	}
	return time.Now()
}

// set makes now the clock (nil: time.Now).
func (c *clock) set(now func() time.Time) {
	if now == nil {
		c.now.Store(nil)
		return
	}
	c.now.Store(&now)
}
