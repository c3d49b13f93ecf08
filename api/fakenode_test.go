package api

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/netip"
	"path"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// fakeNode is a Node that runs nothing: a started sandbox "runs" until it
// is destroyed or the test ends it (exit). It lets the control plane
// (the sandbox state machine, timeouts, reconcile, authorisation, quotas,
// the audit trail) be tested without root; the real node is tested in
// node/ and daemon/.
type fakeNode struct {
	mu       sync.Mutex
	digests  map[string]string            // image ref -> digest (default: "sha256:d-" + ref)
	running  map[string]*fakeSandbox      // by id, until destroyed
	started  []node.StartRequest          // every Start, in order
	destroys map[string]int               // id -> Destroy calls
	adopted  []string                     // ids passed to Adopt
	pool     []fakeMember                 // pre-started sandboxes Claim hands out
	unclaims []string                     // ids passed to Unclaim
	left     []string                     // what Leftovers reports
	startErr error                        // Start fails with it when set
	exec     fakeExec                     // default: echo argv, exit 0
	files    map[string]map[string][]byte // sandbox id -> path -> content
	logs     map[string]*bytes.Buffer     // sandbox id -> console output
	paused   map[string]bool
	slots    *node.Slots     // the node's allocator, as the real agent's
	killed   map[string]bool // Kill was called
	torn     map[string]int  // id -> slot, teardowns that ended
	tearing  map[string]int  // id -> slot, teardowns under way
	hold     chan struct{}   // when set, teardowns wait until it is closed
	restored map[string]int  // what Restore was given
	changed  chan struct{}   // closed and replaced at every teardown's end
	keepSize int64           // size of a stopped sandbox's writable layer
	kept     map[string]bool // stopped sandboxes whose layer is kept
	// unreaped: sandboxes whose init was killed (Kill, Destroy) and not
	// waited for since: a real node's init stays a zombie until Wait.
	unreaped map[string]bool
	// onStart, if set, runs in Start (with Start's context) before it
	// succeeds.
	onStart func(ctx context.Context, id string)
}

// fakeExec is the body of an exec: it writes its output, may read the
// signals sent to it, and returns the exit code.
type fakeExec func(req procapi.ExecRequest, stdin io.Reader, stdout, stderr io.Writer, sig <-chan syscall.Signal) int

type fakeSandbox struct {
	pid  int
	exit chan sandbox.Exit // buffered: the exit Wait returns
	lost chan struct{}     // closed: Wait returns node.ErrLost (its node went away)
}

type fakeMember struct {
	id   string
	slot int
}

var (
	_ Node         = (*fakeNode)(nil)
	_ node.Process = (*fakeProcess)(nil)
	_ node.Files   = (*fakeFiles)(nil)
)

func newFakeNode() *fakeNode {
	// Slots 1..240 for cold starts, 241..260 for pre-started sandboxes.
	slots, err := node.NewSlots(260, 20, 0, nil)
	if err != nil {
		panic(err)
	}
	return &fakeNode{digests: map[string]string{}, running: map[string]*fakeSandbox{}, unreaped: map[string]bool{},
		destroys: map[string]int{}, files: map[string]map[string][]byte{}, logs: map[string]*bytes.Buffer{},
		slots: slots, killed: map[string]bool{}, torn: map[string]int{}, tearing: map[string]int{},
		changed: make(chan struct{}), keepSize: 64 << 10, kept: map[string]bool{}}
}

func (f *fakeNode) ReserveSlot(req node.StartRequest) (int, error) {
	return f.slots.Take(node.SlotSandbox, req.ID)
}

// Kill ends the sandbox's init as SIGKILL would; what it has stays until
// its teardown.
func (f *fakeNode) Kill(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.killed[id] = true
	if sb := f.running[id]; sb != nil {
		f.unreaped[id] = true
		select {
		case sb.exit <- sandbox.Exit{Code: 137, Signal: "SIGKILL", Known: true}:
		default:
		}
		delete(f.running, id)
	}
	return nil
}

// Teardown "removes" the sandbox in the background (after f.hold, if
// set) and then frees its slot. Its writable layer, keepSize bytes, is
// kept (until dropped) when keep allows.
func (f *fakeNode) Teardown(id string, slot int, keep node.KeepUpper) (int64, error) {
	f.mu.Lock()
	f.tearing[id] = slot
	hold := f.hold
	var kept int64
	if keep.For > 0 && f.keepSize <= keep.MaxBytes {
		kept = f.keepSize
		f.kept[id] = true
	}
	f.mu.Unlock()
	go func() {
		if hold != nil {
			<-hold
		}
		_ = f.Destroy(context.Background(), id, slot)
		f.mu.Lock()
		delete(f.tearing, id)
		f.torn[id] = slot
		close(f.changed)
		f.changed = make(chan struct{})
		f.mu.Unlock()
	}()
	return kept, nil
}

// waitTornDown waits until sandbox id's teardown has ended (10s at most).
func (f *fakeNode) waitTornDown(t *testing.T, id string) {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		f.mu.Lock()
		_, done := f.torn[id]
		ch := f.changed
		f.mu.Unlock()
		if done {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			t.Fatalf("the teardown of %s never ended", id)
		}
	}
}

func (f *fakeNode) Restore(_ context.Context, live map[string]int) error {
	f.mu.Lock()
	f.restored = maps.Clone(live)
	f.mu.Unlock()
	var errs []error
	for id, slot := range live {
		errs = append(errs, f.slots.Hold(id, slot))
	}
	return errors.Join(errs...)
}

func (f *fakeNode) EnsureImage(_ context.Context, ref string, _ func(nodecache.Progress)) (*nodecache.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d, ok := f.digests[ref]
	if !ok {
		d = "sha256:d-" + ref
	}
	return &nodecache.Image{Ref: ref, Digest: d, Warm: true}, nil
}

func (f *fakeNode) Start(ctx context.Context, req node.StartRequest) (node.Started, error) {
	if f.onStart != nil {
		f.onStart(ctx, req.ID)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.started = append(f.started, req)
	if f.startErr != nil {
		return node.Started{}, f.startErr
	}
	f.pool = slices.DeleteFunc(f.pool, func(m fakeMember) bool { return m.id == req.ID })
	f.running[req.ID] = &fakeSandbox{pid: 4242, exit: make(chan sandbox.Exit, 1), lost: make(chan struct{})}
	f.files[req.ID] = map[string][]byte{}
	ip := netip.AddrFrom4([4]byte{10, 213, byte(req.Slot >> 6), byte(req.Slot<<2 | 2)})
	return node.Started{Pid: 4242, Net: &sandboxnet.Net{ID: req.ID, Slot: req.Slot, SandboxIP: ip}}, nil
}

// run makes id look like a sandbox a previous chalkd started (Reconcile).
func (f *fakeNode) run(id string, pid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running[id] = &fakeSandbox{pid: pid, exit: make(chan sandbox.Exit, 1), lost: make(chan struct{})}
}

// loseSandbox makes sandbox id's node stop answering (fleet).
func (f *fakeNode) loseSandbox(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.running[id].lost)
}

// exitSandbox ends sandbox id's init as if it exited by itself.
func (f *fakeNode) exitSandbox(id string, ex sandbox.Exit) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if sb := f.running[id]; sb != nil {
		select {
		case sb.exit <- ex:
		default:
		}
	}
}

func (f *fakeNode) Wait(ctx context.Context, id string, _ int) (sandbox.Exit, error) {
	f.mu.Lock()
	sb := f.running[id]
	if sb == nil {
		delete(f.unreaped, id)
	}
	f.mu.Unlock()
	if sb == nil {
		return sandbox.Exit{Known: true}, nil
	}
	select {
	case ex := <-sb.exit:
		f.mu.Lock()
		delete(f.unreaped, id)
		f.mu.Unlock()
		return ex, nil
	case <-sb.lost:
		return sandbox.Exit{}, fmt.Errorf("sandbox %q: node n1 stopped answering: %w", id, node.ErrLost)
	case <-ctx.Done():
		return sandbox.Exit{}, ctx.Err()
	}
}

func (f *fakeNode) Running(_ context.Context, id string) (int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	sb, ok := f.running[id]
	if !ok {
		return 0, false
	}
	return sb.pid, true
}

func (f *fakeNode) Destroy(_ context.Context, id string, slot int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.destroys[id]++
	if sb := f.running[id]; sb != nil {
		f.unreaped[id] = true
		select {
		case sb.exit <- sandbox.Exit{Code: 137, Signal: "SIGKILL", Known: true}:
		default:
		}
		delete(f.running, id)
	}
	if held, ok := f.slots.Of(id); ok && held == slot {
		f.slots.Release(id)
	}
	return nil
}

func (f *fakeNode) destroyed(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.destroys[id]
}

func (f *fakeNode) Exec(_ context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (node.Process, error) {
	f.mu.Lock()
	_, ok := f.running[id]
	run := f.exec
	f.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("sandbox %q: %w", id, errdefs.ErrUnavailable)
	}
	if run == nil {
		run = func(req procapi.ExecRequest, _ io.Reader, stdout, _ io.Writer, _ <-chan syscall.Signal) int {
			fmt.Fprint(stdout, strings.Join(req.Argv, " "))
			return 0
		}
	}
	p := &fakeProcess{done: make(chan struct{}), signals: make(chan syscall.Signal, 4)}
	if req.Stdin {
		p.stdinR, p.stdinW = io.Pipe()
	}
	go func() {
		var stdin io.Reader = strings.NewReader("")
		if p.stdinR != nil {
			stdin = p.stdinR
		}
		code := run(req, stdin, stdout, stderr, p.signals)
		p.status = procapi.ExitStatus{Code: code}
		close(p.done)
	}()
	return p, nil
}

// fakeProcess is an exec whose body is a Go function; Signal records.
type fakeProcess struct {
	stdinR  *io.PipeReader
	stdinW  *io.PipeWriter
	signals chan syscall.Signal
	done    chan struct{}
	status  procapi.ExitStatus
}

func (p *fakeProcess) Pid() int { return 7 }
func (p *fakeProcess) Stdin() io.WriteCloser {
	if p.stdinW == nil {
		return nil
	}
	return p.stdinW
}
func (p *fakeProcess) Signal(sig syscall.Signal) error {
	select {
	case <-p.done:
		return fmt.Errorf("process ended: %w", errdefs.ErrFailedPrecondition)
	case p.signals <- sig:
		return nil
	}
}
func (p *fakeProcess) PTY() bool { return false }
func (p *fakeProcess) Resize(rows, cols int) error {
	return fmt.Errorf("fake process: no terminal: %w", errdefs.ErrFailedPrecondition)
}
func (p *fakeProcess) Wait() (procapi.ExitStatus, error) {
	<-p.done
	return p.status, nil
}

func (f *fakeNode) Files(id string) node.Files { return &fakeFiles{f, id} }

// fakeFiles is a sandbox's file system as a map.
type fakeFiles struct {
	f  *fakeNode
	id string
}

func (ff *fakeFiles) fs() (map[string][]byte, error) {
	m := ff.f.files[ff.id]
	if m == nil {
		return nil, fmt.Errorf("sandbox %q: %w", ff.id, errdefs.ErrUnavailable)
	}
	return m, nil
}

func (ff *fakeFiles) ReadFile(_ context.Context, p string) (io.ReadCloser, error) {
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	m, err := ff.fs()
	if err != nil {
		return nil, err
	}
	b, ok := m[p]
	if !ok {
		return nil, fmt.Errorf("%s: %w", p, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (ff *fakeFiles) WriteFile(_ context.Context, p string, _ fs.FileMode, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	m, err := ff.fs()
	if err != nil {
		return err
	}
	m[p] = b
	return nil
}

func (ff *fakeFiles) ListDir(_ context.Context, dir string) ([]procapi.FileInfo, error) {
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	m, err := ff.fs()
	if err != nil {
		return nil, err
	}
	var out []procapi.FileInfo
	for p, b := range m {
		if path.Dir(p) == dir {
			out = append(out, procapi.FileInfo{Name: path.Base(p), Size: int64(len(b)), Mode: 0o644})
		}
	}
	slices.SortFunc(out, func(a, b procapi.FileInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (ff *fakeFiles) Remove(_ context.Context, p string, _ bool) error {
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	m, err := ff.fs()
	if err != nil {
		return err
	}
	if _, ok := m[p]; !ok {
		return fmt.Errorf("%s: %w", p, errdefs.ErrNotFound)
	}
	delete(m, p)
	return nil
}

func (f *fakeNode) Logs(id string) (io.ReadCloser, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b := f.logs[id]
	if b == nil {
		return nil, fmt.Errorf("logs of sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b.Bytes())), nil
}

func (f *fakeNode) Leftovers(context.Context, map[string]int) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.left, nil
}

func (f *fakeNode) Adopt(id, _ string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.adopted = append(f.adopted, id)
}

func (f *fakeNode) Claim(node.StartRequest) (string, int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.pool) == 0 {
		return "", 0, false
	}
	m := f.pool[0]
	if err := f.slots.Hold(m.id, m.slot); err != nil {
		panic(err) // a member's slot is its own
	}
	return m.id, m.slot, true
}

func (f *fakeNode) Unclaim(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unclaims = append(f.unclaims, id)
	_, started := f.running[id]
	_, tearing := f.tearing[id]
	if !started && !tearing && !f.killed[id] {
		f.slots.Release(id)
	}
}
func (f *fakeNode) SetPrestarted(context.Context, *nodecache.Image, int, func(int, int)) error {
	return nil
}

func (f *fakeNode) SetPaused(_ context.Context, id string, paused bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running[id] == nil {
		return errdefs.ErrFailedPrecondition
	}
	if f.paused == nil {
		f.paused = map[string]bool{}
	}
	f.paused[id] = paused
	return nil
}

// Snapshot "pushes" an image whose digest depends on the sandbox's image
// only (the fake has no filesystem): digest "sha256:snap-" + image digest.
func (f *fakeNode) Snapshot(_ context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if (req.Stopped && !f.kept[req.ID]) || (!req.Stopped && f.running[req.ID] == nil) {
		return nil, errdefs.ErrFailedPrecondition
	}
	d := "sha256:snap-" + strings.TrimPrefix(req.ImageDigest, "sha256:")
	ref := imagebuild.SnapshotRepo + ":" + strings.TrimPrefix(d, "sha256:")
	f.digests[ref] = d
	return &imagebuild.SnapshotResult{Ref: ref, LocalRef: "local/" + ref, Digest: d}, nil
}

// fakeImages is an ImageStore and ImageBackend over a fixed set of images.
type fakeImages struct {
	mu     sync.Mutex
	images map[string]*v1.Image // by ref
	hashes map[string]string    // content hash -> ref
	build  func() (*BuildResult, error)

	blobs   map[string]bool // uploaded digests
	touched map[string]int  // HasBlob calls per digest
	putErr  error           // PutBlob's answer (nil: stores)
}

var (
	_ ImageStore   = (*fakeImages)(nil)
	_ ImageBackend = (*fakeImages)(nil)
)

func (f *fakeImages) List(context.Context) ([]*v1.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*v1.Image
	for _, i := range f.images {
		out = append(out, i)
	}
	return out, nil
}

func (f *fakeImages) Inspect(_ context.Context, ref string) (*v1.InspectImageResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := f.images[ref]
	if i == nil {
		return nil, errdefs.ErrNotFound
	}
	return &v1.InspectImageResponse{Image: i}, nil
}

func (f *fakeImages) Remove(_ context.Context, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.images[ref] == nil {
		return errdefs.ErrNotFound
	}
	delete(f.images, ref)
	return nil
}

func (f *fakeImages) Build(context.Context, []byte, bool, func(*v1.ImageProgress)) (*BuildResult, error) {
	if f.build != nil {
		return f.build()
	}
	return nil, errors.New("fake images: no builds")
}

func (f *fakeImages) BaseDigest(context.Context, []byte) (string, error) { return "", nil }

func (f *fakeImages) RefForHash(_ context.Context, h string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.hashes[h]
	return r, ok
}

// HasBlob says whether d was put, and counts the ask (a Touch: it restarts
// the content's grace in the real backend).
func (f *fakeImages) HasBlob(d string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.touched == nil {
		f.touched = map[string]int{}
	}
	f.touched[d]++
	return f.blobs[d]
}

func (f *fakeImages) PutBlob(_ context.Context, d string, _ []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.putErr != nil {
		return f.putErr
	}
	if f.blobs == nil {
		f.blobs = map[string]bool{}
	}
	f.blobs[d] = true
	return nil
}
