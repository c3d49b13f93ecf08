package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// Pre-started sandboxes.
//
// Starting a sandbox is mostly runc: the network comes ready from
// sandboxnet's pool, but the container itself costs a `runc run` (tens of
// milliseconds of fork, namespaces, mounts and cgroups). So the agent keeps a
// few sandboxes of recently used images started ahead, each with the id,
// network slot, hostname and identity dir of the sandbox it will become, and
// its init serving but idle: no user code has ever run in one. A create that
// fits (the image is pooled, default limits) claims one; the agent then
// activates its init with the request's environment, working directory and
// entrypoint (procapi.Client.Activate) and it is a sandbox like any other.
// Everything the control plane binds to the sandbox (record, egress policy,
// identity, timers) is attached at claim, as at any start.
//
// A member is journalled (PoolConfig.Dir/<id>, holding its slot) from before
// it is started until it is activated, so a chalkd that died with members
// removes them at its next start (ReapPool), and members never show as
// leftovers (Leftovers counts them as live). Members take their network slots
// from the pre-start range of the node's allocator (Slots, SlotPool), which
// the sandboxes they become keep until their teardown ends.

// Starts by kind, on /metrics.
var (
	startsPrestarted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "chalk_sandbox_starts_prestarted_total",
		Help: "Sandboxes started by activating a pre-started sandbox.",
	})
	startsCold = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "chalk_sandbox_starts_cold_total",
		Help: "Sandboxes started with a container start (no pre-started sandbox fitted).",
	})
)

func init() { prometheus.MustRegister(startsPrestarted, startsCold) }

// PoolConfig configures an Agent's pre-started sandboxes.
type PoolConfig struct {
	// Size is how many sandboxes are kept pre-started for each recently
	// used image; 0 turns automatic pre-starting off (SetPrestarted still
	// works).
	Size int
	// Images is how many recently used images get Size each; default 4.
	Images int
	// Slots is the size of the network slot range of pre-started sandboxes
	// (and of the sandboxes they become), taken from the top of the range
	// ordinary sandboxes get; 0: no pre-started sandboxes at all.
	Slots int
	// Dir journals the members not yet claimed; required with Slots.
	Dir string
	// NewID returns a fresh sandbox id; required with Slots.
	NewID func() string
	// Binds returns the bind mounts the daemon gives every sandbox with
	// this id and slot (its identity dir), made now; Discard removes them
	// for a member that was never claimed. Both optional.
	Binds   func(id string, slot int) ([]sandbox.Bind, error)
	Discard func(id string)
	// FillDelay is how long a refill waits after a claim, so that it does
	// not compete with the claimed sandbox's first commands; default 50ms.
	FillDelay time.Duration
	// CountsFile keeps the counts set with SetPrestarted across restarts
	// (RestorePool); optional.
	CountsFile string
	// Memory (bytes) and DiskMB are the limits members start with: the
	// node's defaults, so a claim that asks for them changes nothing
	// (others are set at activation). 0: none, the runtime's default quota.
	Memory int64
	DiskMB int64
}

// member is one pre-started sandbox.
type member struct {
	id    string
	slot  int
	pid   int
	net   *sandboxnet.Net
	binds []sandbox.Bind
}

type warmPool struct {
	a     *Agent
	cfg   PoolConfig
	slots *Slots // the node's; members take SlotPool slots

	mu       sync.Mutex
	mine     map[string]int       // member id -> slot, until it is activated or gone
	ready    map[string][]*member // image digest -> members
	claimed  map[string]*member   // sandbox id -> claimed, not yet activated
	starting map[string]int       // image digest -> members being started
	imgs     map[string]*nodecache.Image
	explicit map[string]int       // image digest -> count set by SetPrestarted
	recent   []string             // automatically pooled image digests, most recent last
	failed   map[string]time.Time // image digest -> last failed start (backoff)
	dropping int                  // members taken out and being destroyed (by discard)
	filling  bool
	closed   bool
	changed  chan struct{} // closed and replaced whenever the pool changes
	timer    *time.Timer
}

func newWarmPool(a *Agent, cfg PoolConfig) (*warmPool, error) {
	if cfg.Dir == "" || cfg.NewID == nil {
		return nil, fmt.Errorf("pre-started sandboxes: Dir and NewID are required: %w", errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	if cfg.Images == 0 {
		cfg.Images = 4
	}
	if cfg.FillDelay == 0 {
		cfg.FillDelay = 50 * time.Millisecond
	}
	return &warmPool{
		a: a, cfg: cfg, slots: a.slots, mine: map[string]int{},
		ready: map[string][]*member{}, claimed: map[string]*member{}, starting: map[string]int{},
		imgs: map[string]*nodecache.Image{}, explicit: map[string]int{},
		failed: map[string]time.Time{}, changed: make(chan struct{}),
	}, nil
}

// notify wakes the waiters; p.mu held.
func (p *warmPool) notify() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// target is how many members image digest should have; p.mu held.
func (p *warmPool) target(digest string) int {
	if n, ok := p.explicit[digest]; ok {
		return n
	}
	if slices.Contains(p.recent, digest) {
		return p.cfg.Size
	}
	return 0
}

// trim takes the members above their image's target out of the pool; the
// caller destroys them (discard). p.mu held.
func (p *warmPool) trim() []*member {
	var out []*member
	defer func() { p.dropping += len(out) }()
	for d, ms := range p.ready {
		if t := p.target(d); len(ms) > t {
			out = append(out, ms[t:]...)
			p.ready[d] = ms[:t]
		}
		if len(p.ready[d]) == 0 {
			delete(p.ready, d)
		}
	}
	return out
}

// use records that img was just used by a create, making it (or keeping it)
// one of the automatically pooled images.
func (p *warmPool) use(img *nodecache.Image) {
	p.mu.Lock()
	p.imgs[img.Digest] = img
	var drop []*member
	if _, ok := p.explicit[img.Digest]; !ok && p.cfg.Size > 0 {
		p.recent = append(slices.DeleteFunc(p.recent, func(d string) bool { return d == img.Digest }), img.Digest)
		if len(p.recent) > p.cfg.Images {
			p.recent = p.recent[len(p.recent)-p.cfg.Images:]
		}
		drop = p.trim()
	}
	p.mu.Unlock()
	p.discard(drop)
}

// take hands out a ready member of the image, or nil.
func (p *warmPool) take(digest string) *member {
	p.mu.Lock()
	defer p.mu.Unlock()
	ms := p.ready[digest]
	if len(ms) == 0 || p.closed {
		return nil
	}
	m := ms[len(ms)-1]
	p.ready[digest] = ms[:len(ms)-1]
	p.claimed[m.id] = m
	p.notify()
	return m
}

// claimedMember removes and returns the claimed member with this id. Its
// slot stays held (no member may take it) until unhold: the sandbox may
// still be started afresh there.
func (p *warmPool) claimedMember(id string) *member {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.claimed[id]
	delete(p.claimed, id)
	return m
}

// unhold ends the pool's hold of member id: the sandbox it became (or
// that was started afresh in its place) holds the slot from now on.
func (p *warmPool) unhold(id string) {
	p.mu.Lock()
	delete(p.mine, id)
	p.mu.Unlock()
}

// own records (slot > 0) or forgets a member's slot; p.mu held.
func (p *warmPool) own(id string, slot int) {
	if slot > 0 {
		p.mine[id] = slot
	} else {
		delete(p.mine, id)
	}
}

// kick schedules a fill after delay (0: now) unless one is due or running.
func (p *warmPool) kick(delay time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.filling {
		return
	}
	if p.timer != nil {
		if delay > 0 {
			return // one is due already
		}
		p.timer.Stop()
	}
	p.timer = time.AfterFunc(delay, p.fill)
}

// next picks the image that needs a member most, if a slot is free for it;
// p.mu held. ok is false when nothing is needed or possible.
func (p *warmPool) next() (digest string, ok bool) {
	best := -1
	for d := range p.imgs {
		if t, failed := p.failed[d]; failed && time.Since(t) < time.Minute {
			continue
		}
		if missing := p.target(d) - len(p.ready[d]) - p.starting[d]; missing > best && missing > 0 {
			digest, best = d, missing
		}
	}
	if best <= 0 || !p.slots.Free(SlotPool) {
		return "", false
	}
	return digest, true
}

// fill starts members until every image has its count (one at a time: a
// fill is background work on the node's CPUs), pausing while the control
// plane starts sandboxes (Agent.starting).
func (p *warmPool) fill() {
	p.mu.Lock()
	if p.filling || p.closed {
		p.mu.Unlock()
		return
	}
	p.filling, p.timer = true, nil
	for {
		if p.a.starting.Load() > 0 {
			// Creates are starting sandboxes: they get the CPUs (those
			// beyond the pool start cold). The last one to end kicks the
			// fill again.
			break
		}
		digest, ok := p.next()
		if !ok || p.closed {
			break
		}
		img := p.imgs[digest]
		id := p.cfg.NewID()
		slot, err := p.slots.Take(SlotPool, id)
		if err != nil {
			break
		}
		p.own(id, slot)
		p.starting[digest]++
		p.mu.Unlock()
		m, err := p.start(img, id, slot)
		p.mu.Lock()
		p.starting[digest]--
		if err != nil {
			p.slots.Release(id)
			p.own(id, 0)
			p.failed[digest] = time.Now()
			p.a.log.Warn("pre-starting a sandbox failed; retrying in a minute", "image", digest, "err", err)
			p.notify()
			continue
		}
		delete(p.failed, digest)
		p.ready[digest] = append(p.ready[digest], m)
		p.notify()
		if drop := p.trim(); len(drop) > 0 || p.closed {
			p.mu.Unlock()
			p.discard(drop)
			p.mu.Lock()
		}
	}
	p.filling = false
	p.notify()
	p.mu.Unlock()
}

// start starts one member. On error nothing of it is left.
func (p *warmPool) start(img *nodecache.Image, id string, slot int) (*member, error) {
	journal := filepath.Join(p.cfg.Dir, id)
	if err := os.WriteFile(journal, []byte(strconv.Itoa(slot)), 0o600); err != nil {
		return nil, err
	}
	m := &member{id: id, slot: slot}
	var err error
	if p.cfg.Binds != nil {
		if m.binds, err = p.cfg.Binds(id, slot); err != nil {
			p.cfg.forget(id)
			return nil, err
		}
	}
	st, err := p.a.start(context.Background(), StartRequest{ID: id, Slot: slot, Image: img, Binds: m.binds, Memory: p.cfg.Memory, DiskMB: p.cfg.DiskMB, Prestarted: true})
	if err != nil {
		p.cfg.forget(id)
		return nil, err
	}
	m.pid, m.net = st.Pid, st.Net
	return m, nil
}

// forget removes a member's journal entry and what Binds made.
func (c *PoolConfig) forget(id string) {
	if c.Discard != nil {
		c.Discard(id)
	}
	c.unjournal(id)
}

// unjournal removes a member's journal entry (it became a sandbox, or is gone).
func (c *PoolConfig) unjournal(id string) { _ = os.Remove(filepath.Join(c.Dir, id)) }

// discard destroys members that left the pool unclaimed; whoever took them
// out counted them in p.dropping.
func (p *warmPool) discard(ms []*member) {
	for _, m := range ms {
		if err := p.a.destroyMember(context.Background(), m, false); err != nil {
			p.a.log.Warn("destroy pre-started sandbox", "sandbox", m.id, "err", err)
		}
		p.cfg.forget(m.id)
		p.mu.Lock()
		p.own(m.id, 0)
		p.dropping--
		p.notify()
		p.mu.Unlock()
	}
	if len(ms) > 0 {
		p.kick(0) // a slot came free
	}
}

// destroyMember destroys a member that never became a sandbox and reaps its
// init: chalkd, the subreaper, is its parent once `runc run -d` has
// returned, and nothing else waits for a member (a sandbox's init is reaped
// by the control plane's watcher, which a member never had).
// keepSlot leaves its slot held (a sandbox is started afresh in it).
func (a *Agent) destroyMember(ctx context.Context, m *member, keepSlot bool) error {
	if err := a.destroy(ctx, m.id, m.slot, nil, keepSlot, false); err != nil {
		return err // init may still run: waiting for it could hang
	}
	if m.pid > 0 {
		wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, err := a.rt.Wait(wctx, m.id, m.pid); err != nil {
			a.log.Warn("reap the init of a pre-started sandbox", "sandbox", m.id, "pid", m.pid, "err", err)
		}
	}
	return nil
}

// members lists every member not yet activated (ready, claimed or
// starting) by id with its slot.
func (p *warmPool) members() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.mine)
}

// Claim hands out a pre-started sandbox for req if one fits: req's image is
// pooled, req asks for no pids limit or user of its own and no extra binds,
// and cpu and memory limits only where the runtime can set them on a
// running sandbox (runc). Its limits and disk quota are set at Start. It
// returns the id and slot the sandbox must be recorded with; Start with that id then
// activates it (or, if the pre-started sandbox has died meanwhile, starts
// the sandbox afresh with the same id and slot). Every call for a fitting
// request counts as a use of its image (it becomes, or stays, pooled).
func (a *Agent) Claim(req StartRequest) (id string, slot int, ok bool) {
	p := a.pool
	if p == nil || req.Image == nil {
		return "", 0, false
	}
	limits := req.CPU != 0 || (req.Memory != 0 && req.Memory != p.cfg.Memory)
	if (limits && !a.rt.CanUpdate()) || req.Pids != 0 || req.User != "" || len(req.Binds) > 0 {
		return "", 0, false // no use pre-starting for such requests
	}
	p.use(req.Image)
	defer p.kick(p.cfg.FillDelay)
	m := p.take(req.Image.Digest)
	if m == nil {
		return "", 0, false
	}
	return m.id, m.slot, true
}

// Prestarted is how many pre-started sandboxes of the image (by digest)
// are ready to be claimed now.
func (a *Agent) Prestarted(digest string) int {
	p := a.pool
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready[digest])
}

// Unclaim gives back what Claim or ReserveSlot gave to a create that
// failed before its sandbox started: a claimed pre-started sandbox is
// destroyed, never put back, since its id may have been seen; a reserved
// slot is freed. A no-op for a sandbox that started (or whose start
// failed after creating anything: its Destroy frees the slot).
func (a *Agent) Unclaim(id string) {
	if a.pool != nil {
		if m := a.pool.claimedMember(id); m != nil {
			a.pool.mu.Lock()
			a.pool.dropping++
			a.pool.mu.Unlock()
			a.pool.discard([]*member{m})
			return
		}
	}
	a.mu.Lock()
	_, started := a.inUse[id]
	a.mu.Unlock()
	if !started && !a.TearingDown(id) {
		a.slots.Release(id)
	}
}

// activate turns a claimed member into the sandbox req describes.
func (a *Agent) activate(ctx context.Context, m *member, req StartRequest) (Started, error) {
	if req.Slot != m.slot {
		return Started{}, fmt.Errorf("pre-started sandbox %s has slot %d, not %d", m.id, m.slot, req.Slot)
	}
	for _, b := range req.Binds {
		if !slices.Contains(m.binds, b) {
			return Started{}, fmt.Errorf("pre-started sandbox %s: bind mount %s is not in place", m.id, b.Dest)
		}
	}
	if req.DiskMB != 0 && req.DiskMB != a.pool.cfg.DiskMB {
		if err := a.rt.SetDiskMB(m.id, req.DiskMB); err != nil {
			return Started{}, err
		}
	}
	if req.CPU != 0 || (req.Memory != 0 && req.Memory != a.pool.cfg.Memory) {
		// Before anything of the user's runs in it.
		if err := a.rt.SetLimits(ctx, m.id, req.CPU, req.Memory); err != nil {
			return Started{}, err
		}
	}
	// Through the client the sandbox's execs use: it keeps the
	// activation's connection, so the first exec does not dial.
	err := a.execInit(m.id).Activate(ctx, procapi.Activation{Env: req.Env, Dir: req.Workdir, Entrypoint: req.Entrypoint})
	if err != nil {
		return Started{}, err
	}
	a.pool.cfg.unjournal(m.id)
	return Started{Pid: m.pid, Net: m.net}, nil
}

// SetPrestarted sets how many sandboxes of img are kept pre-started (0:
// none), in place of the automatic count, and waits until exactly that many
// are ready, none is starting and those taken out are gone (or ctx ends). progress, if set, is called as they become ready.
func (a *Agent) SetPrestarted(ctx context.Context, img *nodecache.Image, n int, progress func(ready, want int)) error {
	p := a.pool
	if p == nil {
		return fmt.Errorf("pre-started sandboxes are off on this node (chalkd --prestart-slots -1): %w", errdefs.ErrFailedPrecondition)
	}
	if n < 0 || n > p.slots.Size(SlotPool) {
		return fmt.Errorf("pre-started sandboxes: %d: want 0 to %d (the node's pre-start slots): %w", n, p.slots.Size(SlotPool), errdefs.ErrInvalidArgument)
	}
	p.mu.Lock()
	p.imgs[img.Digest] = img
	p.explicit[img.Digest] = n
	p.recent = slices.DeleteFunc(p.recent, func(d string) bool { return d == img.Digest })
	delete(p.failed, img.Digest)
	drop := p.trim()
	err := p.saveCounts()
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("pre-started sandboxes: keep the count: %w", err)
	}
	p.discard(drop)
	p.kick(0)
	last := -1
	for {
		p.mu.Lock()
		ready, ch, closed := len(p.ready[img.Digest]), p.changed, p.closed
		settling := p.starting[img.Digest] > 0 || p.dropping > 0
		_, failed := p.failed[img.Digest]
		busy := p.filling || p.timer != nil
		p.mu.Unlock()
		if progress != nil && ready != last {
			progress(min(ready, n), n)
			last = ready
		}
		switch {
		case ready >= n && !settling:
			return nil // (one still starting would be taken out again once up)
		case closed:
			return fmt.Errorf("pre-started sandboxes: node shutting down: %w", errdefs.ErrUnavailable)
		case failed:
			return fmt.Errorf("pre-starting sandboxes of %s failed (see chalkd's log): %w", img.Digest, errdefs.ErrFailedPrecondition)
		case !busy && !settling && ready < n:
			return fmt.Errorf("pre-started sandboxes: %d of %d ready and no free pre-start slot: %w", ready, n, errdefs.ErrResourceExhausted)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// saveCounts writes the explicit counts to CountsFile; p.mu held.
func (p *warmPool) saveCounts() error {
	if p.cfg.CountsFile == "" {
		return nil
	}
	b, err := json.Marshal(p.explicit)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(p.cfg.CountsFile, b, 0o600)
}

// RestorePool brings back the counts set with SetPrestarted before a
// restart (for images still in the node cache) and starts filling. Call it
// after ReapPool.
func (a *Agent) RestorePool() error {
	p := a.pool
	if p == nil || p.cfg.CountsFile == "" {
		return nil
	}
	b, err := os.ReadFile(p.cfg.CountsFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var counts map[string]int
	if err := json.Unmarshal(b, &counts); err != nil {
		return fmt.Errorf("pre-start counts %s: %w", p.cfg.CountsFile, err)
	}
	p.mu.Lock()
	for d, n := range counts {
		img, ok := a.cfg.Cache.Lookup(d)
		if !ok || n < 0 {
			continue // the image left the node cache: its count goes with it
		}
		p.imgs[d] = img
		p.explicit[d] = min(n, p.slots.Size(SlotPool))
	}
	err = p.saveCounts()
	p.mu.Unlock()
	p.kick(0)
	return err
}

// ReapPool removes the pre-started sandboxes a previous chalkd left (its
// journal), except those that became the live sandboxes given and the
// members of this process's pool (a fleet node is restored, and reaps,
// while its pool runs). It reaps even with pre-starting now off, whatever
// slots the journal names.
func (a *Agent) ReapPool(ctx context.Context, live map[string]int) error {
	dir := a.cfg.Pool.Dir
	if dir == "" {
		return nil
	}
	// The journal first, then the running pool's members: an entry of this
	// process's member exists only while the member is in the pool (it is
	// journalled after the pool owns it and unjournalled before the pool
	// lets go of it, and ids are never reused), so an entry listed here
	// whose id is not among the members read after is a previous
	// process's, or gone (activated meanwhile: skipped below). Read the
	// other way round, a member started in between was taken for a
	// previous process's and destroyed, whoever had claimed it since.
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if a.reapHook != nil {
		a.reapHook()
	}
	var mine map[string]int
	if a.pool != nil {
		mine = a.pool.members()
	}
	var errs []error
	for _, e := range ents {
		id := e.Name()
		path := filepath.Join(dir, id)
		if _, ok := mine[id]; ok {
			continue
		}
		if _, ok := live[id]; ok {
			_ = os.Remove(path)
			continue
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // a member of this process activated since the listing
		}
		slot, perr := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || perr != nil || slot < 1 || slot > a.net.MaxSlot() {
			// Not ours to guess: the leftover check reports what remains.
			errs = append(errs, fmt.Errorf("pre-start journal %s: %q %v", id, b, err))
			_ = os.Remove(path)
			continue
		}
		if err := a.Destroy(ctx, id, slot); err != nil {
			errs = append(errs, err)
			continue
		}
		a.cfg.Pool.forget(id)
	}
	return errors.Join(errs...)
}

// ClosePool stops pre-starting and destroys the members not claimed.
func (a *Agent) ClosePool() {
	p := a.pool
	if p == nil {
		return
	}
	p.mu.Lock()
	p.closed = true
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	p.notify()
	for p.filling {
		ch := p.changed
		p.mu.Unlock()
		<-ch
		p.mu.Lock()
	}
	var drop []*member
	for _, ms := range p.ready {
		drop = append(drop, ms...)
	}
	p.ready = map[string][]*member{}
	p.dropping += len(drop)
	p.mu.Unlock()
	p.discard(drop)
}
