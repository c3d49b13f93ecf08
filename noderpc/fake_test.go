package noderpc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
)

// fakeNode records what it is asked and answers from its fields; it runs
// nothing (no root). Exec runs exec (a Go function) as the process.
type fakeNode struct {
	mu       sync.Mutex
	calls    []string
	started  []node.StartRequest
	claimed  []node.StartRequest
	images   map[string]*nodecache.Image // by ref
	startErr error
	exec     func(p *fakeProc, stdout, stderr io.Writer) int
	procs    []*fakeProc
	files    map[string][]byte
	readers  map[string]io.ReadCloser // ReadFile of these paths returns them
	writeErr error
	logs     *bytes.Buffer
	live     map[string]int
	paused   map[string]bool
	pool     map[string][]string // image digest -> pre-started ids (nil: Claim always gives sb-pre)
	layer    []byte              // SnapshotLayer's layer
	// restoreHold, if set, holds Restore until closed.
	restoreHold chan struct{}
	// restoreFail: Restore fails this many more times (a node not reached).
	restoreFail int
	// left: more of what Leftovers finds (besides "old"), not in live.
	left []string
}

func newFakeNode() *fakeNode {
	return &fakeNode{images: map[string]*nodecache.Image{}, files: map[string][]byte{},
		readers: map[string]io.ReadCloser{}, logs: &bytes.Buffer{}, paused: map[string]bool{}}
}

var _ api.Node = (*fakeNode)(nil)

func (f *fakeNode) call(s string) {
	f.mu.Lock()
	f.calls = append(f.calls, s)
	f.mu.Unlock()
}

func (f *fakeNode) ReserveSlot(req node.StartRequest) (int, error) {
	f.call(fmt.Sprintf("ReserveSlot %s %g %d", req.ID, req.CPU, req.Memory))
	if req.ID == "full" {
		return 0, fmt.Errorf("node is full: %w", errdefs.ErrResourceExhausted)
	}
	return 123, nil
}

func (f *fakeNode) Kill(_ context.Context, id string) error {
	f.call("Kill " + id)
	return nil
}

func (f *fakeNode) Teardown(id string, slot int, keep node.KeepUpper) (int64, error) {
	f.call(fmt.Sprintf("Teardown %s %d %s %d", id, slot, keep.For, keep.MaxBytes))
	if keep.For > 0 {
		return 4096, nil
	}
	return 0, nil
}

func (f *fakeNode) EnsureImage(_ context.Context, ref string, progress func(nodecache.Progress)) (*nodecache.Image, error) {
	f.call("EnsureImage " + ref)
	if ref == "missing" {
		return nil, fmt.Errorf("image %q: %w", ref, errdefs.ErrNotFound)
	}
	if progress != nil {
		progress(nodecache.Progress{Phase: "pull", Layer: "sha256:l1", Current: 5, Total: 10})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	img := f.images[ref]
	if img == nil {
		img = &nodecache.Image{Ref: ref, Digest: "sha256:d-" + ref,
			Layers: []nodecache.Layer{{Digest: "sha256:l1", DiffID: "sha256:u1", Size: 10, Dir: "/node/layers/u1"}}}
		img.Config.Config.Env = []string{"PATH=/bin"}
		f.images[ref] = img
	}
	return img, nil
}

func (f *fakeNode) Start(_ context.Context, req node.StartRequest) (node.Started, error) {
	f.call("Start " + req.ID)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.started = append(f.started, req)
	if f.startErr != nil {
		return node.Started{}, f.startErr
	}
	return node.Started{Pid: 77, Net: &sandboxnet.Net{ID: req.ID, Slot: req.Slot, NetnsPath: "/run/netns/x",
		HostIP: netip.MustParseAddr("10.0.0.1"), SandboxIP: netip.MustParseAddr("10.0.0.2"),
		SandboxIP6: netip.MustParseAddr("fd00::2"), UserNS: &sandboxnet.UserNS{Path: "/u", HostID: 100000, Size: 65536}}}, nil
}

func (f *fakeNode) Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error) {
	f.call(fmt.Sprintf("Wait %s %d", id, pid))
	if id == "forever" {
		<-ctx.Done()
		return sandbox.Exit{}, ctx.Err()
	}
	return sandbox.Exit{Code: 137, Signal: "SIGKILL", OOM: true, Known: true}, nil
}

func (f *fakeNode) Running(_ context.Context, id string) (int, bool) {
	f.call("Running " + id)
	return 77, id == "up"
}

func (f *fakeNode) Destroy(_ context.Context, id string, slot int) error {
	f.call(fmt.Sprintf("Destroy %s %d", id, slot))
	if id == "stuck" {
		return fmt.Errorf("destroy %q: busy: %w", id, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// fakeProc is a process of the fake node: the exec function runs as it.
type fakeProc struct {
	req     procapi.ExecRequest
	stdinR  *io.PipeReader
	stdinW  *io.PipeWriter
	signals chan syscall.Signal
	sizes   chan [2]int
	exited  chan struct{}
	status  procapi.ExitStatus
	killed  atomic.Bool
}

func (p *fakeProc) Pid() int { return 9 }
func (p *fakeProc) Stdin() io.WriteCloser {
	if p.stdinW == nil {
		return nil
	}
	return p.stdinW
}
func (p *fakeProc) PTY() bool { return p.req.PTY != nil }
func (p *fakeProc) Signal(sig syscall.Signal) error {
	select {
	case <-p.exited:
		return fmt.Errorf("process ended: %w", errdefs.ErrFailedPrecondition)
	default:
	}
	if sig == syscall.SIGKILL {
		p.killed.Store(true)
	}
	select {
	case p.signals <- sig:
	default:
	}
	return nil
}
func (p *fakeProc) Resize(rows, cols int) error {
	if p.req.PTY == nil {
		return fmt.Errorf("no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	p.sizes <- [2]int{rows, cols}
	return nil
}
func (p *fakeProc) Wait() (procapi.ExitStatus, error) {
	<-p.exited
	return p.status, nil
}

func (f *fakeNode) Exec(_ context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (node.Process, error) {
	f.call("Exec " + id)
	if id == "gone" {
		return nil, fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	p := &fakeProc{req: req, signals: make(chan syscall.Signal, 8), sizes: make(chan [2]int, 8), exited: make(chan struct{})}
	if req.Stdin {
		p.stdinR, p.stdinW = io.Pipe()
	}
	f.mu.Lock()
	f.procs = append(f.procs, p)
	run := f.exec
	f.mu.Unlock()
	if run == nil {
		run = func(*fakeProc, io.Writer, io.Writer) int { return 0 }
	}
	go func() {
		defer close(p.exited)
		p.status = procapi.ExitStatus{Code: run(p, stdout, stderr)}
		if p.stdinR != nil {
			p.stdinR.Close()
		}
	}()
	return p, nil
}

func (f *fakeNode) Files(id string) node.Files { return fakeFiles{f, id} }

type fakeFiles struct {
	f  *fakeNode
	id string
}

func (ff fakeFiles) ReadFile(_ context.Context, path string) (io.ReadCloser, error) {
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	if r, ok := ff.f.readers[path]; ok {
		return r, nil
	}
	b, ok := ff.f.files[ff.id+":"+path]
	if !ok {
		return nil, fmt.Errorf("%s: %w", path, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (ff fakeFiles) WriteFile(_ context.Context, path string, mode fs.FileMode, r io.Reader) error {
	if ff.f.writeErr != nil {
		// Fails after taking some of the content, as a full disk would.
		_, _ = io.CopyN(io.Discard, r, 1)
		return ff.f.writeErr
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ff.f.mu.Lock()
	defer ff.f.mu.Unlock()
	ff.f.files[ff.id+":"+path] = b
	ff.f.calls = append(ff.f.calls, fmt.Sprintf("WriteFile %s %s %o", ff.id, path, mode))
	return nil
}

func (ff fakeFiles) ListDir(_ context.Context, path string) ([]procapi.FileInfo, error) {
	return []procapi.FileInfo{{Name: "a", Size: 3, Mode: 0o640}, {Name: "d", Mode: fs.ModeDir | 0o755, IsDir: true}}, nil
}

func (ff fakeFiles) Remove(_ context.Context, path string, recursive bool) error {
	ff.f.call(fmt.Sprintf("Remove %s %s %v", ff.id, path, recursive))
	return nil
}

// fakeLog reads the fake's log buffer from its start: io.EOF at its end, and
// what was appended since on a later Read.
type fakeLog struct {
	f   *fakeNode
	off int
}

func (l *fakeLog) Read(b []byte) (int, error) {
	l.f.mu.Lock()
	defer l.f.mu.Unlock()
	data := l.f.logs.Bytes()
	if l.off >= len(data) {
		return 0, io.EOF
	}
	n := copy(b, data[l.off:])
	l.off += n
	return n, nil
}
func (l *fakeLog) Close() error { return nil }

func (f *fakeNode) Logs(id string) (io.ReadCloser, error) {
	if id != "sb" {
		return nil, fmt.Errorf("logs of %q: %w", id, errdefs.ErrNotFound)
	}
	return &fakeLog{f: f}, nil
}

func (f *fakeNode) Leftovers(_ context.Context, live map[string]int) ([]string, error) {
	f.mu.Lock()
	f.live = live
	out := []string{"runc:old", "netns:old"}
	for _, id := range f.left {
		if _, ok := live[id]; !ok {
			out = append(out, "runc:"+id, "netns:"+id)
		}
	}
	f.mu.Unlock()
	return out, nil
}

func (f *fakeNode) Adopt(id, digest string) { f.call("Adopt " + id + " " + digest) }

func (f *fakeNode) Claim(req node.StartRequest) (string, int, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claimed = append(f.claimed, req)
	if f.pool == nil {
		return "sb-pre", 250, true
	}
	ids := f.pool[req.Image.Digest]
	if len(ids) == 0 {
		return "", 0, false
	}
	f.pool[req.Image.Digest] = ids[1:]
	return ids[0], 250, true
}

// startCount is how many sandboxes were started here.
func (f *fakeNode) startCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.started)
}

// Prestarted counts the pool's ids of the image (nil pool: none).
func (f *fakeNode) Prestarted(digest string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pool[digest])
}

// prestart puts ids in the pool of image digest (Claim hands them out).
func (f *fakeNode) prestart(digest string, ids ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pool == nil {
		f.pool = map[string][]string{}
	}
	f.pool[digest] = append(f.pool[digest], ids...)
}

// claims is how many times Claim was called.
func (f *fakeNode) claims() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.claimed)
}

func (f *fakeNode) Unclaim(id string) { f.call("Unclaim " + id) }

func (f *fakeNode) Restore(ctx context.Context, live map[string]int) error {
	f.call(fmt.Sprintf("Restore %d", len(live)))
	f.mu.Lock()
	hold := f.restoreHold
	fail := f.restoreFail > 0
	if fail {
		f.restoreFail--
	}
	f.mu.Unlock()
	if fail {
		return fmt.Errorf("restore: node not reached: %w", errdefs.ErrUnavailable)
	}
	if hold != nil {
		select {
		case <-hold: // a node that stopped answering mid-call
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (f *fakeNode) SetPrestarted(_ context.Context, img *nodecache.Image, n int, progress func(ready, want int)) error {
	f.call(fmt.Sprintf("SetPrestarted %s %s %d", img.Digest, img.Layers[0].Dir, n))
	for i := 1; i <= n; i++ {
		progress(i, n)
	}
	return nil
}

func (f *fakeNode) SetPaused(_ context.Context, id string, paused bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paused[id] = paused
	return nil
}

func (f *fakeNode) Snapshot(_ context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	f.call(fmt.Sprintf("Snapshot %s %d %s %s %v", req.ID, req.Slot, req.ImageRef, req.ImageDigest, req.Exclude))
	if req.Progress != nil {
		req.Progress("freeze", 0, 0)
		req.Progress("push", 10, 20)
	}
	return &imagebuild.SnapshotResult{Ref: "snap:1", LocalRef: "local/snap:1", Digest: "sha256:s", DiffID: "sha256:sd", Size: 42}, nil
}

// SnapshotLayer writes f.layer to a temporary file, as node.Agent does.
func (f *fakeNode) SnapshotLayer(_ context.Context, req node.SnapshotRequest) (string, error) {
	f.call(fmt.Sprintf("SnapshotLayer %s %d %s %s %v", req.ID, req.Slot, req.ImageRef, req.ImageDigest, req.Exclude))
	if req.Progress != nil {
		req.Progress("freeze", 0, 0)
	}
	file, err := os.CreateTemp("", "fake-layer-*.tar")
	if err != nil {
		return "", err
	}
	defer file.Close()
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err = file.Write(f.layer)
	return file.Name(), err
}
