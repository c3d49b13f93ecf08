// Package periodic runs background work on a ticker: a control plane's
// leader-only work (the ingress prune, drain deadlines, tunnel repair) and
// work every process does (leading nil: the node cache's GC, the expiry of
// egress's learned addresses).
package periodic

import (
	"context"
	"time"
)

// WhileLeading calls do every interval until ctx ends, skipping the ticks
// at which leading (nil: always) says this process does not lead. The
// first call is one interval after the start.
func WhileLeading(ctx context.Context, interval time.Duration, leading func() bool, do func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if leading != nil && !leading() {
			continue
		}
		do()
	}
}
