package chalkcompute

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// Sandbox is a handle to a sandbox.
type Sandbox struct {
	c    *Client
	id   string
	Info *v1.Sandbox // as of the last call that returned it
}

// ID is the sandbox id.
func (s *Sandbox) ID() string { return s.id }

type createOptions struct {
	req *v1.CreateSandboxRequest
	err error
}

// CreateOption configures Create.
type CreateOption func(*createOptions)

// WithEntrypoint runs argv as the sandbox's main process; the sandbox ends when it exits.
func WithEntrypoint(argv ...string) CreateOption {
	return func(o *createOptions) { o.req.Entrypoint = argv }
}

// WithEnv sets environment variables for the entrypoint and every exec.
func WithEnv(env map[string]string) CreateOption {
	return func(o *createOptions) { o.req.Env = env }
}

// WithWorkdir sets the working directory.
func WithWorkdir(dir string) CreateOption { return func(o *createOptions) { o.req.Workdir = dir } }

// WithCPU limits the sandbox to cores CPUs.
func WithCPU(cores float64) CreateOption { return func(o *createOptions) { o.req.Cpu = cores } }

// WithMemoryMB limits the sandbox's memory, its disk included (without it:
// the node's default, 1 GiB unless chalkd --default-memory-mb).
func WithMemoryMB(mb int64) CreateOption { return func(o *createOptions) { o.req.MemoryMb = mb } }

// WithDiskMB sets the quota of the sandbox's writable layer in MiB (0 =
// min(10 GiB, the memory limit)). The writable layer is memory-backed
// (tmpfs): what is written counts against the memory limit, so the quota
// may be at most that limit.
func WithDiskMB(mb int64) CreateOption { return func(o *createOptions) { o.req.DiskMb = mb } }

// WithTimeout sets the sandbox's lifetime (default 5 minutes, max 24 hours).
func WithTimeout(d time.Duration) CreateOption {
	return func(o *createOptions) {
		if d > 0 && d < time.Second {
			o.err = fmt.Errorf("timeout %v: at least one second", d)
		}
		o.req.TimeoutSeconds = int64(d / time.Second)
	}
}

// WithIdleTimeout ends the sandbox after d without exec or file activity.
func WithIdleTimeout(d time.Duration) CreateOption {
	return func(o *createOptions) { o.req.IdleTimeoutSeconds = int64(d / time.Second) }
}

// WithLabels attaches labels.
func WithLabels(l map[string]string) CreateOption { return func(o *createOptions) { o.req.Labels = l } }

// WithNetworkPolicies binds policies (created or updated by name first). Several
// policies allow the union of their destinations.
func WithNetworkPolicies(ps ...NetworkPolicy) CreateOption {
	return func(o *createOptions) {
		for _, p := range ps {
			o.req.InlinePolicies = append(o.req.InlinePolicies, p.proto())
		}
	}
}

// WithNetworkPolicyNames binds existing policies by name.
func WithNetworkPolicyNames(names ...string) CreateOption {
	return func(o *createOptions) { o.req.NetworkPolicies = append(o.req.NetworkPolicies, names...) }
}

// WithAWSRole makes the sandbox assume role via web identity federation.
func WithAWSRole(arn string) CreateOption { return func(o *createOptions) { o.req.AwsRoleArn = arn } }

// WithAWSRegion sets AWS_REGION and AWS_DEFAULT_REGION for the role given
// with WithAWSRole (default: the node's, chalkd --aws-region, else us-east-1).
func WithAWSRegion(region string) CreateOption {
	return func(o *createOptions) { o.req.AwsRegion = region }
}

// WithGCPWorkloadProvider configures GCP workload identity federation.
func WithGCPWorkloadProvider(p string) CreateOption {
	return func(o *createOptions) { o.req.GcpWorkloadProvider = p }
}

// WithGCPServiceAccount makes the federated GCP token impersonate the
// service account email (with WithGCPWorkloadProvider): Google client
// libraries then act as that service account.
func WithGCPServiceAccount(email string) CreateOption {
	return func(o *createOptions) { o.req.GcpServiceAccount = email }
}

// Create creates a sandbox from img and returns once it is running.
func (c *Client) Create(ctx context.Context, img *Image, opts ...CreateOption) (*Sandbox, error) {
	o := &createOptions{req: &v1.CreateSandboxRequest{}}
	if img == nil {
		return nil, errors.New("create: an image is required")
	}
	if err := img.apply(ctx, c, o.req); err != nil {
		return nil, err
	}
	for _, opt := range opts {
		opt(o)
	}
	if o.err != nil {
		return nil, o.err
	}
	if err := checkStrings("image", o.req.Image, "workdir", o.req.Workdir); err != nil {
		return nil, err
	}
	if err := checkCommand("entrypoint", o.req.Entrypoint, o.req.Env); err != nil {
		return nil, err
	}
	resp, err := c.sandbox.Create(ctx, connect.NewRequest(o.req))
	if err != nil {
		return nil, err
	}
	return &Sandbox{c: c, id: resp.Msg.Id, Info: resp.Msg}, nil
}

// Sandbox returns a handle to an existing sandbox.
func (c *Client) Sandbox(ctx context.Context, id string) (*Sandbox, error) {
	resp, err := c.sandbox.Get(ctx, connect.NewRequest(&v1.GetSandboxRequest{Id: id}))
	if err != nil {
		return nil, err
	}
	return &Sandbox{c: c, id: id, Info: resp.Msg}, nil
}

// List lists sandboxes (all=false: only live ones).
func (c *Client) List(ctx context.Context, all bool) ([]*v1.Sandbox, error) {
	resp, err := c.sandbox.List(ctx, connect.NewRequest(&v1.ListSandboxesRequest{All: all}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Sandboxes, nil
}

// Refresh reloads Info.
func (s *Sandbox) Refresh(ctx context.Context) (*v1.Sandbox, error) {
	resp, err := s.c.sandbox.Get(ctx, connect.NewRequest(&v1.GetSandboxRequest{Id: s.id}))
	if err != nil {
		return nil, err
	}
	s.Info = resp.Msg
	return resp.Msg, nil
}

// Terminate ends the sandbox and returns its final state.
func (s *Sandbox) Terminate(ctx context.Context) (*v1.Sandbox, error) {
	resp, err := s.c.sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: s.id}))
	if err != nil {
		return nil, err
	}
	s.Info = resp.Msg
	return resp.Msg, nil
}

// Wait blocks until the sandbox ends (or ctx ends) and returns its final state.
// On a fleet, a sandbox whose node stops answering ends with end_reason
// "lost" and Wait returns then; if the node comes back soon with the
// sandbox still running, the control plane re-adopts it: a later read
// (Client.Sandbox) shows it running again, and Wait waits for its real end.
func (s *Sandbox) Wait(ctx context.Context) (*v1.Sandbox, error) {
	resp, err := s.c.sandbox.Wait(ctx, connect.NewRequest(&v1.WaitSandboxRequest{Id: s.id}))
	if err != nil {
		return nil, err
	}
	s.Info = resp.Msg
	return resp.Msg, nil
}

type execOptions struct {
	req            *v1.ExecRequest
	stdout, stderr io.Writer
}

// ExecOption configures Exec and Start.
type ExecOption func(*execOptions)

// ExecEnv sets extra environment variables.
func ExecEnv(env map[string]string) ExecOption { return func(o *execOptions) { o.req.Env = env } }

// ExecWorkdir sets the working directory.
func ExecWorkdir(dir string) ExecOption { return func(o *execOptions) { o.req.Workdir = dir } }

// ExecTimeout kills the process after d.
func ExecTimeout(d time.Duration) ExecOption {
	return func(o *execOptions) { o.req.TimeoutSeconds = int64((d + time.Second - 1) / time.Second) }
}

// ExecUser runs as uid[:gid].
func ExecUser(u string) ExecOption { return func(o *execOptions) { o.req.User = u } }

// ExecStdin keeps stdin open: write it with Process.Stdin.
func ExecStdin() ExecOption { return func(o *execOptions) { o.req.Stdin = true } }

// ExecPTY runs the command on a pseudo-terminal of rows x cols (0, 0: 24x80)
// allocated inside the sandbox: the program sees a terminal (isatty, job
// control, ^C typed on stdin interrupts it), its output arrives on Stdout,
// Stderr gets nothing, and Process.Resize resizes it. Add ExecStdin to type
// into it; closing its stdin does not close the terminal (type "\x04").
func ExecPTY(rows, cols int) ExecOption {
	return func(o *execOptions) {
		o.req.Pty = true
		o.req.Rows, o.req.Cols = uint32(max(rows, 0)), uint32(max(cols, 0))
	}
}

// ExecTerm sets TERM for ExecPTY (default xterm-256color).
func ExecTerm(term string) ExecOption { return func(o *execOptions) { o.req.Term = term } }

// Stdout streams stdout to w as it is produced.
func Stdout(w io.Writer) ExecOption { return func(o *execOptions) { o.stdout = w } }

// Stderr streams stderr to w as it is produced.
func Stderr(w io.Writer) ExecOption { return func(o *execOptions) { o.stderr = w } }

// Process is a command running in a sandbox.
type Process struct {
	sb     *Sandbox
	ExecID string
	Pid    int
	stream *connect.ServerStreamForClient[v1.ExecEvent]
	o      *execOptions
	done   chan struct{}
	exit   *v1.ExecExited
	err    error
	stdin  *stdinWriter
}

// Start starts argv in the sandbox; output goes to the Stdout/Stderr writers
// as it is produced.
func (s *Sandbox) Start(ctx context.Context, argv []string, opts ...ExecOption) (*Process, error) {
	p, err := s.start(ctx, argv, opts)
	if err != nil {
		return nil, err
	}
	go p.pump()
	return p, nil
}

// start starts argv; the caller runs the process's pump.
func (s *Sandbox) start(ctx context.Context, argv []string, opts []ExecOption) (*Process, error) {
	o := &execOptions{req: &v1.ExecRequest{SandboxId: s.id, Argv: argv}, stdout: io.Discard, stderr: io.Discard}
	for _, opt := range opts {
		opt(o)
	}
	if err := checkStrings("workdir", o.req.Workdir, "user", o.req.User); err != nil {
		return nil, err
	}
	if err := checkCommand("argv", o.req.Argv, o.req.Env); err != nil {
		return nil, err
	}
	stream, err := s.c.sandbox.Exec(ctx, connect.NewRequest(o.req))
	if err != nil {
		return nil, fromConnect(err)
	}
	if !stream.Receive() {
		err := stream.Err()
		stream.Close()
		if err == nil {
			err = errors.New("exec: stream ended before the process started")
		}
		return nil, fromConnect(err)
	}
	started := stream.Msg().GetStarted()
	if started == nil {
		stream.Close()
		return nil, errors.New("exec: protocol error: first event is not 'started'")
	}
	p := &Process{sb: s, ExecID: started.ExecId, Pid: int(started.Pid), stream: stream, o: o, done: make(chan struct{})}
	if o.req.Stdin {
		p.stdin = &stdinWriter{p: p, ctx: context.WithoutCancel(ctx)}
	}
	return p, nil
}

func (p *Process) pump() {
	defer close(p.done)
	defer p.stream.Close()
	for p.stream.Receive() {
		switch ev := p.stream.Msg().Event.(type) {
		case *v1.ExecEvent_Stdout:
			if _, err := p.o.stdout.Write(ev.Stdout); err != nil {
				p.err = err
				return
			}
		case *v1.ExecEvent_Stderr:
			if _, err := p.o.stderr.Write(ev.Stderr); err != nil {
				p.err = err
				return
			}
		case *v1.ExecEvent_Exited:
			p.exit = ev.Exited
		}
	}
	if err := p.stream.Err(); err != nil {
		p.err = fromConnect(err)
	} else if p.exit == nil {
		p.err = errors.New("exec: stream ended without an exit status")
	}
}

// ExitStatus is how a process ended.
type ExitStatus struct {
	Code     int
	Signal   string
	TimedOut bool
}

// Wait waits for the process to exit and all its output to be delivered.
func (p *Process) Wait() (ExitStatus, error) {
	<-p.done
	if p.err != nil {
		return ExitStatus{}, p.err
	}
	return ExitStatus{Code: int(p.exit.ExitCode), Signal: p.exit.Signal, TimedOut: p.exit.TimedOut}, nil
}

// Stdin is the process's stdin (nil unless started with ExecStdin). Close sends EOF.
func (p *Process) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}

// Signal sends a signal (e.g. "TERM", "KILL") to the process.
func (p *Process) Signal(ctx context.Context, sig string) error {
	_, err := p.sb.c.sandbox.SignalExec(ctx, connect.NewRequest(&v1.SignalExecRequest{SandboxId: p.sb.id, ExecId: p.ExecID, Signal: sig}))
	return err
}

// Resize sets the size of the terminal of a process started with ExecPTY
// (rows and cols in 1..1000); the program gets SIGWINCH.
func (p *Process) Resize(ctx context.Context, rows, cols int) error {
	if rows < 1 || rows > 1000 || cols < 1 || cols > 1000 {
		return fmt.Errorf("resize to %dx%d: rows and cols must be 1..1000: %w", rows, cols, errdefs.ErrInvalidArgument)
	}
	_, err := p.sb.c.sandbox.ResizeExec(ctx, connect.NewRequest(&v1.ResizeExecRequest{
		SandboxId: p.sb.id, ExecId: p.ExecID, Rows: uint32(rows), Cols: uint32(cols),
	}))
	return fromConnect(err)
}

type stdinWriter struct {
	p   *Process
	ctx context.Context
	mu  sync.Mutex
}

func (w *stdinWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for off := 0; off < len(b); off += 1 << 20 {
		end := min(off+1<<20, len(b))
		if _, err := w.p.sb.c.sandbox.WriteStdin(w.ctx, connect.NewRequest(&v1.WriteStdinRequest{
			SandboxId: w.p.sb.id, ExecId: w.p.ExecID, Data: b[off:end],
		})); err != nil {
			return off, err
		}
	}
	return len(b), nil
}

func (w *stdinWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err := w.p.sb.c.sandbox.WriteStdin(w.ctx, connect.NewRequest(&v1.WriteStdinRequest{SandboxId: w.p.sb.id, ExecId: w.p.ExecID, Close: true}))
	return err
}

// ExecResult is a finished command's output and status.
type ExecResult struct {
	Stdout, Stderr []byte
	ExitStatus
}

// Exec runs argv to completion and returns its output. Use Start to stream.
func (s *Sandbox) Exec(ctx context.Context, argv []string, opts ...ExecOption) (*ExecResult, error) {
	var out, errb bytes.Buffer
	// Exec only waits: the server may send the start with the first output
	// or the exit (one write less for a short command).
	opts = append(opts, Stdout(&out), Stderr(&errb), func(o *execOptions) { o.req.Wait = !o.req.Stdin })
	p, err := s.start(ctx, argv, opts)
	if err != nil {
		return nil, err
	}
	p.pump() // here: no goroutine and hand-over per exec
	st, err := p.Wait()
	if err != nil {
		return nil, err
	}
	return &ExecResult{Stdout: out.Bytes(), Stderr: errb.Bytes(), ExitStatus: st}, nil
}

// WriteFile writes data to path in the sandbox (parents created, replaced atomically).
func (s *Sandbox) WriteFile(ctx context.Context, path string, data []byte, mode os.FileMode) error {
	if err := checkStrings("path", path); err != nil {
		return err
	}
	_, err := s.c.sandbox.WriteFile(ctx, connect.NewRequest(&v1.WriteFileRequest{SandboxId: s.id, Path: path, Data: data, Mode: uint32(mode.Perm())}))
	return err
}

// ReadFile reads a whole file from the sandbox.
func (s *Sandbox) ReadFile(ctx context.Context, path string) ([]byte, error) {
	var buf bytes.Buffer
	if err := s.CopyFile(ctx, path, &buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// CopyFile streams a file from the sandbox to w.
func (s *Sandbox) CopyFile(ctx context.Context, path string, w io.Writer) error {
	if err := checkStrings("path", path); err != nil {
		return err
	}
	stream, err := s.c.sandbox.ReadFile(ctx, connect.NewRequest(&v1.ReadFileRequest{SandboxId: s.id, Path: path}))
	if err != nil {
		return fromConnect(err)
	}
	defer stream.Close()
	for stream.Receive() {
		if _, err := w.Write(stream.Msg().Data); err != nil {
			return err
		}
	}
	return fromConnect(stream.Err())
}

// ListFiles lists a directory in the sandbox.
func (s *Sandbox) ListFiles(ctx context.Context, path string) ([]*v1.FileInfo, error) {
	if err := checkStrings("path", path); err != nil {
		return nil, err
	}
	resp, err := s.c.sandbox.ListFiles(ctx, connect.NewRequest(&v1.ListFilesRequest{SandboxId: s.id, Path: path}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Files, nil
}

// RemoveFile removes a file (or, with recursive, a directory tree).
func (s *Sandbox) RemoveFile(ctx context.Context, path string, recursive bool) error {
	if err := checkStrings("path", path); err != nil {
		return err
	}
	_, err := s.c.sandbox.RemoveFile(ctx, connect.NewRequest(&v1.RemoveFileRequest{SandboxId: s.id, Path: path, Recursive: recursive}))
	return err
}

// Logs copies the sandbox's console output to w; with follow, until it ends.
func (s *Sandbox) Logs(ctx context.Context, w io.Writer, follow bool) error {
	stream, err := s.c.sandbox.Logs(ctx, connect.NewRequest(&v1.LogsRequest{SandboxId: s.id, Follow: follow}))
	if err != nil {
		return fromConnect(err)
	}
	defer stream.Close()
	for stream.Receive() {
		if _, err := w.Write(stream.Msg().Data); err != nil {
			return err
		}
	}
	return fromConnect(stream.Err())
}

// EgressLog lists what the sandbox's network policy blocked recently.
func (s *Sandbox) EgressLog(ctx context.Context) ([]*v1.EgressDrop, error) {
	resp, err := s.c.sandbox.EgressLog(ctx, connect.NewRequest(&v1.EgressLogRequest{SandboxId: s.id}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Drops, nil
}
