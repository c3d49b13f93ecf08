// Package node is the node agent: it turns a placed sandbox into a running one on
// this machine (image in the node cache, network namespace, runc with our init)
// and gives the control plane exec and file access to it.
//
// The control plane talks to it only through the methods below (see api.Node), so
// moving it behind an RPC for multi-node is a deployment change, not a rewrite.
package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// Config wires an Agent to this node's components.
type Config struct {
	Runtime  *sandbox.Runtime
	Net      *sandboxnet.Manager
	Cache    *nodecache.Cache
	Registry *registry.Registry
	// ResolvConf returns the /etc/resolv.conf a sandbox gets. Default: its
	// gateway (where the DNS proxy answers through sandboxnet's DNAT).
	ResolvConf func(n *sandboxnet.Net) []byte
	// DefaultPids is the pids cgroup limit when a request sets none.
	DefaultPids int64
	// ReservedSlots are network slots at the top of the range kept for
	// others (build containers); sandboxes get the rest.
	ReservedSlots int
	// Pool configures pre-started sandboxes (pool.go); its slots come
	// below the reserved ones.
	Pool PoolConfig
	// SnapshotDir holds snapshot layers while they are pushed (default:
	// the system's temporary directory).
	SnapshotDir string
	// TeardownDir journals the teardowns not finished (teardown.go), so
	// that the next process finishes them (Restore). "": not journalled.
	TeardownDir string
	// MaxTeardowns bounds the teardowns removing containers at once
	// (default 4; their networks are removed after, at most 4 × this many at once).
	MaxTeardowns int
	// TeardownHold, if set, is called by every background teardown between
	// the removal of the container and that of its network; it blocks as
	// long as it wants (tests stop chalkd in the middle of a teardown).
	TeardownHold func(id string)
	Logger       *slog.Logger
}

// Agent runs sandboxes on this node.
type Agent struct {
	cfg Config
	log *slog.Logger
	rt  runtime // cfg.Runtime (a fake in tests)
	net network // cfg.Net (a fake in tests)

	mu    sync.Mutex
	inUse map[string]func() // sandbox id -> release of its image's layers (GC keeps them)

	// freezeMu orders pause/resume against a snapshot's freeze and thaw,
	// so a snapshot never thaws a sandbox a user paused meanwhile.
	freezeMu sync.Mutex

	slots *Slots    // the node's network slots: the one allocator
	pool  *warmPool // nil: no pre-started sandboxes
	td    teardowns // background teardowns (teardown.go)
	inits initConns // pooled connections to inits for execs (initconns.go)

	// starting counts the control plane's Start calls in progress: the
	// pool's refill waits while any runs (a burst of creates gets the CPUs;
	// the pool fills up after it).
	starting atomic.Int32
	// reapHook, in tests, runs in ReapPool between its two reads (the
	// journal and the running pool's members).
	reapHook func()
}

// New returns an Agent.
func New(cfg Config) (*Agent, error) {
	if cfg.Runtime == nil || cfg.Net == nil || cfg.Cache == nil || cfg.Registry == nil {
		return nil, fmt.Errorf("node agent: Runtime, Net, Cache and Registry are required: %w", errdefs.ErrInvalidArgument)
	}
	return newAgent(cfg, runcRuntime{cfg.Runtime}, cfg.Net)
}

// newAgent is New with the runtime and network given (fakes in tests).
func newAgent(cfg Config, rt runtime, net network) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ResolvConf == nil {
		cfg.ResolvConf = func(n *sandboxnet.Net) []byte {
			return []byte("nameserver " + n.HostIP.String() + "\noptions ndots:0\n")
		}
	}
	if cfg.DefaultPids == 0 {
		cfg.DefaultPids = 4096
	}
	if cfg.MaxTeardowns <= 0 {
		cfg.MaxTeardowns = 4
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, rt: rt, net: net, inUse: map[string]func(){}}
	a.td.init(cfg.MaxTeardowns)
	if cfg.TeardownDir != "" {
		if err := os.MkdirAll(cfg.TeardownDir, 0o700); err != nil {
			return nil, err
		}
	}
	// No slot whose network exists (a sandbox's, or a failed teardown's)
	// is handed out.
	slots, err := NewSlots(net.MaxSlot(), max(cfg.Pool.Slots, 0), cfg.ReservedSlots, net.SlotInUse)
	if err != nil {
		return nil, fmt.Errorf("node agent: %w", err)
	}
	a.slots = slots
	if cfg.Pool.Slots > 0 {
		if a.pool, err = newWarmPool(a, cfg.Pool); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Slots is the node's network slot allocator (builds take theirs from it).
func (a *Agent) Slots() *Slots { return a.slots }

// ReserveSlot gives sandbox id a network slot for a cold start (a claimed
// pre-started sandbox comes with its own). It is held until the sandbox's
// teardown ends (Destroy, Teardown), or Unclaim gives it back unused.
// ErrResourceExhausted when the node is full.
// ReserveSlot gives sandbox req.ID a network slot (the rest of req is for
// a fleet's placement, which picks the node by it).
func (a *Agent) ReserveSlot(req StartRequest) (int, error) { return a.slots.Take(SlotSandbox, req.ID) }

// EnsureImage resolves ref through the registry (and its mirrors) and makes the
// image warm in the node cache.
func (a *Agent) EnsureImage(ctx context.Context, ref string, progress func(nodecache.Progress)) (*nodecache.Image, error) {
	if progress != nil {
		progress(nodecache.Progress{Phase: "resolve", Layer: ref})
	}
	r, digest, err := a.cfg.Registry.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	if img, ok := a.cfg.Cache.Lookup(digest.String()); ok {
		if progress != nil {
			progress(nodecache.Progress{Phase: "done"})
		}
		return img, nil
	}
	return a.cfg.Cache.Ensure(ctx, r, progress)
}

// StartRequest is one sandbox to run here.
type StartRequest struct {
	ID         string
	Slot       int
	Image      *nodecache.Image
	Entrypoint []string
	Env        []string // added after the image's env
	Workdir    string   // "" => the image's WORKDIR
	User       string   // "" => the image's USER
	CPU        float64
	Memory     int64 // bytes
	Pids       int64
	DiskMB     int64 // writable-layer quota in MiB; 0 = the runtime's default
	Binds      []sandbox.Bind
	// Identity are the sandbox's identity files on a fleet node (its
	// daemon writes them and adds their bind; the agent ignores them).
	Identity []IdentityFile
	// Prestarted: a pre-started pool member, claimed later (its init
	// readies what the claim's first exec needs at start: sandbox.Spec).
	Prestarted bool
}

// IdentityFile is a file of a sandbox's identity dir: a token file kept
// fresh for Audience when set, else Content written once.
type IdentityFile struct {
	Name, Audience string
	Content        []byte
}

// Started describes a sandbox that is up.
type Started struct {
	Pid int
	Net *sandboxnet.Net
}

// Start starts the sandbox: a claimed pre-started one is activated (see
// Claim), any other is set up and started now. On error nothing is left but
// what Claim's caller recorded.
func (a *Agent) Start(ctx context.Context, req StartRequest) (Started, error) {
	a.dropInit(req.ID) // a new init under this id
	a.starting.Add(1)
	defer func() {
		// Decremented before the kick: a fill that saw this start running
		// has stopped (under the pool's lock) by the time the kick looks.
		if a.starting.Add(-1) == 0 && a.pool != nil {
			a.pool.kick(a.pool.cfg.FillDelay)
		}
	}()
	if a.pool != nil {
		if m := a.pool.claimedMember(req.ID); m != nil {
			defer a.pool.kick(a.pool.cfg.FillDelay)
			// The member's slot is the sandbox's from now on (it holds it
			// under the same id until its teardown ends).
			defer a.pool.unhold(m.id)
			st, err := a.activate(ctx, m, req)
			if err == nil {
				startsPrestarted.Inc()
				return st, nil
			}
			// Dead or broken: start the sandbox afresh in its place (its
			// identity dir, filled by the caller, stays; so does its slot).
			a.log.Warn("pre-started sandbox unusable; starting afresh", "sandbox", req.ID, "err", err)
			if derr := a.destroyMember(context.WithoutCancel(ctx), m, true); derr != nil {
				return Started{}, fmt.Errorf("sandbox %q: pre-started sandbox unusable (%v) and not removable: %w", req.ID, err, derr)
			}
			a.pool.cfg.unjournal(m.id)
		}
	}
	st, err := a.start(ctx, req)
	if err == nil {
		startsCold.Inc()
	}
	return st, err
}

// start sets up the network and starts the sandbox. On error nothing is left.
func (a *Agent) start(ctx context.Context, req StartRequest) (st Started, err error) {
	if req.Image == nil {
		return Started{}, fmt.Errorf("sandbox %q: no image: %w", req.ID, errdefs.ErrInvalidArgument)
	}
	t0 := time.Now()
	pending, err := a.net.Begin(ctx, req.ID, req.Slot)
	tBegun := time.Now()
	if err != nil {
		return Started{}, fmt.Errorf("sandbox %q network: %w", req.ID, err)
	}
	defer func() {
		if err != nil {
			// A network whose configuration failed is removed already.
			if _, werr := pending.Wait(); werr == nil {
				if terr := a.net.Teardown(context.WithoutCancel(ctx), req.ID, req.Slot); terr != nil {
					a.log.Warn("network teardown after failed start", "sandbox", req.ID, "err", terr)
				}
			}
			a.net.Refill()
		}
	}()
	// The container starts while the network's links are configured when
	// nothing of the sandbox's runs before Start returns: under runc,
	// chalk-init without an entrypoint runs nothing until an exec. An
	// entrypoint starts with init, and runsc's network stack takes over
	// the interfaces as they are at its start: both wait for the network.
	early := len(req.Entrypoint) == 0 && !a.rt.NeedsNetworkAtStart()
	n := pending.Net
	if !early {
		if n, err = pending.Wait(); err != nil {
			return Started{}, fmt.Errorf("sandbox %q network: %w", req.ID, err)
		}
	}
	cfg := req.Image.Config.Config
	env := append(append([]string(nil), cfg.Env...), req.Env...)
	workdir := req.Workdir
	if workdir == "" {
		workdir = cfg.WorkingDir
	}
	user := req.User
	if user == "" {
		user = cfg.User
	}
	pids := req.Pids
	if pids == 0 {
		pids = a.cfg.DefaultPids
	}
	a.hold(req.ID, req.Image)
	defer func() {
		if err != nil {
			a.release(req.ID)
		}
	}()
	pid, err := a.rt.Start(ctx, sandbox.Spec{
		ID:         req.ID,
		LowerDirs:  req.Image.LowerDirs(),
		Entrypoint: req.Entrypoint,
		Env:        env,
		Workdir:    workdir,
		User:       user,
		CPU:        req.CPU,
		Memory:     req.Memory,
		Pids:       pids,
		DiskMB:     req.DiskMB,
		Prestarted: req.Prestarted,
		NetnsPath:  n.NetnsPath,
		UserNS:     SandboxUserNS(n),
		ResolvConf: a.cfg.ResolvConf(n),
		Binds:      req.Binds,
	})
	if err != nil {
		return Started{}, err
	}
	tRuntime := time.Now()
	if early {
		if n, err = pending.Wait(); err != nil {
			a.removeStarted(ctx, req.ID, pid)
			return Started{}, fmt.Errorf("sandbox %q network: %w", req.ID, err)
		}
	}
	a.log.Debug("sandbox node start", "sandbox", req.ID, "network_begin", tBegun.Sub(t0), "network_early", early,
		"runtime", tRuntime.Sub(tBegun), "network_wait_after", time.Since(tRuntime))
	return Started{Pid: pid, Net: n}, nil
}

// removeStarted kills and removes the container of a start that failed
// after its init was started, and reaps init (no watcher waits for it yet).
func (a *Agent) removeStarted(ctx context.Context, id string, pid int) {
	ctx = context.WithoutCancel(ctx)
	if err := a.rt.Kill(ctx, id); err != nil {
		a.log.Warn("kill after failed start", "sandbox", id, "err", err)
	}
	if err := a.rt.Destroy(ctx, id); err != nil {
		a.log.Warn("remove after failed start", "sandbox", id, "err", err)
		return // init may still run: waiting for it could hang
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := a.rt.Wait(wctx, id, pid); err != nil {
		a.log.Warn("reap the init of a failed start", "sandbox", id, "pid", pid, "err", err)
	}
}

// SandboxUserNS is the runtime's view of the user namespace sandboxnet made
// with n (nil when the node runs without user namespaces).
func SandboxUserNS(n *sandboxnet.Net) *sandbox.UserNS {
	if n == nil || n.UserNS == nil {
		return nil
	}
	return &sandbox.UserNS{Path: n.UserNS.Path, HostID: n.UserNS.HostID, Size: n.UserNS.Size}
}

// Net returns the network of a sandbox that is (or was) set up in slot.
func (a *Agent) Net(id string, slot int) *sandboxnet.Net { return a.net.Lookup(id, slot) }

// Wait blocks until the sandbox's init exits.
func (a *Agent) Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error) {
	ex, err := a.rt.Wait(ctx, id, pid)
	if err == nil {
		a.dropInit(id) // its init has exited
	}
	return ex, err
}

// Running reports whether the sandbox runs, with its init pid.
func (a *Agent) Running(ctx context.Context, id string) (int, bool) {
	return a.rt.Running(ctx, id)
}

// Kill kills every process of the sandbox now and returns (see
// sandbox.Runtime.Kill): nothing of it runs any more; Wait reports its end.
// Everything else it has stays until Destroy or Teardown.
func (a *Agent) Kill(ctx context.Context, id string) error {
	a.dropInit(id)
	return a.rt.Kill(ctx, id)
}

// Destroy stops the sandbox and removes everything it had on this node,
// then frees its slot. Idempotent.
func (a *Agent) Destroy(ctx context.Context, id string, slot int) error {
	return a.destroy(ctx, id, slot, nil, false, false)
}

// destroy is Destroy; hold (nil: none) runs between the container's
// removal and the network's; keepSlot leaves the slot held; keepUpper
// leaves the writable layer (see sandbox.Runtime.DestroyKeepUpper).
func (a *Agent) destroy(ctx context.Context, id string, slot int, hold func(string), keepSlot, keepUpper bool) error {
	a.dropInit(id)
	var rerr error
	if keepUpper {
		rerr = a.rt.DestroyKeepUpper(ctx, id)
	} else {
		rerr = a.rt.Destroy(ctx, id)
	}
	if hold != nil {
		hold(id)
	}
	err := errors.Join(rerr, a.net.Teardown(ctx, id, slot))
	// The spare network this sandbox used is replaced now, while nothing
	// is being started (see sandboxnet.Manager.Refill).
	a.net.Refill()
	a.release(id)
	// Free only the slot of this sandbox (a slot it never held may be
	// someone else's now). A network teardown that failed leaves the
	// slot busy (SlotInUse) for the allocator.
	if held, ok := a.slots.Of(id); ok && held == slot && !keepSlot {
		a.slots.Release(id)
	}
	return err
}

// Adopt marks the image layers of a sandbox found running at start as in use.
func (a *Agent) Adopt(id, imageDigest string) {
	if img, ok := a.cfg.Cache.Lookup(imageDigest); ok {
		a.hold(id, img)
	}
}

func (a *Agent) hold(id string, img *nodecache.Image) {
	rel := a.cfg.Cache.Acquire(img)
	a.mu.Lock()
	old := a.inUse[id]
	a.inUse[id] = rel
	a.mu.Unlock()
	if old != nil {
		old()
	}
}

func (a *Agent) release(id string) {
	a.mu.Lock()
	rel := a.inUse[id]
	delete(a.inUse, id)
	a.mu.Unlock()
	if rel != nil {
		rel()
	}
}

// CollectGarbage trims the node cache to its size cap, least recently used
// first, never touching layers of running sandboxes.
func (a *Agent) CollectGarbage(ctx context.Context) (int64, error) { return a.cfg.Cache.GC(ctx) }

// Exec starts a process in the sandbox through its init.
func (a *Agent) Exec(ctx context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (Process, error) {
	p, err := a.execInit(id).Exec(ctx, req, stdout, stderr)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return p, nil
}

// Files gives file access to the sandbox.
func (a *Agent) Files(id string) Files { return a.rt.Init(id) }

// Logs opens the sandbox's console log (see consoleLog: the previous part,
// then the current one, followed across rotations).
func (a *Agent) Logs(id string) (io.ReadCloser, error) {
	return openConsoleLog(id, a.rt.LogPath(id))
}

// Leftovers lists runtime and network objects not belonging to live
// sandboxes, once the teardowns under way have ended (or ctx ends).
func (a *Agent) Leftovers(ctx context.Context, live map[string]int) ([]string, error) {
	if err := a.WaitTeardowns(ctx); err != nil {
		return nil, err
	}
	if a.pool != nil {
		all := a.pool.members() // a fresh map (live may be nil)
		maps.Copy(all, live)
		live = all
	}
	ids := map[string]bool{}
	for id := range live {
		ids[id] = true
	}
	a.td.mu.Lock()
	for id := range a.td.kept {
		ids[id] = true // a stopped sandbox's kept writable layer (teardown.go)
	}
	a.td.mu.Unlock()
	rt, err := a.rt.Leftovers(ctx, ids)
	if err != nil {
		return nil, err
	}
	nl, err := a.net.Leftovers(ctx, live)
	if err != nil {
		return nil, err
	}
	return append(rt, nl...), nil
}

// HostResolvConf returns the host's nameservers as a resolv.conf for sandboxes,
// skipping loopback resolvers a sandbox could not reach. Used when no DNS proxy runs.
func HostResolvConf() []byte {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return nil
	}
	var out strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" && !strings.HasPrefix(f[1], "127.") && f[1] != "::1" {
			out.WriteString(line + "\n")
		}
	}
	return []byte(out.String())
}

// SetPaused freezes (paused) or thaws sandbox id's processes: the cgroup
// freezer through runc pause/resume. A frozen sandbox uses no CPU; its memory
// stays where it is.
func (a *Agent) SetPaused(ctx context.Context, id string, paused bool) error {
	a.freezeMu.Lock()
	defer a.freezeMu.Unlock()
	if paused {
		a.dropInit(id) // a frozen init serves nothing until the resume
		return a.cfg.Runtime.Pause(ctx, id)
	}
	return a.cfg.Runtime.Resume(ctx, id)
}

// SnapshotRequest is a sandbox whose filesystem changes become a layer.
type SnapshotRequest struct {
	ID   string
	Slot int
	// ImageRef and ImageDigest name the sandbox's image in the embedded
	// registry (its LocalRef and manifest digest); the layer goes on it.
	ImageRef, ImageDigest string
	// Exclude lists more paths left out of the layer (bind mount
	// destinations); chalkd's own mount points always are.
	Exclude []string
	// Stopped: the sandbox has ended; its writable layer is taken from
	// where its teardown kept it (Teardown with KeepUpper), if it still is.
	Stopped bool
	// Progress (nil: none) is told each phase: "freeze", "layer" (current =
	// the layer's size), "push" (bytes of total).
	Progress func(phase string, current, total int64)
}

// Snapshot freezes the sandbox, writes its writable layer as a reproducible
// layer tar, thaws it (always, even on error; a sandbox paused before stays
// paused), and pushes its image plus that layer to the embedded registry.
func (a *Agent) Snapshot(ctx context.Context, req SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	progress := req.Progress
	if progress == nil {
		progress = func(string, int64, int64) {}
	}
	local, err := a.cfg.Registry.LocalRef(req.ImageRef)
	if err != nil {
		return nil, fmt.Errorf("sandbox %q image: %w", req.ID, err)
	}
	base := local.Context().Digest(req.ImageDigest)
	layer, err := a.snapshotLayer(ctx, req, progress)
	if err != nil {
		return nil, err
	}
	defer os.Remove(layer)
	res, err := imagebuild.PushSnapshot(ctx, a.cfg.Registry, base, layer, func(cur, total int64) { progress("push", cur, total) })
	if err != nil {
		return nil, fmt.Errorf("sandbox %q snapshot: %w", req.ID, err)
	}
	return res, nil
}

// snapshotLayer takes the layer while the sandbox is frozen.
func (a *Agent) snapshotLayer(ctx context.Context, req SnapshotRequest, progress func(string, int64, int64)) (path string, err error) {
	var userns *sandbox.UserNS
	if n := a.cfg.Net.Lookup(req.ID, req.Slot); n != nil {
		userns = SandboxUserNS(n) // (computed from the slot: the same after its teardown)
	}
	take := func() error {
		var err error
		path, err = imagebuild.SnapshotLayer(a.cfg.Runtime.UpperDir(req.ID), userns, req.Exclude, a.cfg.SnapshotDir)
		return err
	}
	if req.Stopped {
		// Nothing runs in it: nothing to freeze.
		err = a.withKept(ctx, req.ID, take)
	} else {
		a.freezeMu.Lock()
		defer a.freezeMu.Unlock()
		if _, ok := a.cfg.Runtime.Running(ctx, req.ID); !ok {
			return "", fmt.Errorf("sandbox %q is not running: %w", req.ID, errdefs.ErrFailedPrecondition)
		}
		progress("freeze", 0, 0)
		err = whileFrozen(ctx, a.cfg.Runtime, req.ID, take)
	}
	if errors.Is(err, errdefs.ErrFailedPrecondition) && req.Stopped {
		return "", err
	}
	if err != nil {
		if path != "" {
			os.Remove(path)
		}
		return "", fmt.Errorf("sandbox %q snapshot: %w", req.ID, err)
	}
	if st, serr := os.Stat(path); serr == nil {
		progress("layer", st.Size(), st.Size())
	}
	return path, nil
}

// freezer is the part of the runtime a snapshot freezes with.
type freezer interface {
	Paused(ctx context.Context, id string) bool
	Pause(ctx context.Context, id string) error
	Resume(ctx context.Context, id string) error
}

var _ freezer = (*sandbox.Runtime)(nil)

// whileFrozen runs fn with sandbox id frozen: it freezes it (unless it is
// paused already, and then leaves it paused) and thaws it afterwards on
// every path, fn's error, panic or a cancelled ctx included. If the freeze
// fails, fn does not run: the tree is read only while nothing can change it.
func whileFrozen(ctx context.Context, f freezer, id string, fn func() error) (err error) {
	if !f.Paused(ctx, id) {
		if err := f.Pause(ctx, id); err != nil {
			return fmt.Errorf("freeze: %w", err)
		}
		defer func() {
			if rerr := f.Resume(context.WithoutCancel(ctx), id); rerr != nil {
				err = errors.Join(err, fmt.Errorf("thaw: %w", rerr))
			}
		}()
	}
	return fn()
}
