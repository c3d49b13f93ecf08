// Package periodic runs a control plane's leader-only background work on a
// ticker (the ingress prune, drain deadlines, tunnel repair).
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
