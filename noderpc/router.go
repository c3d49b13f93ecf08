package noderpc

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/fresh"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// DefaultHeartbeatTimeout is how long a node may stay silent before it is
// unhealthy (nodes heartbeat every HeartbeatInterval).
const (
	DefaultHeartbeatTimeout = 5 * time.Second
	HeartbeatInterval       = time.Second
)

// Router is the control plane's api.Node over the fleet: it places each
// sandbox on a node (Start, Claim) and sends every later call for the
// sandbox to that node. Nodes come from the store (joined through Fleet);
// one whose heartbeat is older than HeartbeatTimeout is unhealthy: nothing
// is placed on it and the Waits of its sandboxes return node.ErrLost. When
// it heartbeats again, the sandboxes reported lost meanwhile are re-adopted
// if they still run there within LostGrace (readopt.go), else destroyed
// there.
type Router struct {
	store *store.Store
	ca    *CA
	cert  tls.Certificate
	log   *slog.Logger
	// HeartbeatTimeout (default DefaultHeartbeatTimeout).
	HeartbeatTimeout time.Duration
	// Leading, with control-plane replicas, reports whether this one
	// holds the leader lease: only the leader reconciles a returned node
	// (nil: always; see replicas.go).
	Leading func() bool
	clock   clock // SetClock
	// started is when this router began: for one heartbeat timeout after
	// it, nodes count as healthy whatever their last heartbeat (they
	// could not heartbeat while the control plane was down).
	started time.Time

	mu      sync.Mutex
	members map[string]*member // by node id
	where   map[string]*placement
	// orphans are sandboxes reported lost, by node, to destroy there when
	// it returns.
	orphans map[string]map[string]int
	// warm are the image digests each node has in its cache (as far as
	// this router saw: ensured or started there).
	warm map[string]map[string]bool
	// pooled are the pre-started sandboxes each node has ready, by image
	// digest, as it last said (router_pool.go).
	pooled map[string]map[string]int
	// snapshots, if set, takes snapshots (snapshot.go); kept is where
	// ended sandboxes' writable layers may still be kept.
	snapshots *fleetSnapshots
	kept      map[string]keptLayer
	// placeMu and pending: one placement at a time, until its record
	// exists (replicas.go).
	placeMu sync.Mutex
	hold    placementHold
	// unreconciled are nodes back from unhealthy that the leader has not
	// reconciled yet (replicas.go).
	unreconciled map[string]bool
	// LostGrace is how long after a sandbox is reported lost its node may
	// return and have it re-adopted (readopt.go; 0: never).
	LostGrace time.Duration
	// ReconcileWait bounds how long Refresh waits for returned nodes'
	// reconciles (default DefaultReconcileWait; readopt.go).
	ReconcileWait time.Duration
	readopter     Readopter
	lostFinal     func(ctx context.Context, id string)
	// beforeLeftovers, in tests, runs in a node's reconcile between its
	// live set and its Leftovers call (a create landing in between).
	beforeLeftovers func(nodeID string)
	// reconciling are the nodes whose reconcile runs now (readopt.go);
	// retryAt, when a node whose reconcile did not reach it is tried again.
	reconciling map[string]bool
	retryAt     map[string]time.Time
}

// warmBonus is what having the image counts in placement, in free share:
// a node with the image is preferred until it is this much fuller than
// one without.
const warmBonus = 0.25

type member struct {
	rec     *store.Node
	client  api.Node
	tr      *fresh.Transport // client's (nil for a test's client)
	serial  string           // the node's certificate serial tr was last renewed for
	url     string
	boot    string // the node process's boot id last seen
	healthy bool
	lost    chan struct{} // closed when the node became unhealthy
	removed bool          // set before lost is closed: removed from the fleet (remove.go)
}

// placement is where a sandbox runs and what it takes there.
type placement struct {
	node   string
	slot   int
	cpu    float64
	memory int64 // bytes
	// recorded: its store record was seen live (replicas.go: once it is
	// no longer live there, the placement is dropped).
	recorded bool
}

var _ api.Node = (*Router)(nil)

// SetClock makes now the router's clock (nil: time.Now), also while its
// goroutines read it (tests move it).
func (r *Router) SetClock(now func() time.Time) { r.clock.set(now) }

func (r *Router) now() time.Time { return r.clock.Now() }

// NewRouter returns a Router calling nodes with the control plane's
// certificate cert (from ca).
func NewRouter(st *store.Store, ca *CA, cert tls.Certificate, log *slog.Logger) *Router {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Router{store: st, ca: ca, cert: cert, log: log, started: time.Now(),
		members: map[string]*member{}, where: map[string]*placement{}, orphans: map[string]map[string]int{},
		warm: map[string]map[string]bool{}, pooled: map[string]map[string]int{}, unreconciled: map[string]bool{},
		reconciling: map[string]bool{}, retryAt: map[string]time.Time{}}
}

// dial is how the router reaches a node: over a transport Refresh
// replaces when the node's certificate changes (renewCerts).
func (r *Router) dial(n *store.Node) (api.Node, *fresh.Transport) {
	tr := fresh.New(HTTPClient(r.nodeTLS(n.ID)).Transport.(*http.Transport), nil)
	return NewClient(&http.Client{Transport: tr}, n.URL, r.log.With("node", n.ID)), tr
}

// renewCerts re-makes the connections to m's node when its record names
// another certificate than the one they were made with (a renewal, here or
// at another replica), and again at the superseded one's deadline: a
// connection verified with the superseded certificate (the node had not
// moved yet) is not used past it. Calls running on an old connection
// finish there. r.mu held.
func (r *Router) renewCerts(m *member, rec *store.Node, now time.Time) {
	if m.tr == nil || rec.CertSerial == m.serial {
		return
	}
	first := m.serial == ""
	m.serial = rec.CertSerial
	if !first {
		m.tr.Renew()
		r.log.Info("fleet: node certificate renewed: connections re-made", "node", rec.ID, "serial", rec.CertSerial)
	}
	if rec.SupersededSerial != "" && rec.SupersededUntil.After(now) {
		tr := m.tr
		time.AfterFunc(rec.SupersededUntil.Sub(now)+time.Millisecond, tr.Renew)
	}
}

// Run refreshes the nodes from the store every interval until ctx ends.
func (r *Router) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := r.Refresh(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("fleet: refresh nodes", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Refresh reads the nodes from the store and updates their health.
func (r *Router) Refresh(ctx context.Context) error {
	recs, err := r.store.ListNodes(ctx)
	if err != nil {
		return err
	}
	if err := r.syncPlacements(ctx); err != nil {
		return err
	}
	timeout := cmp.Or(r.HeartbeatTimeout, DefaultHeartbeatTimeout)
	now := r.now()
	var back []string
	r.mu.Lock()
	for _, rec := range recs {
		m := r.members[rec.ID]
		if m == nil || m.url != rec.URL {
			m = &member{url: rec.URL, lost: make(chan struct{}), healthy: true}
			m.client, m.tr = r.dial(rec)
			r.members[rec.ID] = m
		}
		r.renewCerts(m, rec, now)
		m.rec = rec
		healthy := now.Sub(rec.LastHeartbeat) < timeout || now.Sub(r.started) < timeout
		switch {
		case m.healthy && !healthy:
			r.log.Warn("fleet: node unhealthy: its sandboxes are lost", "node", rec.ID, "last_heartbeat", rec.LastHeartbeat)
			close(m.lost)
		case !m.healthy && healthy:
			r.log.Info("fleet: node back", "node", rec.ID)
			m.lost = make(chan struct{})
			r.unreconciled[rec.ID] = true // by the leader (replicas.go)
		}
		m.healthy = healthy
		r.noteBoot(m, rec)
	}
	r.dropRemoved(recs)
	back = r.toReconcile()
	r.mu.Unlock()
	r.reconcileBounded(ctx, back)
	return nil
}

// reconcile cleans a returned node: the sandboxes reported lost meanwhile,
// and any other sandbox there this control plane does not hold live (one
// ended while the node was away and this process restarted, say), with its
// slot from the store.
func (r *Router) reconcile(ctx context.Context, nodeID string) {
	r.mu.Lock()
	orphans := r.orphans[nodeID]
	delete(r.orphans, nodeID)
	m := r.members[nodeID]
	live := map[string]int{}
	for id, p := range r.where {
		if p.node == nodeID {
			live[id] = p.slot
		}
	}
	r.mu.Unlock()
	if orphans == nil {
		orphans = map[string]int{}
	}
	// What still runs there of what was reported lost may be re-adopted
	// (readopt.go): live from here on, not destroyed.
	readopted, rest := r.readopt(ctx, m, nodeID, orphans, live)
	for id, slot := range readopted {
		live[id] = slot
		delete(orphans, id)
	}
	// The node may have restarted meanwhile: its slot allocator learns the
	// slots of the sandboxes live there, and it finishes its teardowns.
	if err := m.client.Restore(ctx, live); err != nil {
		r.log.Warn("fleet: restore a returned node", "node", nodeID, "err", err)
		// Not reached (it was silent at the control plane's start, say,
		// and answers heartbeats again before it was found silent): again
		// at a Refresh a heartbeat timeout later, while it counts as
		// healthy.
		r.mu.Lock()
		r.unreconciled[nodeID] = true
		r.retryAt[nodeID] = r.now().Add(cmp.Or(r.HeartbeatTimeout, DefaultHeartbeatTimeout))
		r.mu.Unlock()
	} else {
		// It answered: what it did not run is lost for good.
		r.mu.Lock()
		final := r.lostFinal
		r.mu.Unlock()
		for _, id := range rest {
			if final != nil {
				final(ctx, id)
			}
		}
	}
	if r.beforeLeftovers != nil {
		r.beforeLeftovers(nodeID)
	}
	left, err := m.client.Leftovers(ctx, live)
	if err != nil {
		r.log.Warn("fleet: leftovers of a returned node", "node", nodeID, "err", err)
	}
	var cands []string
	for _, l := range left {
		kind, id, ok := strings.Cut(l, ":")
		if !ok || (kind != "runc" && kind != "netns") || id == "" {
			continue
		}
		if _, done := orphans[id]; done || slices.Contains(cands, id) {
			continue
		}
		cands = append(cands, id)
	}
	// live is from before: a sandbox placed there since (through this
	// replica or another) is not a leftover.
	for _, id := range r.unplaced(ctx, nodeID, cands) {
		slot := 0 // unknown: the node removes what it finds by id only
		if sb, err := r.store.GetSandbox(ctx, id); err == nil {
			slot = sb.Slot
		}
		orphans[id] = slot
	}
	for id, slot := range orphans {
		if err := m.client.Destroy(ctx, id, slot); err != nil {
			r.log.Warn("fleet: destroy a lost sandbox on its returned node", "node", nodeID, "sandbox", id, "err", err)
			r.mu.Lock()
			if r.orphans[nodeID] == nil {
				r.orphans[nodeID] = map[string]int{}
			}
			r.orphans[nodeID][id] = slot
			r.mu.Unlock()
			continue
		}
		r.log.Info("fleet: destroyed a lost sandbox on its returned node", "node", nodeID, "sandbox", id)
	}
}

// unplaced returns those of ids, found on node nodeID but not among the
// sandboxes live there when its reconcile began, that are still placed
// there by no replica: the leftovers to remove. A create through any
// replica reserves its slot (or claims its sandbox) under the placement
// lock and holds it until its record, naming the node, is in the store;
// under that lock every sandbox a node can have started is either placed
// by this router or recorded live (syncPlacements), so a create that
// landed after the reconcile read its live set is spared. If the store
// cannot be read, nothing is removed now (the next reconcile will).
func (r *Router) unplaced(ctx context.Context, nodeID string, ids []string) []string {
	if len(ids) == 0 {
		return nil
	}
	done := r.lockPlacement()
	defer done("", false)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.syncPlacements(sctx); err != nil {
		r.log.Warn("fleet: leftovers of a returned node kept: placements not read", "node", nodeID, "err", err)
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, id := range ids {
		if p := r.where[id]; p != nil && p.node == nodeID {
			r.log.Info("fleet: not a leftover: placed on the node since its reconcile began", "node", nodeID, "sandbox", id)
			continue
		}
		out = append(out, id)
	}
	return out
}

// NodeOf returns the id of the node sandbox id runs on ("" if unknown).
func (r *Router) NodeOf(id string) string {
	if p := r.placementOf(id); p != nil {
		return p.node
	}
	return ""
}

// placementOf is sandbox id's placement (nil: on no node): this router's,
// or, for one placed by another control-plane replica in the last second
// (before syncPlacements), the one its record names.
func (r *Router) placementOf(id string) *placement {
	r.mu.Lock()
	p := r.where[id]
	r.mu.Unlock()
	if p == nil {
		p = r.placed(id)
	}
	return p
}

// markWarm records that node id has the image digest.
func (r *Router) markWarm(id, digest string) {
	if digest == "" {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.warm[id] == nil {
		r.warm[id] = map[string]bool{}
	}
	r.warm[id][digest] = true
}

// candidates are the nodes a sandbox may go to, best first: healthy and
// ready, with room for req, by the smallest share of cpu, memory and slots
// they have free (spread), plus warmBonus where the image is warm
// (locality), then by id.
func (r *Router) candidates(req node.StartRequest) []*member {
	type cand struct {
		m     *member
		score float64
	}
	used := map[string]*placement{}
	count := map[string]int{}
	for _, p := range r.where {
		u := used[p.node]
		if u == nil {
			u = &placement{}
			used[p.node] = u
		}
		u.cpu += p.cpu
		u.memory += p.memory
		count[p.node]++
	}
	var cs []cand
	for id, m := range r.members {
		if !m.healthy || m.rec.State != store.NodeReady {
			continue
		}
		u := used[id]
		if u == nil {
			u = &placement{}
		}
		freeCPU := m.rec.CPU - u.cpu
		freeMem := m.rec.MemoryMB<<20 - u.memory
		freeSlots := m.rec.Slots - count[id]
		if freeSlots <= 0 || freeCPU < req.CPU || freeMem < req.Memory {
			continue
		}
		score := min(freeCPU/m.rec.CPU, float64(freeMem)/float64(m.rec.MemoryMB<<20), float64(freeSlots)/float64(m.rec.Slots))
		if req.Image != nil && r.warm[id][req.Image.Digest] {
			score += warmBonus
		}
		cs = append(cs, cand{m, score})
	}
	slices.SortFunc(cs, func(a, b cand) int {
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.m.rec.ID, b.m.rec.ID)
	})
	out := make([]*member, len(cs))
	for i, c := range cs {
		out[i] = c.m
	}
	return out
}

func errNoNode(what string) error {
	return fmt.Errorf("%s: no ready node has room: %w", what, errdefs.ErrResourceExhausted)
}

// on returns the node sandbox id is on.
func (r *Router) on(id string) (*member, error) {
	p := r.placementOf(id)
	if p == nil {
		return nil, fmt.Errorf("sandbox %q: on no node of the fleet: %w", id, errdefs.ErrNotFound)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.members[p.node]
	if m == nil || !m.healthy {
		return nil, fmt.Errorf("sandbox %q: node %s: %w", id, p.node, node.ErrLost)
	}
	return m, nil
}

// ReserveSlot places sandbox req.ID: the best candidate node for req
// (see candidates) gives it one of its slots, and the sandbox is on that
// node from here on (Start goes there; Unclaim gives the slot back).
func (r *Router) ReserveSlot(req node.StartRequest) (_ int, err error) {
	// Under the placement lock, held until the sandbox's record exists
	// (Recorded): another replica's placement counts this one.
	done := r.lockPlacement()
	defer func() { done(req.ID, err == nil) }()
	r.mu.Lock()
	cs := r.candidates(req)
	r.mu.Unlock()
	var errs []error
	for _, m := range cs {
		slot, err := m.client.ReserveSlot(req)
		if err != nil {
			// Full or unreachable: the next candidate.
			errs = append(errs, fmt.Errorf("node %s: %w", m.rec.ID, err))
			continue
		}
		r.mu.Lock()
		r.where[req.ID] = &placement{node: m.rec.ID, slot: slot, cpu: req.CPU, memory: req.Memory}
		r.mu.Unlock()
		return slot, nil
	}
	if len(errs) > 0 {
		return 0, fmt.Errorf("sandbox %q: no node gave a slot: %w", req.ID, errors.Join(errs...))
	}
	return 0, errNoNode("sandbox " + req.ID)
}

// EnsureImage ensures the image on the node a sandbox would go to now
// (the node a sandbox lands on ensures it again by reference when it
// starts there).
func (r *Router) EnsureImage(ctx context.Context, ref string, progress func(nodecache.Progress)) (*nodecache.Image, error) {
	r.mu.Lock()
	cs := r.candidates(node.StartRequest{})
	r.mu.Unlock()
	if len(cs) == 0 {
		return nil, errNoNode("image " + ref)
	}
	img, err := cs[0].client.EnsureImage(ctx, ref, progress)
	if err == nil {
		r.markWarm(cs[0].rec.ID, img.Digest)
	}
	return img, err
}

func (r *Router) Start(ctx context.Context, req node.StartRequest) (node.Started, error) {
	r.mu.Lock()
	p := r.where[req.ID] // reserved or claimed: its node
	var m *member
	if p != nil {
		m = r.members[p.node]
	} else if cs := r.candidates(req); len(cs) > 0 {
		m = cs[0]
		p = &placement{node: m.rec.ID, slot: req.Slot, cpu: req.CPU, memory: req.Memory}
		r.where[req.ID] = p
	}
	r.mu.Unlock()
	if m == nil {
		return node.Started{}, errNoNode("sandbox " + req.ID)
	}
	st, err := m.client.Start(ctx, req)
	if err != nil {
		r.forget(req.ID)
		return st, err
	}
	if req.Image != nil {
		r.markWarm(p.node, req.Image.Digest)
	}
	r.log.Info("fleet: placed", "sandbox", req.ID, "node", p.node)
	return st, nil
}

func (r *Router) forget(id string) {
	r.mu.Lock()
	delete(r.where, id)
	r.mu.Unlock()
}

func (r *Router) Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error) {
	m, err := r.on(id)
	if err != nil {
		return sandbox.Exit{}, err
	}
	r.mu.Lock()
	lost := m.lost
	r.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type res struct {
		ex  sandbox.Exit
		err error
	}
	done := make(chan res, 1)
	go func() {
		ex, err := m.client.Wait(ctx, id, pid)
		done <- res{ex, err}
	}()
	for {
		select {
		case x := <-done:
			if x.err != nil && ctx.Err() == nil {
				// The node went away mid-wait: lost if it is unhealthy now,
				// else wait again (a restart of the node's process).
				if r.waitHealth(ctx, m, lost) {
					return sandbox.Exit{}, fmt.Errorf("sandbox %q: node %s %s: %w", id, m.rec.ID, m.gone(), node.ErrLost)
				}
				go func() {
					ex, err := m.client.Wait(ctx, id, pid)
					done <- res{ex, err}
				}()
				continue
			}
			return x.ex, x.err
		case <-lost:
			return sandbox.Exit{}, fmt.Errorf("sandbox %q: node %s %s: %w", id, m.rec.ID, m.gone(), node.ErrLost)
		}
	}
}

// waitHealth waits until the node is found unhealthy (true) or, for twice
// the heartbeat timeout, is not (false: it answered heartbeats meanwhile, so
// the failed call was a restart of its process).
func (r *Router) waitHealth(ctx context.Context, m *member, lost chan struct{}) bool {
	deadline := time.NewTimer(2 * cmp.Or(r.HeartbeatTimeout, DefaultHeartbeatTimeout))
	defer deadline.Stop()
	select {
	case <-lost:
		return true
	case <-ctx.Done():
		return false
	case <-deadline.C:
		return false
	}
}

// Running asks the sandbox's node; for a sandbox placed by a previous
// control-plane process it asks every healthy node and remembers the one
// that runs it.
func (r *Router) Running(ctx context.Context, id string) (int, bool) {
	if m, err := r.on(id); err == nil {
		// Bounded as below: a node silent at the control plane's start
		// counts as healthy for a heartbeat timeout.
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return m.client.Running(cctx, id)
	}
	r.mu.Lock()
	var ms []*member
	for _, m := range r.members {
		if m.healthy {
			ms = append(ms, m)
		}
	}
	r.mu.Unlock()
	for _, m := range ms {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		pid, ok := m.client.Running(cctx, id)
		cancel()
		if ok {
			// What it takes there counts in placement from now on, as for
			// a sandbox placed by this process.
			p := &placement{node: m.rec.ID}
			if sb, err := r.store.GetSandbox(ctx, id); err == nil {
				p.slot, p.cpu, p.memory = sb.Slot, sb.CPU, sb.MemoryMB<<20
			}
			r.mu.Lock()
			if r.where[id] == nil {
				r.where[id] = p
			}
			r.mu.Unlock()
			return pid, true
		}
	}
	return 0, false
}

// RunningOrSilent is Running for a control plane's start: silent is
// set, naming the node, when the sandbox's node does not answer (it may
// still run it: its record is to be ended lost, not exited, so that the
// node's reconcile may re-adopt it; Lose). A sandbox not placed on a node
// is asked as Running does.
func (r *Router) RunningOrSilent(ctx context.Context, id string) (int, bool, error) {
	m, err := r.on(id)
	if errors.Is(err, node.ErrLost) {
		return 0, false, err
	}
	if err != nil {
		pid, ok := r.Running(ctx, id)
		return pid, ok, nil
	}
	rc, ok := m.client.(interface {
		RunningErr(context.Context, string) (int, bool, error)
	})
	if !ok {
		pid, ok := r.Running(ctx, id)
		return pid, ok, nil
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	pid, running, err := rc.RunningErr(cctx, id)
	if err != nil {
		return 0, false, fmt.Errorf("node %s did not answer: %w", m.rec.ID, err)
	}
	return pid, running, nil
}

// Lose forgets the placement of sandbox id, recorded lost by the API
// (its node did not answer at the start: RunningOrSilent): the node's
// reconcile then finds it among the lost records on it (store.LostOn)
// and re-adopts it if it still runs there, or removes it.
func (r *Router) Lose(id string) { r.forget(id) }

// Kill kills the sandbox's processes on its node. On a lost node there is
// nothing to do here: its Wait reports the sandbox lost.
func (r *Router) Kill(ctx context.Context, id string) error {
	m, err := r.on(id)
	if errors.Is(err, node.ErrLost) || errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return m.client.Kill(ctx, id)
}

// orphan records that the sandbox on a lost node is to be destroyed when
// the node returns (reconcile), and forgets its placement. It reports
// whether id was on a lost node.
func (r *Router) orphan(id string, slot int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.where[id]
	if p == nil {
		return false
	}
	if m := r.members[p.node]; m != nil && m.healthy {
		return false
	}
	if r.orphans[p.node] == nil {
		r.orphans[p.node] = map[string]int{}
	}
	r.orphans[p.node][id] = slot
	delete(r.where, id)
	return true
}

// Teardown tears the sandbox down on its node (there in the background);
// on a lost node it is destroyed when the node returns.
func (r *Router) Teardown(id string, slot int, keep node.KeepUpper) (int64, error) {
	m, err := r.on(id)
	if errors.Is(err, node.ErrLost) {
		r.orphan(id, slot)
		return 0, nil
	}
	if errors.Is(err, errdefs.ErrNotFound) {
		return 0, nil // never placed (idempotent, as the agent's)
	}
	if err != nil {
		return 0, err
	}
	kept, err := m.client.Teardown(id, slot, keep)
	if err != nil {
		return 0, err
	}
	r.forget(id)
	if keep.For > 0 {
		r.keptOn(id, m.rec.ID, keep.For) // its layer, for a snapshot (snapshot.go)
	}
	return kept, nil
}

// Destroy destroys the sandbox on its node; on a lost node it is destroyed
// when the node returns.
func (r *Router) Destroy(ctx context.Context, id string, slot int) error {
	m, err := r.on(id)
	if errors.Is(err, node.ErrLost) {
		r.orphan(id, slot)
		return nil
	}
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil // never placed (idempotent, as the agent's)
	}
	if err != nil {
		return err
	}
	if err := m.client.Destroy(ctx, id, slot); err != nil {
		return err
	}
	r.forget(id)
	return nil
}

func (r *Router) Exec(ctx context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (node.Process, error) {
	m, err := r.on(id)
	if err != nil {
		return nil, err
	}
	return m.client.Exec(ctx, id, req, stdout, stderr)
}

func (r *Router) Files(id string) node.Files {
	m, err := r.on(id)
	if err != nil {
		return errFiles{err}
	}
	return m.client.Files(id)
}

// errFiles answers every call with err (a sandbox on no reachable node).
type errFiles struct{ err error }

func (e errFiles) ReadFile(context.Context, string) (io.ReadCloser, error) { return nil, e.err }
func (e errFiles) WriteFile(context.Context, string, fs.FileMode, io.Reader) error {
	return e.err
}
func (e errFiles) ListDir(context.Context, string) ([]procapi.FileInfo, error) { return nil, e.err }
func (e errFiles) Remove(context.Context, string, bool) error                  { return e.err }

func (r *Router) Logs(id string) (io.ReadCloser, error) {
	m, err := r.on(id)
	if err != nil {
		return nil, err
	}
	return m.client.Logs(id)
}

func (r *Router) healthy() []*member {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ms []*member
	for _, m := range r.members {
		if m.healthy {
			ms = append(ms, m)
		}
	}
	slices.SortFunc(ms, func(a, b *member) int { return cmp.Compare(a.rec.ID, b.rec.ID) })
	return ms
}

// Leftovers asks every healthy node (each removes what is not live there).
func (r *Router) Leftovers(ctx context.Context, live map[string]int) ([]string, error) {
	var out []string
	var errs []error
	for _, m := range r.healthy() {
		left, err := m.client.Leftovers(ctx, live)
		if err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", m.rec.ID, err))
			continue
		}
		for _, l := range left {
			out = append(out, m.rec.ID+": "+l)
		}
	}
	return out, errors.Join(errs...)
}

func (r *Router) Adopt(id, imageDigest string) {
	if m, err := r.on(id); err == nil {
		m.client.Adopt(id, imageDigest)
	}
}

func (r *Router) Unclaim(id string) {
	r.Recorded(id) // no record coming: the placement lock passes on
	if m, err := r.on(id); err == nil {
		m.client.Unclaim(id)
	}
	r.forget(id)
}

// Restore restores every healthy node with the live sandboxes placed on it
// (a node's slot allocator must learn only its own sandboxes' slots). The
// control plane's Reconcile has asked Running for each live sandbox before,
// which found its node.
func (r *Router) Restore(ctx context.Context, live map[string]int) error {
	var errs []error
	for _, m := range r.healthy() {
		if err := m.client.Restore(ctx, r.liveOn(m.rec.ID, live)); err != nil {
			errs = append(errs, fmt.Errorf("node %s: %w", m.rec.ID, err))
		}
	}
	return errors.Join(errs...)
}

// liveOn is the part of live placed on node id (all of live placed there
// when live is nil).
func (r *Router) liveOn(id string, live map[string]int) map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for sb, p := range r.where {
		if p.node != id {
			continue
		}
		if live == nil {
			out[sb] = p.slot
		} else if slot, ok := live[sb]; ok {
			out[sb] = slot
		}
	}
	return out
}

func (r *Router) SetPaused(ctx context.Context, id string, paused bool) error {
	m, err := r.on(id)
	if err != nil {
		return err
	}
	return m.client.SetPaused(ctx, id, paused)
}

var _ api.FleetBackend = (*Router)(nil)

// WarmImage ensures ref on nodes (names or ids; none: every healthy node in
// state ready), all at once.
func (r *Router) WarmImage(ctx context.Context, ref string, nodes []string, progress func(node string, p nodecache.Progress)) ([]api.NodeWarm, error) {
	r.mu.Lock()
	var ms []*member
	if len(nodes) == 0 {
		for _, m := range r.members {
			if m.healthy && m.rec.State == store.NodeReady {
				ms = append(ms, m)
			}
		}
	} else {
		seen := map[*member]bool{}
		for _, n := range nodes {
			var found *member
			for _, m := range r.members {
				if m.rec.ID == n || m.rec.Name == n {
					found = m
					break
				}
			}
			if found == nil {
				r.mu.Unlock()
				return nil, fmt.Errorf("node %q: no such node in this fleet: %w", n, errdefs.ErrNotFound)
			}
			if !seen[found] {
				seen[found] = true
				ms = append(ms, found)
			}
		}
	}
	// What is read of each member, under the lock (Refresh replaces recs).
	type target struct {
		m        *member
		id, name string
		healthy  bool
	}
	ts := make([]target, 0, len(ms))
	for _, m := range ms {
		ts = append(ts, target{m: m, id: m.rec.ID, name: m.rec.Name, healthy: m.healthy})
	}
	r.mu.Unlock()
	if len(ts) == 0 {
		return nil, errNoNode("image " + ref)
	}
	slices.SortFunc(ts, func(a, b target) int { return cmp.Or(cmp.Compare(a.name, b.name), cmp.Compare(a.id, b.id)) })
	out := make([]api.NodeWarm, len(ts))
	var mu sync.Mutex // serialises progress
	var wg sync.WaitGroup
	for i, tg := range ts {
		out[i] = api.NodeWarm{ID: tg.id, Name: tg.name}
		if !tg.healthy {
			out[i].Err = fmt.Errorf("node %s is not healthy: %w", tg.name, errdefs.ErrUnavailable)
			continue
		}
		var pf func(nodecache.Progress)
		if progress != nil {
			pf = func(p nodecache.Progress) {
				mu.Lock()
				defer mu.Unlock()
				progress(tg.name, p)
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			img, err := tg.m.client.EnsureImage(ctx, ref, pf)
			if err == nil {
				r.markWarm(tg.id, img.Digest)
			}
			out[i].Image, out[i].Err = img, err
		}()
	}
	wg.Wait()
	return out, nil
}

// Nodes lists the fleet's nodes with their health and sandbox counts.
func (r *Router) Nodes(ctx context.Context) ([]api.NodeStatus, error) {
	recs, err := r.store.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	count := map[string]int{}
	for _, p := range r.where {
		count[p.node]++
	}
	out := make([]api.NodeStatus, 0, len(recs))
	for _, rec := range recs {
		m := r.members[rec.ID]
		out = append(out, api.NodeStatus{Node: *rec, Healthy: m != nil && m.healthy, Sandboxes: count[rec.ID]})
	}
	return out, nil
}

// SetNodeState cordons, drains or readies a node (by id or name); placement
// follows at once.
func (r *Router) SetNodeState(ctx context.Context, id, state string) (api.NodeStatus, error) {
	return r.setNodeState(ctx, id, state, time.Time{})
}

// DrainNode drains a node (by id or name) until deadline, when the
// leading control plane terminates its sandboxes still running
// (api.Server.RunDrains).
func (r *Router) DrainNode(ctx context.Context, id string, deadline time.Time) (api.NodeStatus, error) {
	return r.setNodeState(ctx, id, store.NodeDraining, deadline)
}

// setNodeState sets a node's state and its drain deadline (zero: none).
func (r *Router) setNodeState(ctx context.Context, id, state string, deadline time.Time) (api.NodeStatus, error) {
	rec, err := r.findNode(ctx, id)
	if err != nil {
		return api.NodeStatus{}, err
	}
	if _, err := r.store.UpdateNode(ctx, rec.ID, func(n *store.Node) error {
		n.State, n.DrainDeadline = state, deadline
		return nil
	}); err != nil {
		return api.NodeStatus{}, err
	}
	if err := r.Refresh(ctx); err != nil {
		return api.NodeStatus{}, err
	}
	ns, err := r.Nodes(ctx)
	if err != nil {
		return api.NodeStatus{}, err
	}
	for _, n := range ns {
		if n.ID == rec.ID {
			return n, nil
		}
	}
	return api.NodeStatus{}, fmt.Errorf("node %q: %w", id, errdefs.ErrNotFound)
}
