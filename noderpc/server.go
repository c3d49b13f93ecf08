// Package noderpc carries the api.Node seam over the network: Server serves a
// node (a *node.Agent) as the chalk.node.v1 NodeService, and Client is an
// api.Node that calls one. The mapping is mechanical, one RPC per method:
// unary calls for the plain methods, streams where the method streams (exec
// output and stdin, file contents, logs, progress). Streams keep the
// in-process backpressure: HTTP/2 flow control stops the sender when the
// receiver stops reading, so neither end buffers more than a window.
//
// Who may call is decided by the listener (mTLS, pki.go), not here.
package noderpc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/errdefs/errconnect"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/sandbox"
)

// ChunkSize is the most data one stream message carries (exec output, file
// and log chunks).
const ChunkSize = 32 << 10

// MaxMessage bounds every message either end reads (a listing of a large
// directory is the largest); a peer sending more gets resource_exhausted.
const MaxMessage = 64 << 20

// MaxFleetMessage bounds the fleet listener's messages: Join is read before
// its caller is known.
const MaxFleetMessage = 64 << 10

// Server serves a node.
type Server struct {
	node   api.Node
	log    *slog.Logger
	egress Egress // nil: the node enforces no egress rules
	// tunnels runs its sandboxes' tunnel devices (nil: none).
	tunnels Tunnels
	// identity, if set, keeps the sandboxes' identity files (identityfiles.go).
	identity Identity
	// dialer, if set, connects the control plane to sandbox ports (dial.go).
	dialer SandboxDialer
	mounts Mounts // nil: no upload mounts (mounts.go)

	mu     sync.Mutex
	images map[string]*nodecache.Image // by digest, as EnsureImage returned them
	execs  map[string]node.Process     // running execs by exec id
}

var _ nodev1connect.NodeServiceHandler = (*Server)(nil)

// NewServer returns a Server for n.
func NewServer(n api.Node, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{node: n, log: log, images: map[string]*nodecache.Image{}, execs: map[string]node.Process{}}
}

// Handler returns the path and handler to mount the service at.
func (s *Server) Handler(opts ...connect.HandlerOption) (string, http.Handler) {
	return nodev1connect.NewNodeServiceHandler(s, append([]connect.HandlerOption{
		connect.WithInterceptors(errInterceptor{}), connect.WithReadMaxBytes(MaxMessage)}, opts...)...)
}

// errInterceptor gives every handler error its wire code (errconnect).
type errInterceptor struct{}

func (errInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		res, err := next(ctx, req)
		return res, errconnect.ToConnect(err)
	}
}

func (errInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (errInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return errconnect.ToConnect(next(ctx, conn))
	}
}

func invalid(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, errdefs.ErrInvalidArgument)...)
}

func (s *Server) ReserveSlot(_ context.Context, req *connect.Request[nodev1.ReserveSlotRequest]) (*connect.Response[nodev1.ReserveSlotResponse], error) {
	if req.Msg.Spec == nil || req.Msg.Spec.Id == "" {
		return nil, invalid("spec.id: required")
	}
	// The node needs only the id (the image is the Start's business).
	slot, err := s.node.ReserveSlot(startFromPB(req.Msg.Spec))
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.ReserveSlotResponse{Slot: int32(slot)}), nil
}

func (s *Server) EnsureImage(ctx context.Context, req *connect.Request[nodev1.EnsureImageRequest], stream *connect.ServerStream[nodev1.EnsureImageEvent]) error {
	var progress func(nodecache.Progress)
	if req.Msg.Progress {
		var mu sync.Mutex
		progress = func(p nodecache.Progress) {
			mu.Lock()
			defer mu.Unlock()
			_ = stream.Send(&nodev1.EnsureImageEvent{Event: &nodev1.EnsureImageEvent_Progress{Progress: &nodev1.Progress{
				Phase: p.Phase, Layer: p.Layer, Current: p.Current, Total: p.Total}}})
		}
	}
	img, err := s.node.EnsureImage(ctx, req.Msg.Ref, progress)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.images[img.Digest] = img
	s.mu.Unlock()
	m, err := imageToPB(img)
	if err != nil {
		return err
	}
	return stream.Send(&nodev1.EnsureImageEvent{Event: &nodev1.EnsureImageEvent_Image{Image: m}})
}

// image is the node's image with this ref and digest: the one EnsureImage
// returned, or (after a restart of this process) ensured again by ref.
func (s *Server) image(ctx context.Context, ref, digest string) (*nodecache.Image, error) {
	if digest == "" {
		return nil, nil
	}
	s.mu.Lock()
	img := s.images[digest]
	s.mu.Unlock()
	if img != nil {
		return img, nil
	}
	img, err := s.node.EnsureImage(ctx, ref, nil)
	if err != nil {
		return nil, err
	}
	if img.Digest != digest {
		return nil, fmt.Errorf("image %q is now %s, not %s: %w", ref, img.Digest, digest, errdefs.ErrFailedPrecondition)
	}
	s.mu.Lock()
	s.images[digest] = img
	s.mu.Unlock()
	return img, nil
}

func (s *Server) startRequest(ctx context.Context, spec *nodev1.StartSpec) (node.StartRequest, error) {
	if spec == nil {
		return node.StartRequest{}, invalid("spec: required")
	}
	r := startFromPB(spec)
	img, err := s.image(ctx, spec.ImageRef, spec.ImageDigest)
	if err != nil {
		return r, err
	}
	r.Image = img
	return r, nil
}

func (s *Server) Start(ctx context.Context, req *connect.Request[nodev1.StartRequest]) (*connect.Response[nodev1.StartResponse], error) {
	r, err := s.startRequest(ctx, req.Msg.Spec)
	if err != nil {
		return nil, err
	}
	if s.egress != nil {
		// Never a sandbox without egress rules on this node: the baseline
		// unless ApplyEgress set its policies.
		if err := s.egress.Ensure(ctx, r.ID, r.Slot); err != nil {
			return nil, fmt.Errorf("sandbox %q egress rules: %w", r.ID, err)
		}
	}
	if len(r.Identity) > 0 {
		if s.identity == nil {
			return nil, fmt.Errorf("sandbox %q: this node keeps no identity files: %w", r.ID, errdefs.ErrFailedPrecondition)
		}
		if err := checkIdentityFiles(r.Identity); err != nil {
			return nil, err
		}
		b, err := s.identity.Prepare(ctx, r.ID, r.Slot, r.Identity)
		if err != nil {
			return nil, fmt.Errorf("sandbox %q identity files: %w", r.ID, err)
		}
		r.Binds = append(r.Binds, b)
	}
	st, err := s.node.Start(ctx, r)
	if m, ok := s.mounts.(interface{ Started([]sandbox.Bind) }); ok {
		// The copies PutMount held for this start: its bundle refers to
		// them now (or it failed).
		m.Started(r.Binds)
	}
	if err != nil {
		if s.identity != nil && len(r.Identity) > 0 {
			s.identity.Remove(r.ID)
		}
		return nil, err
	}
	return connect.NewResponse(&nodev1.StartResponse{Pid: int32(st.Pid), Net: netToPB(st.Net)}), nil
}

func (s *Server) Wait(ctx context.Context, req *connect.Request[nodev1.WaitRequest]) (*connect.Response[nodev1.WaitResponse], error) {
	ex, err := s.node.Wait(ctx, req.Msg.Id, int(req.Msg.Pid))
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(exitToPB(ex)), nil
}

func (s *Server) Running(ctx context.Context, req *connect.Request[nodev1.RunningRequest]) (*connect.Response[nodev1.RunningResponse], error) {
	pid, ok := s.node.Running(ctx, req.Msg.Id)
	return connect.NewResponse(&nodev1.RunningResponse{Pid: int32(pid), Running: ok}), nil
}

func (s *Server) Kill(ctx context.Context, req *connect.Request[nodev1.KillRequest]) (*connect.Response[nodev1.KillResponse], error) {
	if err := s.node.Kill(ctx, req.Msg.Id); err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.KillResponse{}), nil
}

func (s *Server) Teardown(ctx context.Context, req *connect.Request[nodev1.TeardownRequest]) (*connect.Response[nodev1.TeardownResponse], error) {
	m := req.Msg
	if m.KeepForMs < 0 || m.KeepMaxBytes < 0 {
		return nil, invalid("keep_for_ms and keep_max_bytes: must not be negative")
	}
	kept, err := s.node.Teardown(m.Id, int(m.Slot), node.KeepUpper{For: time.Duration(m.KeepForMs) * time.Millisecond, MaxBytes: m.KeepMaxBytes})
	if err != nil {
		return nil, err
	}
	if s.egress != nil {
		s.egress.Remove(context.WithoutCancel(ctx), m.Id)
	}
	if s.tunnels != nil {
		s.tunnels.Leave(m.Id)
	}
	if s.identity != nil {
		s.identity.Remove(m.Id)
	}
	return connect.NewResponse(&nodev1.TeardownResponse{Kept: kept}), nil
}

func (s *Server) Destroy(ctx context.Context, req *connect.Request[nodev1.DestroyRequest]) (*connect.Response[nodev1.DestroyResponse], error) {
	if err := s.node.Destroy(ctx, req.Msg.Id, int(req.Msg.Slot)); err != nil {
		return nil, err
	}
	if s.egress != nil {
		s.egress.Remove(context.WithoutCancel(ctx), req.Msg.Id)
	}
	if s.tunnels != nil {
		s.tunnels.Leave(req.Msg.Id)
	}
	if s.identity != nil {
		s.identity.Remove(req.Msg.Id)
	}
	return connect.NewResponse(&nodev1.DestroyResponse{}), nil
}

// outWriter sends what a process writes as stdout or stderr messages, once
// the Started message went out (ready). Send blocks while the peer's window
// is full: that is the backpressure on the process.
type outWriter struct {
	send   func(*nodev1.ExecOutput) error
	ready  <-chan struct{}
	stderr bool
}

func (w outWriter) Write(b []byte) (int, error) {
	<-w.ready
	n := 0
	for len(b) > 0 {
		c := b[:min(len(b), ChunkSize)]
		out := &nodev1.ExecOutput{Output: &nodev1.ExecOutput_Stdout{Stdout: c}}
		if w.stderr {
			out.Output = &nodev1.ExecOutput_Stderr{Stderr: c}
		}
		if err := w.send(out); err != nil {
			return n, err
		}
		n += len(c)
		b = b[len(c):]
	}
	return n, nil
}

func newExecID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (s *Server) Exec(ctx context.Context, stream *connect.BidiStream[nodev1.ExecInput, nodev1.ExecOutput]) error {
	first, err := stream.Receive()
	if err != nil {
		return err
	}
	spec := first.GetStart()
	if spec == nil {
		return invalid("exec: the first message must start the process")
	}
	req, err := execFromPB(spec)
	if err != nil {
		return err
	}
	var sendMu sync.Mutex
	send := func(o *nodev1.ExecOutput) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(o)
	}
	ready := make(chan struct{})
	var readyOnce sync.Once
	setReady := func() { readyOnce.Do(func() { close(ready) }) }
	defer setReady()
	proc, err := s.node.Exec(ctx, spec.SandboxId, req, outWriter{send, ready, false}, outWriter{send, ready, true})
	if err != nil {
		return err
	}
	id := newExecID()
	s.mu.Lock()
	s.execs[id] = proc
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.execs, id)
		s.mu.Unlock()
	}()
	err = send(&nodev1.ExecOutput{Output: &nodev1.ExecOutput_Started{Started: &nodev1.ExecStarted{ExecId: id, Pid: int32(proc.Pid()), Pty: proc.PTY()}}})
	setReady()
	exited := make(chan struct{})
	defer close(exited)
	kill := func() {
		_ = proc.Signal(syscall.SIGKILL)
	}
	if err != nil {
		kill()
		_, _ = proc.Wait()
		return err
	}
	// The control plane went away: the process goes too (as when its
	// output writer fails in process).
	go func() {
		select {
		case <-ctx.Done():
			kill()
		case <-exited:
		}
	}()
	if in := proc.Stdin(); in != nil {
		go s.pumpStdin(stream, in, send)
	}
	st, werr := proc.Wait()
	if werr != nil {
		return werr
	}
	return send(&nodev1.ExecOutput{Output: &nodev1.ExecOutput_Exited{Exited: &nodev1.ExecExited{Code: int32(st.Code), Signal: st.Signal}}})
}

// pumpStdin writes the stdin messages to the process until the client
// closes its side; a failed write is reported once and ends the pump.
func (s *Server) pumpStdin(stream *connect.BidiStream[nodev1.ExecInput, nodev1.ExecOutput], in io.WriteCloser, send func(*nodev1.ExecOutput) error) {
	for {
		m, err := stream.Receive()
		if err != nil {
			return
		}
		var werr error
		switch x := m.Input.(type) {
		case *nodev1.ExecInput_Stdin:
			_, werr = in.Write(x.Stdin)
		case *nodev1.ExecInput_CloseStdin:
			werr = in.Close()
		}
		if werr != nil {
			_ = send(&nodev1.ExecOutput{Output: &nodev1.ExecOutput_StdinError{StdinError: werr.Error()}})
			return
		}
	}
}

func (s *Server) execProc(id string) (node.Process, error) {
	s.mu.Lock()
	p := s.execs[id]
	s.mu.Unlock()
	if p == nil {
		return nil, fmt.Errorf("exec %q: not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	return p, nil
}

func (s *Server) SignalExec(_ context.Context, req *connect.Request[nodev1.SignalExecRequest]) (*connect.Response[nodev1.SignalExecResponse], error) {
	p, err := s.execProc(req.Msg.ExecId)
	if err != nil {
		return nil, err
	}
	if req.Msg.Signal <= 0 || req.Msg.Signal > 64 {
		return nil, invalid("signal %d: out of range", req.Msg.Signal)
	}
	if err := p.Signal(syscall.Signal(req.Msg.Signal)); err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.SignalExecResponse{}), nil
}

func (s *Server) ResizeExec(_ context.Context, req *connect.Request[nodev1.ResizeExecRequest]) (*connect.Response[nodev1.ResizeExecResponse], error) {
	p, err := s.execProc(req.Msg.ExecId)
	if err != nil {
		return nil, err
	}
	if req.Msg.Rows > 0xffff || req.Msg.Cols > 0xffff {
		return nil, invalid("size %dx%d: out of range", req.Msg.Rows, req.Msg.Cols)
	}
	if err := p.Resize(int(req.Msg.Rows), int(req.Msg.Cols)); err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.ResizeExecResponse{}), nil
}

func (s *Server) ReadFile(ctx context.Context, req *connect.Request[nodev1.ReadFileRequest], stream *connect.ServerStream[nodev1.FileChunk]) error {
	rc, err := s.node.Files(req.Msg.SandboxId).ReadFile(ctx, req.Msg.Path)
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, ChunkSize)
	for {
		n, err := rc.Read(buf)
		if n > 0 {
			// Send marshals the message before it returns: buf is free again.
			if serr := stream.Send(&nodev1.FileChunk{Data: buf[:n]}); serr != nil {
				return serr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (s *Server) WriteFile(ctx context.Context, stream *connect.ClientStream[nodev1.WriteFileInput]) (*connect.Response[nodev1.WriteFileResponse], error) {
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, invalid("write file: no header")
	}
	h := stream.Msg().GetHeader()
	if h == nil {
		return nil, invalid("write file: the first message must be the header")
	}
	pr, pw := io.Pipe()
	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		for stream.Receive() {
			d := stream.Msg().GetData()
			if d == nil && stream.Msg().GetHeader() != nil {
				pw.CloseWithError(invalid("write file: a second header"))
				return
			}
			// Blocks until the file's writer took it: the client's stream
			// waits meanwhile (no buffering here).
			if _, err := pw.Write(d); err != nil {
				return
			}
		}
		pw.CloseWithError(stream.Err()) // nil: io.EOF for the reader
	}()
	err := s.node.Files(h.SandboxId).WriteFile(ctx, h.Path, fs.FileMode(h.Mode), pr)
	pr.CloseWithError(errors.New("write file: done"))
	<-pumped // the stream is not touched after the handler returns
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.WriteFileResponse{}), nil
}

func (s *Server) ListDir(ctx context.Context, req *connect.Request[nodev1.ListDirRequest]) (*connect.Response[nodev1.ListDirResponse], error) {
	infos, err := s.node.Files(req.Msg.SandboxId).ListDir(ctx, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	out := &nodev1.ListDirResponse{}
	for _, fi := range infos {
		out.Entries = append(out.Entries, fileInfoToPB(fi))
	}
	return connect.NewResponse(out), nil
}

func (s *Server) Remove(ctx context.Context, req *connect.Request[nodev1.RemoveRequest]) (*connect.Response[nodev1.RemoveResponse], error) {
	if err := s.node.Files(req.Msg.SandboxId).Remove(ctx, req.Msg.Path, req.Msg.Recursive); err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.RemoveResponse{}), nil
}

func (s *Server) Logs(ctx context.Context, stream *connect.BidiStream[nodev1.LogsInput, nodev1.LogsOutput]) error {
	first, err := stream.Receive()
	if err != nil {
		return err
	}
	log, err := s.node.Logs(first.SandboxId)
	if err != nil {
		return err
	}
	defer log.Close()
	if err := stream.Send(&nodev1.LogsOutput{}); err != nil { // opened
		return err
	}
	buf := make([]byte, ChunkSize)
	for {
		m, err := stream.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		want := min(max(int(m.Max), 1), len(buf))
		n, rerr := log.Read(buf[:want])
		out := &nodev1.LogsOutput{Data: buf[:n]}
		if n == 0 {
			if rerr != nil && rerr != io.EOF {
				return rerr
			}
			out.Eof = true
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

func (s *Server) Leftovers(ctx context.Context, req *connect.Request[nodev1.LeftoversRequest]) (*connect.Response[nodev1.LeftoversResponse], error) {
	left, err := s.node.Leftovers(ctx, liveFromPB(req.Msg.Live))
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.LeftoversResponse{Items: left}), nil
}

func (s *Server) Adopt(_ context.Context, req *connect.Request[nodev1.AdoptRequest]) (*connect.Response[nodev1.AdoptResponse], error) {
	s.node.Adopt(req.Msg.Id, req.Msg.ImageDigest)
	return connect.NewResponse(&nodev1.AdoptResponse{}), nil
}

func (s *Server) Claim(ctx context.Context, req *connect.Request[nodev1.ClaimRequest]) (*connect.Response[nodev1.ClaimResponse], error) {
	r, err := s.startRequest(ctx, req.Msg.Spec)
	if err != nil {
		return nil, err
	}
	id, slot, ok := s.node.Claim(r)
	res := &nodev1.ClaimResponse{Id: id, Slot: int32(slot), Ok: ok}
	if pc, isPool := s.node.(prestartCounter); isPool && r.Image != nil {
		res.Ready = int32(pc.Prestarted(r.Image.Digest))
	}
	return connect.NewResponse(res), nil
}

// prestartCounter is a node that tells how many pre-started sandboxes of an
// image it has ready (node.Agent): a claim's answer carries it, for the
// control plane's placement.
type prestartCounter interface {
	Prestarted(digest string) int
}

func (s *Server) Unclaim(_ context.Context, req *connect.Request[nodev1.UnclaimRequest]) (*connect.Response[nodev1.UnclaimResponse], error) {
	s.node.Unclaim(req.Msg.Id)
	return connect.NewResponse(&nodev1.UnclaimResponse{}), nil
}

func (s *Server) Restore(ctx context.Context, req *connect.Request[nodev1.RestoreRequest]) (*connect.Response[nodev1.RestoreResponse], error) {
	live := liveFromPB(req.Msg.Live)
	if err := s.node.Restore(ctx, live); err != nil {
		return nil, err
	}
	if s.egress != nil {
		s.egress.Prune(ctx, live)
	}
	if s.identity != nil {
		s.identity.Restore(ctx, live)
	}
	return connect.NewResponse(&nodev1.RestoreResponse{}), nil
}

func (s *Server) SetPrestarted(ctx context.Context, req *connect.Request[nodev1.SetPrestartedRequest], stream *connect.ServerStream[nodev1.SetPrestartedEvent]) error {
	img, err := s.image(ctx, req.Msg.ImageRef, req.Msg.ImageDigest)
	if err != nil {
		return err
	}
	if img == nil {
		return invalid("set prestarted: image_digest is required")
	}
	var mu sync.Mutex
	return s.node.SetPrestarted(ctx, img, int(req.Msg.N), func(ready, want int) {
		mu.Lock()
		defer mu.Unlock()
		_ = stream.Send(&nodev1.SetPrestartedEvent{Ready: int32(ready), Want: int32(want)})
	})
}

func (s *Server) SetPaused(ctx context.Context, req *connect.Request[nodev1.SetPausedRequest]) (*connect.Response[nodev1.SetPausedResponse], error) {
	if err := s.node.SetPaused(ctx, req.Msg.Id, req.Msg.Paused); err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.SetPausedResponse{}), nil
}

func (s *Server) Snapshot(ctx context.Context, req *connect.Request[nodev1.SnapshotRequest], stream *connect.ServerStream[nodev1.SnapshotEvent]) error {
	sp := req.Msg.Spec
	if sp == nil {
		return invalid("snapshot: spec is required")
	}
	r := node.SnapshotRequest{ID: sp.Id, Slot: int(sp.Slot), ImageRef: sp.ImageRef, ImageDigest: sp.ImageDigest, Exclude: sp.Exclude}
	if sp.Progress {
		var mu sync.Mutex
		r.Progress = func(phase string, cur, total int64) {
			mu.Lock()
			defer mu.Unlock()
			_ = stream.Send(&nodev1.SnapshotEvent{Event: &nodev1.SnapshotEvent_Progress{Progress: &nodev1.Progress{Phase: phase, Current: cur, Total: total}}})
		}
	}
	res, err := s.node.Snapshot(ctx, r)
	if err != nil {
		return err
	}
	return stream.Send(&nodev1.SnapshotEvent{Event: &nodev1.SnapshotEvent_Result{Result: &nodev1.SnapshotResult{
		Ref: res.Ref, LocalRef: res.LocalRef, Digest: res.Digest, DiffId: res.DiffID, Size: res.Size}}})
}
