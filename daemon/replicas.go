package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
)

// Control-plane replicas (issue #17): `chalkd control --shared-dir DIR` on
// PostgreSQL. Every replica serves every request; what they share is the
// database and DIR, which holds what must be one for the fleet: the fleet
// CA (DIR/fleet), the identity signing keys (DIR/identity), the MCP
// credential seal key, the ingress URL key, the registry's storage and
// credentials (DIR/registry, DIR/registry-credentials.json) and uploaded
// blobs (DIR/blobs). The first replica makes what is missing, under the
// start lease (one replica starts at a time). Leader-only work runs under
// the leader lease (a PostgreSQL session advisory lock, store.Lease): the
// sandbox timers and the recording of ends (api), the reconcile of a
// returned node (noderpc.Router), the identity key rotation, the MCP
// audit prune and warming the base images on nodes.

// Lease names and how often a holder checks its lease connection: a
// replica cut off from the database gives leadership up within
// 2×leaseCheck, and the lease passes at once when a replica dies (its
// session ends).
const (
	leaderLease = "control-leader"
	startLease  = "control-start"
	leaseCheck  = time.Second
)

// replicated reports whether this control plane runs as one of several
// replicas (--shared-dir).
func (c *Config) replicated() bool { return c.Fleet != nil && c.Fleet.SharedDir != "" }

// sharedDir is where the key material and the registry's storage are:
// --shared-dir for replicas, else the data dir.
func (c *Config) sharedDir() string {
	if c.replicated() {
		return c.Fleet.SharedDir
	}
	return c.DataDir
}

// checkReplicas refuses replicas on a store other replicas cannot share.
func (c *Config) checkReplicas() error {
	if !c.replicated() {
		return nil
	}
	if !store.IsPostgres(c.Database) {
		return fmt.Errorf("--shared-dir (control-plane replicas) needs the store on PostgreSQL (--database postgres://…): %w", errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(c.Fleet.SharedDir, 0o700); err != nil {
		return fmt.Errorf("--shared-dir: %w", err)
	}
	return nil
}

// leadership is this replica's hold of the leader lease.
type leadership struct{ held atomic.Bool }

// Leading reports whether this replica holds the leader lease now.
func (l *leadership) Leading() bool { return l != nil && l.held.Load() }

// leaderFunc is Leading as a func, nil without replicas (everything leads).
func (d *Daemon) leaderFunc() func() bool {
	if d.leader == nil {
		return nil
	}
	return d.leader.Leading
}

// runLeader takes the leader lease whenever it is free and holds it until
// it is lost or ctx ends.
func (d *Daemon) runLeader(ctx context.Context) {
	lease := d.Store.Lease(leaderLease, leaseCheck)
	for ctx.Err() == nil {
		held, release, err := lease.Acquire(ctx)
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("replicas: leader lease", "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		d.leader.held.Store(true)
		d.log.Info("replicas: leading")
		<-held.Done()
		d.leader.held.Store(false)
		release()
		if ctx.Err() == nil {
			d.log.Warn("replicas: leader lease lost")
		}
	}
}

// takeStartLease holds the start lease (replicas only) until the start
// ends: the key material in the shared dir is made by one replica.
func (d *Daemon) takeStartLease(ctx context.Context) error {
	if !d.cfg.replicated() {
		return nil
	}
	d.leader = &leadership{}
	_, release, err := d.Store.Lease(startLease, leaseCheck).Acquire(ctx)
	if err != nil {
		return fmt.Errorf("start lease: %w", err)
	}
	d.releaseStart = release
	return nil
}

// endStart releases the start lease and starts the replica loops: the
// leader lease and the live sandboxes' sync.
func (d *Daemon) endStart(ctx context.Context) {
	if d.releaseStart != nil {
		d.releaseStart()
		d.releaseStart = nil
	}
	if d.leader == nil {
		return
	}
	go d.runLeader(ctx)
	go d.API.SyncReplicas(ctx, time.Second)
	go d.warmByLeader(ctx, 2*time.Second)
}

// warmByLeader warms the base images on every healthy node the leader
// has not warmed since it took the lease: a node that joined (at any
// replica), and every node after a leader change (cheap: already warm).
func (d *Daemon) warmByLeader(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	warmed := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !d.leader.Leading() {
			clear(warmed)
			continue
		}
		ns, err := d.router.Nodes(ctx)
		if err != nil {
			continue
		}
		for _, n := range ns {
			if n.Healthy && !warmed[n.ID] {
				warmed[n.ID] = true
				go d.warmBase(ctx, n.ID)
			}
		}
	}
}

// newBootID is this node process's boot id (heartbeats carry it: a new one
// tells the control plane the node restarted and must be restored).
func newBootID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// isActive reports whether sandbox id is starting or running, so its
// identity may be used: in this process's live set, or, with replicas,
// by its record (another replica may be starting it, and this one learns
// it at the next sync; a node asks whichever replica it reaches, and a
// token minted on one replica is verified on another). An ended
// sandbox's record is stopped or failed: its tokens are refused as before.
func (d *Daemon) isActive(ctx context.Context, id string) bool {
	if d.live.IsActive(ctx, id) {
		return true
	}
	if !d.cfg.replicated() {
		return false
	}
	sb, err := d.Store.GetSandbox(ctx, id)
	return err == nil && (sb.State == store.StateRunning || sb.State == store.StateCreating)
}
