package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// fakeRuntime is a runtime that runs nothing: a started sandbox "runs"
// until destroyed (or killed by the test); its init answers Activate.
type fakeRuntime struct {
	mu         sync.Mutex
	dir        string
	nextPid    int
	running    map[string]*fakeInit // by id
	starts     []sandbox.Spec
	startErr   func(sp sandbox.Spec) error // optional
	canUpdate  bool
	netAtStart bool                  // NeedsNetworkAtStart (runsc)
	limits     map[string][2]float64 // id -> cpu, memory (SetLimits)
	disks      map[string]int64      // id -> MiB (SetDiskMB)
	// procs gives each started sandbox a real init process API: a
	// procapi server in this process on a socket of its own (rootless;
	// processes run as the test's user), ended with the sandbox.
	procs    bool
	dials    atomic.Int32 // connections to the inits of procs
	t        *testing.T
	dead     map[string]bool // killed (Kill), not yet destroyed
	upper    map[string]bool // writable layers kept (DestroyKeepUpper)
	destroys map[string]int  // id -> Destroy calls
}

// fakeInit is a sandbox's init: Activate records what it was told.
type fakeInit struct {
	rt        *fakeRuntime
	id        string
	pid       int
	gone      chan struct{} // closed when the sandbox is destroyed or killed
	activated *procapi.Activation
	client    *procapi.Client // with fakeRuntime.procs: the real process API
	stop      func()          // ends the procapi server (and what it runs)
}

// fakeNet is a network that hands out each slot once: a second Setup of a
// slot in use fails, so a slot given to two sandboxes fails the test.
type fakeNet struct {
	mu      sync.Mutex
	max     int
	inUse   map[int]string // slot -> id
	setups  int
	refills int
	// gate, if set, is called (without the lock) at the start of every
	// Setup: a test holds a start there.
	gate func(id string)
	// configure, if set, is Begin's background part (after the slot is
	// taken): an error fails the network, which then frees the slot.
	configure func(id string) error
}

var (
	_ runtime     = (*fakeRuntime)(nil)
	_ sandboxInit = (*fakeInit)(nil)
	_ network     = (*fakeNet)(nil)
)

func newFakeRuntime(t *testing.T) *fakeRuntime {
	return &fakeRuntime{dir: t.TempDir(), nextPid: 100, running: map[string]*fakeInit{},
		limits: map[string][2]float64{}, disks: map[string]int64{}, canUpdate: true, t: t,
		dead: map[string]bool{}, destroys: map[string]int{}, upper: map[string]bool{}}
}

// serveInit starts a procapi server for a sandbox's init (procs).
func (r *fakeRuntime) serveInit(in *fakeInit) error {
	sock := filepath.Join(r.t.TempDir(), "init.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	opts := procapi.ServerOptions{Activate: func(a procapi.Activation) (func(), error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		if in.activated != nil {
			return nil, errors.New("activated twice")
		}
		in.activated = &a
		return nil, nil
	}}
	go func() { _ = procapi.Serve(ctx, l, opts); close(done) }()
	in.stop = func() { cancel(); <-done }
	in.client = procapi.NewClient(sock, func(ctx context.Context) (net.Conn, error) {
		r.dials.Add(1)
		return procapi.DialSocket(ctx, filepath.Dir(sock), filepath.Base(sock), func(cred *unix.Ucred) error {
			if int(cred.Pid) != os.Getpid() {
				return fmt.Errorf("listener pid %d, want %d", cred.Pid, os.Getpid())
			}
			return nil
		})
	})
	r.t.Cleanup(in.stop)
	return nil
}

func (r *fakeRuntime) Start(_ context.Context, sp sandbox.Spec) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starts = append(r.starts, sp)
	if r.startErr != nil {
		if err := r.startErr(sp); err != nil {
			return 0, err
		}
	}
	if r.running[sp.ID] != nil {
		return 0, fmt.Errorf("container %s: %w", sp.ID, errdefs.ErrAlreadyExists)
	}
	r.nextPid++
	in := &fakeInit{rt: r, id: sp.ID, pid: r.nextPid, gone: make(chan struct{})}
	if r.procs {
		if err := r.serveInit(in); err != nil {
			return 0, err
		}
	}
	r.running[sp.ID] = in
	return r.nextPid, nil
}

// kill ends a sandbox behind the agent's back (its init died).
func (r *fakeRuntime) kill(id string) {
	r.mu.Lock()
	in := r.running[id]
	if in != nil {
		close(in.gone)
		delete(r.running, id)
	}
	r.mu.Unlock()
	if in != nil && in.stop != nil {
		in.stop() // its processes end with it
	}
}

func (r *fakeRuntime) Wait(ctx context.Context, id string, _ int) (sandbox.Exit, error) {
	r.mu.Lock()
	in, dead := r.running[id], r.dead[id]
	r.mu.Unlock()
	if dead {
		return sandbox.Exit{Code: 137, Signal: "SIGKILL", Known: true}, nil // killed, not yet destroyed
	}
	if in == nil {
		return sandbox.Exit{Known: true}, nil
	}
	select {
	case <-in.gone:
		return sandbox.Exit{Code: 137, Signal: "SIGKILL", Known: true}, nil
	case <-ctx.Done():
		return sandbox.Exit{}, ctx.Err()
	}
}

func (r *fakeRuntime) Running(_ context.Context, id string) (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if in := r.running[id]; in != nil {
		return in.pid, true
	}
	return 0, false
}

// Kill ends the sandbox's processes; its container stays until Destroy.
func (r *fakeRuntime) Kill(_ context.Context, id string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if in := r.running[id]; in != nil {
		close(in.gone)
		delete(r.running, id)
		r.dead[id] = true
	}
	return nil
}

// DestroyKeepUpper is Destroy leaving a "layer" (until Destroy).
func (r *fakeRuntime) DestroyKeepUpper(_ context.Context, id string) error {
	r.kill(id)
	r.mu.Lock()
	delete(r.dead, id)
	r.upper[id] = true
	r.mu.Unlock()
	return nil
}

// DiskUsage: 64 KiB used of 1 GiB.
func (r *fakeRuntime) DiskUsage(string) (int64, int64, error) { return 64 << 10, 1 << 30, nil }

func (r *fakeRuntime) Destroy(_ context.Context, id string) error {
	r.kill(id)
	r.mu.Lock()
	delete(r.dead, id)
	delete(r.upper, id)
	r.destroys[id]++
	r.mu.Unlock()
	return nil
}

func (r *fakeRuntime) Leftovers(_ context.Context, live map[string]bool) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for id := range r.running {
		if !live[id] {
			out = append(out, "container "+id)
		}
	}
	for id := range r.dead {
		if !live[id] {
			out = append(out, "container "+id)
		}
	}
	for id := range r.upper {
		if !live[id] {
			out = append(out, "layer "+id)
		}
	}
	slices.Sort(out)
	return out, nil
}

func (r *fakeRuntime) ids() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.running))
}

func (r *fakeRuntime) LogPath(id string) string  { return filepath.Join(r.dir, id+".log") }
func (r *fakeRuntime) CanUpdate() bool           { return r.canUpdate }
func (r *fakeRuntime) NeedsNetworkAtStart() bool { return r.netAtStart }

func (r *fakeRuntime) SetDiskMB(id string, mb int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.disks[id] = mb
	return nil
}

func (r *fakeRuntime) SetLimits(_ context.Context, id string, cpu float64, memory int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.limits[id] = [2]float64{cpu, float64(memory)}
	return nil
}

func (r *fakeRuntime) Init(id string) sandboxInit {
	r.mu.Lock()
	defer r.mu.Unlock()
	if in := r.running[id]; in != nil {
		return in
	}
	return &fakeInit{rt: r, id: id, gone: closed()}
}

func closed() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

var errInitGone = fmt.Errorf("init: connection refused: %w", errdefs.ErrUnavailable)

func (in *fakeInit) Activate(ctx context.Context, a procapi.Activation) error {
	select {
	case <-in.gone:
		return errInitGone
	default:
	}
	if in.client != nil {
		return in.client.Activate(ctx, a) // the server records it (serveInit)
	}
	in.rt.mu.Lock()
	defer in.rt.mu.Unlock()
	if in.activated != nil {
		return errors.New("activated twice")
	}
	in.activated = &a
	return nil
}

func (in *fakeInit) activation() *procapi.Activation {
	in.rt.mu.Lock()
	defer in.rt.mu.Unlock()
	return in.activated
}

// Pooled is the init's real process API with connections kept between
// execs (procs), as the agent's execs use it; nil without procs.
func (in *fakeInit) Pooled(maxIdle int) *procapi.Client {
	if in.client == nil {
		return nil
	}
	return in.client.Pooled(maxIdle)
}

// real is the init's process API while its sandbox runs (procs), else nil:
// the calls below then fail as a dead init's socket does.
func (in *fakeInit) real() *procapi.Client {
	select {
	case <-in.gone:
		return nil
	default:
		return in.client
	}
}

func (in *fakeInit) Exec(ctx context.Context, req procapi.ExecRequest, stdout, stderr io.Writer) (*procapi.Process, error) {
	if c := in.real(); c != nil {
		return c.Exec(ctx, req, stdout, stderr)
	}
	return nil, errInitGone
}
func (in *fakeInit) ReadFile(ctx context.Context, path string) (io.ReadCloser, error) {
	if c := in.real(); c != nil {
		return c.ReadFile(ctx, path)
	}
	return nil, errInitGone
}
func (in *fakeInit) WriteFile(ctx context.Context, path string, mode fs.FileMode, r io.Reader) error {
	if c := in.real(); c != nil {
		return c.WriteFile(ctx, path, mode, r)
	}
	return errInitGone
}
func (in *fakeInit) ListDir(ctx context.Context, path string) ([]procapi.FileInfo, error) {
	if c := in.real(); c != nil {
		return c.ListDir(ctx, path)
	}
	return nil, errInitGone
}
func (in *fakeInit) Remove(ctx context.Context, path string, recursive bool) error {
	if c := in.real(); c != nil {
		return c.Remove(ctx, path, recursive)
	}
	return errInitGone
}

func newFakeNet(max int) *fakeNet { return &fakeNet{max: max, inUse: map[int]string{}} }

func (n *fakeNet) Setup(_ context.Context, id string, slot int) (*sandboxnet.Net, error) {
	if n.gate != nil {
		n.gate(id)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if slot < 1 || slot > n.max {
		return nil, fmt.Errorf("slot %d: %w", slot, errdefs.ErrInvalidArgument)
	}
	if other, ok := n.inUse[slot]; ok {
		return nil, fmt.Errorf("slot %d: held by %s: %w", slot, other, errdefs.ErrAlreadyExists)
	}
	n.inUse[slot] = id
	n.setups++
	return &sandboxnet.Net{ID: id, Slot: slot, HostIP: netip.MustParseAddr("10.0.0.1"),
		SandboxIP: netip.AddrFrom4([4]byte{10, 0, byte(slot >> 8), byte(slot)})}, nil
}

func (n *fakeNet) Begin(ctx context.Context, id string, slot int) (*sandboxnet.Pending, error) {
	sn, err := n.Setup(ctx, id, slot)
	if err != nil {
		return nil, err
	}
	return sandboxnet.NewPending(sn, func() error {
		if n.configure == nil {
			return nil
		}
		if err := n.configure(id); err != nil {
			_ = n.Teardown(ctx, id, slot)
			return err
		}
		return nil
	}), nil
}

func (n *fakeNet) Teardown(_ context.Context, id string, slot int) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.inUse[slot] == id {
		delete(n.inUse, slot)
	}
	return nil
}

func (n *fakeNet) Refill() {
	n.mu.Lock()
	n.refills++
	n.mu.Unlock()
}

func (n *fakeNet) Lookup(id string, slot int) *sandboxnet.Net {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.inUse[slot] != id {
		return nil
	}
	return &sandboxnet.Net{ID: id, Slot: slot}
}

func (n *fakeNet) MaxSlot() int { return n.max }

func (n *fakeNet) SlotInUse(slot int) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.inUse[slot]
	return ok
}

func (n *fakeNet) Leftovers(_ context.Context, live map[string]int) ([]string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for slot, id := range n.inUse {
		if s, ok := live[id]; !ok || s != slot {
			out = append(out, fmt.Sprintf("netns %s (slot %d)", id, slot))
		}
	}
	slices.Sort(out)
	return out, nil
}

// slots returns the slots in use.
func (n *fakeNet) slots() map[int]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return maps.Clone(n.inUse)
}

// testAgent is an Agent on the fake runtime and network and a real node
// cache in a temp dir.
func testAgent(t *testing.T, cfg Config, rt *fakeRuntime, n *fakeNet) *Agent {
	t.Helper()
	cache, err := nodecache.New(nodecache.Config{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Cache = cache
	if cfg.Pool.Slots > 0 {
		if cfg.Pool.Dir == "" {
			cfg.Pool.Dir = t.TempDir()
		}
		if cfg.Pool.NewID == nil {
			var mu sync.Mutex
			next := 0
			cfg.Pool.NewID = func() string {
				mu.Lock()
				defer mu.Unlock()
				next++
				return fmt.Sprintf("sb-%04d", next)
			}
		}
	}
	a, err := newAgent(cfg, rt, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.ClosePool)
	return a
}

func testImage(name string) *nodecache.Image {
	img := &nodecache.Image{Ref: name, Digest: "sha256:" + name}
	img.Config.Config.Env = []string{"PATH=/bin"}
	return img
}
