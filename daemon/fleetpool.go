package daemon

import (
	"context"
	"fmt"

	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
)

// Pre-started sandboxes in fleet mode. Each `chalkd node` keeps its own
// pool as an all-in-one chalkd does (--prestart sandboxes of each of its
// recently used images, and the counts `chalk compute image warm
// --sandboxes N` sets on every node), claimed by the control plane's
// router, which asks the nodes holding one of the image first
// (noderpc/router_pool.go). `chalkd control --prestart N` has every node
// keep N of the base image, set when it joins.

// nodePool adapts the pool of a node: node sandboxes get no identity files
// (their tokens come from the node's metadata service), so neither do the
// members.
func nodePool(pool *node.PoolConfig) {
	pool.Binds, pool.Discard = nil, nil
}

// startNodePool removes the pre-started sandboxes a previous process of
// this node left (none of them became a sandbox: a member is journalled
// only until it is activated), then brings back the counts set with
// SetPrestarted.
func (d *Daemon) startNodePool(ctx context.Context) error {
	if err := d.Agent.ReapPool(ctx, nil); err != nil {
		d.log.Warn("pre-started sandboxes of the previous run", "err", err)
	}
	if err := d.Agent.RestorePool(); err != nil {
		d.log.Warn("pre-started sandboxes: counts of the previous run", "err", err)
	}
	return nil
}

// prestartBase has node id keep the control plane's --prestart count of
// the base image img.
func (d *Daemon) prestartBase(ctx context.Context, id string, img *nodecache.Image) {
	n := d.cfg.Fleet.Prestart
	if err := d.router.SetNodePrestarted(ctx, id, img, n); err != nil {
		d.log.Warn("fleet: pre-start base image sandboxes", "node", id, "image", img.Ref, "n", n, "err", fmt.Sprint(err))
		return
	}
	d.log.Info("fleet: base image sandboxes pre-started", "node", id, "image", img.Ref, "n", n)
}
