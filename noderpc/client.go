package noderpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/errdefs/errconnect"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// callTimeout bounds the calls of api.Node methods that take no context.
const callTimeout = 10 * time.Second

// Client is an api.Node on the other end of a NodeService.
type Client struct {
	rpc nodev1connect.NodeServiceClient
	log *slog.Logger
}

var (
	_ api.Node      = (*Client)(nil)
	_ node.Process  = (*remoteProcess)(nil)
	_ node.Files    = remoteFiles{}
	_ io.ReadCloser = (*remoteLog)(nil)
	_ io.ReadCloser = (*remoteFile)(nil)
)

// NewClient returns a Client of the node at baseURL. httpClient must speak
// HTTP/2 (exec and logs are bidirectional streams): an mTLS client from
// pki.go, or any http.Client with HTTP/2 configured.
func NewClient(httpClient connect.HTTPClient, baseURL string, log *slog.Logger) *Client {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// No compression: the link is a LAN, exec output and files are often
	// compressed already, and the nodes' cores are the sandboxes'.
	return &Client{rpc: nodev1connect.NewNodeServiceClient(httpClient, baseURL,
		connect.WithAcceptCompression("gzip", nil, nil), connect.WithReadMaxBytes(MaxMessage)), log: log}
}

// wire turns a call's error back into an errdefs class.
func wire(err error) error { return errconnect.FromConnect(err) }

func (c *Client) ReserveSlot(req node.StartRequest) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	res, err := c.rpc.ReserveSlot(ctx, connect.NewRequest(&nodev1.ReserveSlotRequest{Spec: startToPB(req)}))
	if err != nil {
		return 0, wire(err)
	}
	return int(res.Msg.Slot), nil
}

func (c *Client) EnsureImage(ctx context.Context, ref string, progress func(nodecache.Progress)) (*nodecache.Image, error) {
	stream, err := c.rpc.EnsureImage(ctx, connect.NewRequest(&nodev1.EnsureImageRequest{Ref: ref, Progress: progress != nil}))
	if err != nil {
		return nil, wire(err)
	}
	defer stream.Close()
	for stream.Receive() {
		switch e := stream.Msg().Event.(type) {
		case *nodev1.EnsureImageEvent_Progress:
			if progress != nil {
				progress(nodecache.Progress{Phase: e.Progress.Phase, Layer: e.Progress.Layer, Current: e.Progress.Current, Total: e.Progress.Total})
			}
		case *nodev1.EnsureImageEvent_Image:
			return imageFromPB(e.Image)
		}
	}
	if err := stream.Err(); err != nil {
		return nil, wire(err)
	}
	return nil, fmt.Errorf("ensure image %q: the node sent no image: %w", ref, errdefs.ErrUnavailable)
}

func (c *Client) Start(ctx context.Context, req node.StartRequest) (node.Started, error) {
	res, err := c.rpc.Start(ctx, connect.NewRequest(&nodev1.StartRequest{Spec: startToPB(req)}))
	if err != nil {
		return node.Started{}, wire(err)
	}
	n, err := netFromPB(res.Msg.Net)
	if err != nil {
		return node.Started{}, err
	}
	return node.Started{Pid: int(res.Msg.Pid), Net: n}, nil
}

func (c *Client) Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error) {
	res, err := c.rpc.Wait(ctx, connect.NewRequest(&nodev1.WaitRequest{Id: id, Pid: int32(pid)}))
	if err != nil {
		return sandbox.Exit{}, wire(err)
	}
	return exitFromPB(res.Msg), nil
}

// Running reports false when the node cannot be asked (logged).
func (c *Client) Running(ctx context.Context, id string) (int, bool) {
	pid, running, err := c.RunningErr(ctx, id)
	if err != nil {
		c.log.Warn("node: running", "sandbox", id, "err", err)
	}
	return pid, running
}

// RunningErr is Running, with the error of a node that did not answer
// (unreachable, frozen, refused): then it is not known whether the
// sandbox runs.
func (c *Client) RunningErr(ctx context.Context, id string) (int, bool, error) {
	res, err := c.rpc.Running(ctx, connect.NewRequest(&nodev1.RunningRequest{Id: id}))
	if err != nil {
		return 0, false, wire(err)
	}
	return int(res.Msg.Pid), res.Msg.Running, nil
}

func (c *Client) Kill(ctx context.Context, id string) error {
	_, err := c.rpc.Kill(ctx, connect.NewRequest(&nodev1.KillRequest{Id: id}))
	return wire(err)
}

// Teardown asks the node to tear the sandbox down (in its background; the
// call returns once the node took it on).
func (c *Client) Teardown(id string, slot int, keep node.KeepUpper) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	res, err := c.rpc.Teardown(ctx, connect.NewRequest(&nodev1.TeardownRequest{Id: id, Slot: int32(slot),
		KeepForMs: keep.For.Milliseconds(), KeepMaxBytes: keep.MaxBytes}))
	if err != nil {
		return 0, wire(err)
	}
	return res.Msg.Kept, nil
}

func (c *Client) Destroy(ctx context.Context, id string, slot int) error {
	_, err := c.rpc.Destroy(ctx, connect.NewRequest(&nodev1.DestroyRequest{Id: id, Slot: int32(slot)}))
	return wire(err)
}

func (c *Client) Exec(ctx context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (node.Process, error) {
	if stdout == nil {
		stdout = io.Discard
	}
	if stderr == nil {
		stderr = io.Discard
	}
	ctx, cancel := context.WithCancel(ctx)
	stream := c.rpc.Exec(ctx)
	if err := stream.Send(&nodev1.ExecInput{Input: &nodev1.ExecInput_Start{Start: execToPB(id, req)}}); err != nil && !errors.Is(err, io.EOF) {
		cancel()
		return nil, wire(err)
	}
	if !req.Stdin {
		_ = stream.CloseRequest()
	}
	first, err := stream.Receive()
	if err != nil {
		cancel()
		return nil, wire(err)
	}
	st := first.GetStarted()
	if st == nil {
		cancel()
		return nil, fmt.Errorf("exec in sandbox %q: the node did not start it: %w", id, errdefs.ErrUnavailable)
	}
	p := &remoteProcess{c: c, stream: stream, cancel: cancel, id: st.ExecId, pid: int(st.Pid), pty: st.Pty, done: make(chan struct{})}
	if req.Stdin {
		p.stdin = &remoteStdin{p: p}
	}
	go p.pump(stdout, stderr)
	return p, nil
}

// remoteProcess is a process on the node, run by an Exec stream.
type remoteProcess struct {
	c      *Client
	stream *connect.BidiStreamForClient[nodev1.ExecInput, nodev1.ExecOutput]
	cancel context.CancelFunc
	id     string
	pid    int
	pty    bool
	stdin  *remoteStdin

	done     chan struct{} // closed when the stream ended
	status   procapi.ExitStatus
	err      error
	stdinErr atomic.Pointer[string] // a stdin failure the node reported
}

// pump writes the process's output as it arrives; a writer that blocks
// stops the reads, and so the node's sends (flow control).
func (p *remoteProcess) pump(stdout, stderr io.Writer) {
	defer close(p.done)
	defer p.cancel()
	for {
		m, err := p.stream.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("process %d: the node ended the stream without an exit status: %w", p.pid, errdefs.ErrUnavailable)
			}
			p.err = wire(err)
			return
		}
		switch o := m.Output.(type) {
		case *nodev1.ExecOutput_Stdout:
			if _, err := stdout.Write(o.Stdout); err != nil {
				p.err = fmt.Errorf("process %d: output writer: %w", p.pid, err)
				return // cancel: the node kills the process
			}
		case *nodev1.ExecOutput_Stderr:
			if _, err := stderr.Write(o.Stderr); err != nil {
				p.err = fmt.Errorf("process %d: output writer: %w", p.pid, err)
				return
			}
		case *nodev1.ExecOutput_StdinError:
			msg := o.StdinError
			p.stdinErr.Store(&msg)
		case *nodev1.ExecOutput_Exited:
			p.status = procapi.ExitStatus{Code: int(o.Exited.Code), Signal: o.Exited.Signal}
			return
		}
	}
}

func (p *remoteProcess) ended() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *remoteProcess) Pid() int  { return p.pid }
func (p *remoteProcess) PTY() bool { return p.pty }

func (p *remoteProcess) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}

func (p *remoteProcess) Wait() (procapi.ExitStatus, error) {
	<-p.done
	return p.status, p.err
}

func (p *remoteProcess) Signal(sig syscall.Signal) error {
	if p.ended() {
		return fmt.Errorf("process %d has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := p.c.rpc.SignalExec(ctx, connect.NewRequest(&nodev1.SignalExecRequest{ExecId: p.id, Signal: int32(sig)}))
	return wire(err)
}

func (p *remoteProcess) Resize(rows, cols int) error {
	if !p.pty {
		return fmt.Errorf("process %d has no terminal: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	if p.ended() {
		return fmt.Errorf("process %d has ended: %w", p.pid, errdefs.ErrFailedPrecondition)
	}
	if rows < 0 || cols < 0 || rows > 0xffff || cols > 0xffff {
		return fmt.Errorf("size %dx%d: out of range: %w", rows, cols, errdefs.ErrInvalidArgument)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := p.c.rpc.ResizeExec(ctx, connect.NewRequest(&nodev1.ResizeExecRequest{ExecId: p.id, Rows: uint32(rows), Cols: uint32(cols)}))
	return wire(err)
}

// remoteStdin sends stdin on the Exec stream. A Write returns once the
// stream took the bytes (its window is the backpressure); failures the node
// reports come back on the next Write or Close.
type remoteStdin struct {
	p      *remoteProcess
	mu     sync.Mutex
	closed bool
}

func (w *remoteStdin) check() error {
	if w.closed {
		return fmt.Errorf("stdin of process %d: closed: %w", w.p.pid, errdefs.ErrFailedPrecondition)
	}
	if msg := w.p.stdinErr.Load(); msg != nil {
		return fmt.Errorf("stdin of process %d: %s: %w", w.p.pid, *msg, errdefs.ErrFailedPrecondition)
	}
	if w.p.ended() {
		return fmt.Errorf("stdin of process %d: the process ended: %w", w.p.pid, errdefs.ErrFailedPrecondition)
	}
	return nil
}

func (w *remoteStdin) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.check(); err != nil {
		return 0, err
	}
	n := 0
	for len(b) > 0 {
		c := b[:min(len(b), ChunkSize)]
		if err := w.p.stream.Send(&nodev1.ExecInput{Input: &nodev1.ExecInput_Stdin{Stdin: c}}); err != nil {
			return n, fmt.Errorf("stdin of process %d: %v: %w", w.p.pid, err, errdefs.ErrFailedPrecondition)
		}
		n += len(c)
		b = b[len(c):]
	}
	return n, nil
}

func (w *remoteStdin) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.check(); err != nil {
		return err
	}
	w.closed = true
	if err := w.p.stream.Send(&nodev1.ExecInput{Input: &nodev1.ExecInput_CloseStdin{CloseStdin: true}}); err != nil {
		return fmt.Errorf("close stdin of process %d: %v: %w", w.p.pid, err, errdefs.ErrFailedPrecondition)
	}
	return w.p.stream.CloseRequest()
}

func (c *Client) Files(id string) node.Files { return remoteFiles{c, id} }

// remoteFiles is file access in a sandbox on the node.
type remoteFiles struct {
	c  *Client
	id string
}

func (f remoteFiles) ReadFile(ctx context.Context, path string) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := f.c.rpc.ReadFile(ctx, connect.NewRequest(&nodev1.ReadFileRequest{SandboxId: f.id, Path: path}))
	if err != nil {
		cancel()
		return nil, wire(err)
	}
	r := &remoteFile{stream: stream, cancel: cancel}
	// The first chunk (or the error: not found, a directory...) comes now,
	// as from a local open.
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			r.Close()
			return nil, wire(err)
		}
		r.eof = true
	} else {
		r.buf = stream.Msg().Data
	}
	return r, nil
}

// remoteFile reads a ReadFile stream: one chunk at a time, so a reader that
// stops holds at most a chunk here and the node's window in flight.
type remoteFile struct {
	stream *connect.ServerStreamForClient[nodev1.FileChunk]
	cancel context.CancelFunc
	buf    []byte
	eof    bool
}

func (r *remoteFile) Read(b []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.eof {
			return 0, io.EOF
		}
		if !r.stream.Receive() {
			r.eof = true
			if err := r.stream.Err(); err != nil {
				return 0, wire(err)
			}
			return 0, io.EOF
		}
		r.buf = r.stream.Msg().Data
	}
	n := copy(b, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *remoteFile) Close() error {
	r.cancel()
	return r.stream.Close()
}

func (f remoteFiles) WriteFile(ctx context.Context, path string, mode fs.FileMode, src io.Reader) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream := f.c.rpc.WriteFile(ctx)
	if err := stream.Send(&nodev1.WriteFileInput{Input: &nodev1.WriteFileInput_Header{Header: &nodev1.WriteFileHeader{SandboxId: f.id, Path: path, Mode: uint32(mode)}}}); err != nil && !errors.Is(err, io.EOF) {
		_, _ = stream.CloseAndReceive()
		return wire(err)
	}
	buf := make([]byte, ChunkSize)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if err := stream.Send(&nodev1.WriteFileInput{Input: &nodev1.WriteFileInput_Data{Data: buf[:n]}}); err != nil {
				// io.EOF: the node stopped reading; its answer says why.
				if errors.Is(err, io.EOF) {
					break
				}
				_, _ = stream.CloseAndReceive()
				return wire(err)
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// The node must not keep a truncated file: the call is
			// cancelled (not closed), so the node's writer fails.
			cancel()
			_, _ = stream.CloseAndReceive()
			return fmt.Errorf("write %s: reading the content: %w", path, rerr)
		}
	}
	_, err := stream.CloseAndReceive()
	return wire(err)
}

func (f remoteFiles) ListDir(ctx context.Context, path string) ([]procapi.FileInfo, error) {
	res, err := f.c.rpc.ListDir(ctx, connect.NewRequest(&nodev1.ListDirRequest{SandboxId: f.id, Path: path}))
	if err != nil {
		return nil, wire(err)
	}
	out := make([]procapi.FileInfo, 0, len(res.Msg.Entries))
	for _, e := range res.Msg.Entries {
		out = append(out, fileInfoFromPB(e))
	}
	return out, nil
}

func (f remoteFiles) Remove(ctx context.Context, path string, recursive bool) error {
	_, err := f.c.rpc.Remove(ctx, connect.NewRequest(&nodev1.RemoveRequest{SandboxId: f.id, Path: path, Recursive: recursive}))
	return wire(err)
}

func (c *Client) Logs(id string) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(context.Background())
	stream := c.rpc.Logs(ctx)
	if err := stream.Send(&nodev1.LogsInput{SandboxId: id}); err != nil && !errors.Is(err, io.EOF) {
		cancel()
		return nil, wire(err)
	}
	if _, err := stream.Receive(); err != nil {
		cancel()
		return nil, wire(err)
	}
	return &remoteLog{stream: stream, cancel: cancel}, nil
}

// remoteLog is a console log on the node: each Read is one read there
// (io.EOF at the end of what is written; a later Read returns what came since).
type remoteLog struct {
	stream *connect.BidiStreamForClient[nodev1.LogsInput, nodev1.LogsOutput]
	cancel context.CancelFunc
}

func (l *remoteLog) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if err := l.stream.Send(&nodev1.LogsInput{Max: int32(min(len(b), ChunkSize))}); err != nil {
		if errors.Is(err, io.EOF) {
			_, err = l.stream.Receive()
		}
		return 0, wire(err)
	}
	m, err := l.stream.Receive()
	if err != nil {
		return 0, wire(err)
	}
	if m.Eof {
		return 0, io.EOF
	}
	if len(m.Data) > len(b) {
		return 0, fmt.Errorf("logs: the node sent %d bytes for a read of %d: %w", len(m.Data), len(b), errdefs.ErrUnavailable)
	}
	return copy(b, m.Data), nil
}

func (l *remoteLog) Close() error {
	_ = l.stream.CloseRequest()
	l.cancel()
	return l.stream.CloseResponse()
}

func (c *Client) Leftovers(ctx context.Context, live map[string]int) ([]string, error) {
	res, err := c.rpc.Leftovers(ctx, connect.NewRequest(&nodev1.LeftoversRequest{Live: liveToPB(live)}))
	if err != nil {
		return nil, wire(err)
	}
	return res.Msg.Items, nil
}

func (c *Client) Adopt(id, imageDigest string) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if _, err := c.rpc.Adopt(ctx, connect.NewRequest(&nodev1.AdoptRequest{Id: id, ImageDigest: imageDigest})); err != nil {
		c.log.Warn("node: adopt", "sandbox", id, "err", err)
	}
}

// Claim reports no claim when the node cannot be asked (logged): the
// sandbox then starts cold.
func (c *Client) Claim(req node.StartRequest) (string, int, bool) {
	id, slot, _, ok := c.ClaimPooled(req)
	return id, slot, ok
}

// ClaimPooled is Claim that also says how many pre-started sandboxes of
// req's image the node has ready after it (as the node reports: a hint).
func (c *Client) ClaimPooled(req node.StartRequest) (id string, slot, ready int, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	res, err := c.rpc.Claim(ctx, connect.NewRequest(&nodev1.ClaimRequest{Spec: startToPB(req)}))
	if err != nil {
		c.log.Warn("node: claim", "sandbox", req.ID, "err", err)
		return "", 0, 0, false
	}
	return res.Msg.Id, int(res.Msg.Slot), max(int(res.Msg.Ready), 0), res.Msg.Ok
}

func (c *Client) Unclaim(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if _, err := c.rpc.Unclaim(ctx, connect.NewRequest(&nodev1.UnclaimRequest{Id: id})); err != nil {
		c.log.Warn("node: unclaim", "sandbox", id, "err", err)
	}
}

func (c *Client) Restore(ctx context.Context, live map[string]int) error {
	_, err := c.rpc.Restore(ctx, connect.NewRequest(&nodev1.RestoreRequest{Live: liveToPB(live)}))
	return wire(err)
}

func (c *Client) SetPrestarted(ctx context.Context, img *nodecache.Image, n int, progress func(ready, want int)) error {
	if img == nil {
		return fmt.Errorf("set prestarted: no image: %w", errdefs.ErrInvalidArgument)
	}
	stream, err := c.rpc.SetPrestarted(ctx, connect.NewRequest(&nodev1.SetPrestartedRequest{ImageRef: img.Ref, ImageDigest: img.Digest, N: int32(n)}))
	if err != nil {
		return wire(err)
	}
	defer stream.Close()
	for stream.Receive() {
		if progress != nil {
			progress(int(stream.Msg().Ready), int(stream.Msg().Want))
		}
	}
	return wire(stream.Err())
}

func (c *Client) SetPaused(ctx context.Context, id string, paused bool) error {
	_, err := c.rpc.SetPaused(ctx, connect.NewRequest(&nodev1.SetPausedRequest{Id: id, Paused: paused}))
	return wire(err)
}

func (c *Client) Snapshot(ctx context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	stream, err := c.rpc.Snapshot(ctx, connect.NewRequest(&nodev1.SnapshotRequest{Spec: &nodev1.SnapshotSpec{
		Id: req.ID, Slot: int32(req.Slot), ImageRef: req.ImageRef, ImageDigest: req.ImageDigest, Exclude: req.Exclude, Progress: req.Progress != nil}}))
	if err != nil {
		return nil, wire(err)
	}
	defer stream.Close()
	for stream.Receive() {
		switch e := stream.Msg().Event.(type) {
		case *nodev1.SnapshotEvent_Progress:
			if req.Progress != nil {
				req.Progress(e.Progress.Phase, e.Progress.Current, e.Progress.Total)
			}
		case *nodev1.SnapshotEvent_Result:
			return snapshotResultFromPB(e.Result), nil
		}
	}
	if err := stream.Err(); err != nil {
		return nil, wire(err)
	}
	return nil, fmt.Errorf("snapshot of sandbox %q: the node sent no result: %w", req.ID, errdefs.ErrUnavailable)
}
