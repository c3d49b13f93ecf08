package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"path"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/store"
)

type sandboxService struct{ s *Server }

var _ computev1connect.SandboxServiceHandler = (*sandboxService)(nil)

func invalid(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, errdefs.ErrInvalidArgument)...)
}

// validateCreate checks a create request and fills defaults.
func validateCreate(r *v1.CreateSandboxRequest) (timeout, idle time.Duration, err error) {
	if r.Image == "" && r.ImageSpecJson == "" {
		return 0, 0, invalid("image: required (an image reference or an image spec)")
	}
	if r.TimeoutSeconds < 0 || r.TimeoutSeconds > int64(MaxTimeout/time.Second) {
		return 0, 0, invalid("timeout_seconds %d: must be between 1 and %d", r.TimeoutSeconds, int64(MaxTimeout/time.Second))
	}
	timeout = time.Duration(r.TimeoutSeconds) * time.Second
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	if r.IdleTimeoutSeconds < 0 || r.IdleTimeoutSeconds > int64(MaxTimeout/time.Second) {
		return 0, 0, invalid("idle_timeout_seconds %d: must be between 0 and %d", r.IdleTimeoutSeconds, int64(MaxTimeout/time.Second))
	}
	idle = time.Duration(r.IdleTimeoutSeconds) * time.Second
	if r.Cpu < 0 || math.IsNaN(r.Cpu) || math.IsInf(r.Cpu, 0) || r.Cpu > float64(runtime.NumCPU()*4) {
		return 0, 0, invalid("cpu %v: must be between 0 (unlimited) and %d cores", r.Cpu, runtime.NumCPU()*4)
	}
	if r.MemoryMb < 0 || r.MemoryMb > 1<<22 {
		return 0, 0, invalid("memory_mb %d: must be between 0 (the node's default) and %d", r.MemoryMb, 1<<22)
	}
	if r.MemoryMb > 0 && r.MemoryMb < 8 {
		return 0, 0, invalid("memory_mb %d: at least 8 MiB is needed to start a sandbox", r.MemoryMb)
	}
	if r.DiskMb < 0 || r.DiskMb > 1<<20 {
		return 0, 0, invalid("disk_mb %d: must be between 0 (the node's default) and %d", r.DiskMb, 1<<20)
	}
	if r.Workdir != "" && !path.IsAbs(r.Workdir) {
		return 0, 0, invalid("workdir %q: must be an absolute path", r.Workdir)
	}
	if err := noNUL("image", r.Image); err != nil {
		return 0, 0, err
	}
	if err := noNUL("workdir", r.Workdir); err != nil {
		return 0, 0, err
	}
	if err := noNUL("entrypoint", r.Entrypoint...); err != nil {
		return 0, 0, err
	}
	if err := validLabels(r.Labels); err != nil {
		return 0, 0, err
	}
	if err := validateEnv(r.Env); err != nil {
		return 0, 0, err
	}
	if err := createArgBounds(r.Entrypoint, r.Env); err != nil {
		return 0, 0, err
	}
	if err := validateFederation(r); err != nil {
		return 0, 0, err
	}
	return timeout, idle, nil
}

// validateFederation checks the cloud federation fields before anything is
// built or started (the identity hook checks them again when it writes the
// files).
func validateFederation(r *v1.CreateSandboxRequest) error {
	if r.AwsRegion != "" && r.AwsRoleArn == "" {
		return invalid("aws_region %q: needs aws_role_arn (the region is set for the role's AWS SDK credentials)", r.AwsRegion)
	}
	if err := metadata.ValidateAWS(r.AwsRoleArn, r.AwsRegion); err != nil {
		return err
	}
	return metadata.ValidateGCP(r.GcpWorkloadProvider, r.GcpServiceAccount)
}

// resources applies the node's defaults and bounds to a create's memory
// limit and disk quota (MiB). A sandbox's disk is a tmpfs: its pages are
// memory, charged to the sandbox's memory cgroup (the writer's), so the
// memory limit bounds files and processes together and the quota can be at
// most the limit. The default quota is the node's, capped at the limit;
// neither can exceed the node's memory.
func (s *Server) resources(memMB, diskMB int64) (int64, int64, error) {
	if memMB == 0 {
		memMB = s.cfg.DefaultMemoryMB
	}
	if node := s.cfg.NodeMemoryMB; node > 0 && memMB > node {
		return 0, 0, invalid("memory_mb %d: more than this node's memory (%d MiB)", memMB, node)
	}
	if diskMB == 0 {
		return memMB, min(s.cfg.DefaultDiskMB, memMB), nil
	}
	if diskMB > memMB {
		return 0, 0, invalid("disk_mb %d: more than the memory limit (memory_mb %d): a sandbox's disk is memory (a tmpfs charged to its memory limit); ask for memory_mb of at least %d", diskMB, memMB, diskMB)
	}
	return memMB, diskMB, nil
}

// noNUL refuses values holding a NUL byte: they go to the OS as argv,
// paths or names, which end at the first NUL (an entrypoint "sh\x00" would
// start and then fail with 127 instead of being refused here).
func noNUL(field string, vals ...string) error {
	for i, v := range vals {
		if strings.IndexByte(v, 0) >= 0 {
			if len(vals) > 1 || field == "entrypoint" || field == "argv" {
				return invalid("%s[%d]: contains a NUL byte", field, i)
			}
			return invalid("%s: contains a NUL byte", field)
		}
	}
	return nil
}

// Bounds of a create's entrypoint and env. They are stored whole in the
// sandbox's record (every read of it, every replica's and the fleet's
// copies) and were bounded only by the API's message limit; the kernel's
// execve refuses an argument or environment string over 128 KiB
// (MAX_ARG_STRLEN) and, with the default 8 MiB stack, more than 2 MiB of
// them together, so an entrypoint past these could never start anyway.
const (
	MaxEntrypointArgs = 4096      // entrypoint elements
	MaxEnvVars        = 4096      // env entries
	MaxArgBytes       = 128 << 10 // one entrypoint element, one env NAME=value
	MaxArgsTotalBytes = 1 << 20   // the entrypoint's and env's bytes together
)

// createArgBounds checks a create's entrypoint and env against the bounds
// above, naming the element and the numbers.
func createArgBounds(entrypoint []string, env map[string]string) error {
	return argBounds("entrypoint", entrypoint, env)
}

// argBounds checks a command line (a create's entrypoint, an exec's argv)
// and its env against the bounds above; field names the command line.
func argBounds(field string, args []string, env map[string]string) error {
	if n := len(args); n > MaxEntrypointArgs {
		return invalid("%s: %d elements (at most %d, api.MaxEntrypointArgs)", field, n, MaxEntrypointArgs)
	}
	if n := len(env); n > MaxEnvVars {
		return invalid("env: %d variables (at most %d, api.MaxEnvVars)", n, MaxEnvVars)
	}
	total := 0
	for i, a := range args {
		if len(a) > MaxArgBytes {
			return invalid("%s[%d]: %d bytes (at most %d, api.MaxArgBytes)", field, i, len(a), MaxArgBytes)
		}
		total += len(a)
	}
	for k, v := range env {
		if n := len(k) + 1 + len(v); n > MaxArgBytes {
			return invalid("env %.64s: %d bytes as NAME=value (at most %d, api.MaxArgBytes)", k, n, MaxArgBytes)
		}
		total += len(k) + 1 + len(v)
	}
	if total > MaxArgsTotalBytes {
		return invalid("%s and env: %d bytes together (at most %d, api.MaxArgsTotalBytes)", field, total, MaxArgsTotalBytes)
	}
	return nil
}

func validateEnv(env map[string]string) error {
	for k, v := range env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return invalid("env name %q: must be non-empty without '=' or NUL", k)
		}
		if strings.ContainsRune(v, 0) {
			return invalid("env %s: value contains NUL", k)
		}
	}
	return nil
}

func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

func (h *sandboxService) Create(ctx context.Context, req *connect.Request[v1.CreateSandboxRequest]) (_ *connect.Response[v1.Sandbox], err error) {
	s := h.s
	t0 := time.Now()
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	r := req.Msg
	timeout, idle, err := validateCreate(r)
	if err != nil {
		return nil, err
	}
	quota, err := s.quotaOf(ctx, p.OrgID)
	if err != nil {
		return nil, err
	}
	chargeDefaults(r, quota)
	if r.MemoryMb, r.DiskMb, err = s.resources(r.MemoryMb, r.DiskMb); err != nil {
		return nil, err
	}
	sb := &store.Sandbox{
		ID: newID(), OrgID: p.OrgID, State: store.StateCreating, Image: r.Image,
		Entrypoint: r.Entrypoint, Env: r.Env, Workdir: r.Workdir, CPU: r.Cpu, MemoryMB: r.MemoryMb,
		Timeout: timeout, IdleTimeout: idle, Tunnels: r.Tunnels, Labels: r.Labels, CreatedBy: p.Subject,
		AWSRoleARN: r.AwsRoleArn, AWSRegion: r.AwsRegion, GCPProvider: r.GcpWorkloadProvider,
		GCPServiceAccount: r.GcpServiceAccount, CreatedAt: time.Now().UTC(),
	}
	// Policies first: a bad policy must fail before anything is built or started.
	policies, err := s.resolvePolicies(ctx, p.OrgID, r.NetworkPolicies, r.InlinePolicies)
	if err != nil {
		return nil, err
	}
	for _, pol := range policies {
		sb.Policies = append(sb.Policies, pol.Name)
	}
	if err := s.ensureTunnels(ctx, p.OrgID, r.Tunnels); err != nil {
		return nil, err
	}
	ref := r.Image
	var mounts []store.Mount
	if r.ImageSpecJson != "" {
		if s.cfg.Images == nil {
			return nil, fmt.Errorf("image specs: builds are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
		}
		if err := s.specVisible(ctx, p.OrgID, []byte(r.ImageSpecJson)); err != nil {
			return nil, err
		}
		res, err := s.cfg.Images.Build(ctx, []byte(r.ImageSpecJson), false, nil)
		if err != nil {
			return nil, err
		}
		if res.Release != nil {
			// The mounts' content is held (upload GC) until this create
			// ends: its record, which refers to them, exists by then.
			defer res.Release()
		}
		if err := s.store.AddOrgImages(ctx, p.OrgID, res.Hash, res.Digest, res.Ref); err != nil {
			return nil, err
		}
		ref, sb.ImageHash, mounts = res.Ref, res.Hash, res.Mounts
		if sb.Image == "" {
			sb.Image = res.Hash
		}
	}
	sb.Mounts = mounts
	if err := s.imageVisible(ctx, p.OrgID, ref); err != nil {
		return nil, err
	}
	if strings.HasPrefix(ref, "sha256:") && s.cfg.Images != nil {
		// An image hash from a build (as `chalk compute image build` prints).
		built, ok := s.cfg.Images.RefForHash(ctx, ref)
		if !ok {
			return nil, fmt.Errorf("image %s: no image with this hash was built here: %w", ref, errdefs.ErrNotFound)
		}
		sb.ImageHash, ref = ref, built
	}
	t1 := time.Now()
	img, err := s.node.EnsureImage(ctx, ref, nil)
	if err != nil {
		return nil, err
	}
	t2 := time.Now()
	if err := s.imageVisible(ctx, p.OrgID, img.Digest); err != nil {
		return nil, fmt.Errorf("image %q: %w", r.Image, errdefs.ErrNotFound)
	}
	sb.ImageDigest, sb.ImageWarm, sb.LocalRef = img.Digest, img.Warm, img.Ref
	if sb.ImageHash == "" {
		sb.ImageHash = img.Digest
	}
	if s.cfg.Policies != nil {
		if sb.PolicyHash, err = s.cfg.Policies.Hash(policies); err != nil {
			return nil, err
		}
	}
	startReq := node.StartRequest{
		Image: img, Entrypoint: r.Entrypoint, Env: envList(r.Env), Workdir: r.Workdir,
		CPU: r.Cpu, Memory: r.MemoryMb << 20, DiskMB: r.DiskMb,
	}
	// A pre-started sandbox fits unless the sandbox needs binds made at
	// container start (mount-strategy files); the node checks the rest.
	// (Tunnel devices are added after start, by the Started hook, either way.)
	t3 := time.Now()
	claimed := false
	if len(mounts) == 0 {
		if id, slot, ok := s.node.Claim(startReq); ok {
			sb.ID, sb.Slot, claimed = id, slot, true
		}
	}
	if sb.Slot == 0 {
		reserve := startReq
		reserve.ID = sb.ID
		if sb.Slot, err = s.node.ReserveSlot(reserve); err != nil {
			return nil, err
		}
	}
	defer func(id string) {
		if err != nil {
			s.node.Unclaim(id) // a no-op once Start has taken it
		}
	}(sb.ID)
	if p, ok := s.node.(interface{ NodeOf(id string) string }); ok {
		sb.Node = p.NodeOf(sb.ID) // fleet: every replica routes its calls there
	}
	t4 := time.Now()
	err = s.store.CreateSandboxWithin(ctx, sb, quota)
	if p, ok := s.node.(interface{ Recorded(id string) }); ok {
		p.Recorded(sb.ID) // fleet: the next placement (any replica) counts this one
	}
	if err != nil {
		return nil, err
	}
	t5 := time.Now()
	setAuditObject(ctx, sb.ID)
	if err = s.launch(ctx, sb, startReq, policies); err != nil {
		return nil, err
	}
	s.log.Debug("sandbox created", "sandbox", sb.ID, "prestarted", claimed, "checks", t1.Sub(t0)+t3.Sub(t2),
		"ensure_image", t2.Sub(t1), "claim", t4.Sub(t3), "record", t5.Sub(t4), "launch", time.Since(t5))
	return connect.NewResponse(toProto(sb)), nil
}

// Charges for sandboxes without limits where the org has a quota on them:
// such a sandbox gets (and is counted at) these limits.
const (
	defaultQuotaCPU      = 1.0
	defaultQuotaMemoryMB = 512
)

// chargeDefaults gives a create request without a cpu (memory) limit the
// default one when its org's quota limits total vCPU (memory).
func chargeDefaults(r *v1.CreateSandboxRequest, q store.Quota) {
	if q.MaxVCPU > 0 && r.Cpu == 0 {
		r.Cpu = math.Min(defaultQuotaCPU, q.MaxVCPU)
	}
	if q.MaxMemoryMB > 0 && r.MemoryMb == 0 {
		r.MemoryMb = min(defaultQuotaMemoryMB, q.MaxMemoryMB)
	}
}

// sandboxFor loads a sandbox the caller may see: users see their org's,
// workloads only themselves.
func (s *Server) sandboxFor(ctx context.Context, id string) (*store.Sandbox, error) {
	p, err := caller(ctx)
	if err != nil {
		return nil, err
	}
	if id == "" {
		return nil, invalid("sandbox id: required")
	}
	if p.IsWorkload() && p.SandboxID != id {
		return nil, fmt.Errorf("workload %s may only see itself: %w", p.Subject, errdefs.ErrPermissionDenied)
	}
	sb := takeSandbox(ctx, id)
	if sb == nil {
		if sb, err = s.store.GetSandbox(ctx, id); err != nil {
			return nil, err
		}
	}
	if sb.OrgID != p.OrgID {
		return nil, fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	return sb, nil
}

// runningFor is sandboxFor for users, requiring the sandbox to run.
func (s *Server) runningFor(ctx context.Context, id string) (*store.Sandbox, error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	sb, err := s.sandboxFor(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := notRunning(sb); err != nil {
		return nil, err
	}
	s.touch(id)
	return sb, nil
}

func (h *sandboxService) Get(ctx context.Context, req *connect.Request[v1.GetSandboxRequest]) (*connect.Response[v1.Sandbox], error) {
	sb, err := h.s.sandboxFor(ctx, req.Msg.Id)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(toProto(sb)), nil
}

func (h *sandboxService) List(ctx context.Context, req *connect.Request[v1.ListSandboxesRequest]) (*connect.Response[v1.ListSandboxesResponse], error) {
	p, err := user(ctx)
	if err != nil {
		return nil, err
	}
	sbs, err := h.s.store.ListSandboxes(ctx, p.OrgID, !req.Msg.All)
	if err != nil {
		return nil, err
	}
	out := &v1.ListSandboxesResponse{}
	for _, sb := range sbs {
		out.Sandboxes = append(out.Sandboxes, toProto(sb))
	}
	return connect.NewResponse(out), nil
}

func (h *sandboxService) Wait(ctx context.Context, req *connect.Request[v1.WaitSandboxRequest]) (*connect.Response[v1.Sandbox], error) {
	if _, err := h.s.sandboxFor(ctx, req.Msg.Id); err != nil {
		return nil, err
	}
	if req.Msg.TimeoutSeconds < 0 {
		return nil, invalid("timeout_seconds %d: must not be negative", req.Msg.TimeoutSeconds)
	}
	if req.Msg.TimeoutSeconds > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.Msg.TimeoutSeconds)*time.Second)
		defer cancel()
	}
	if err := h.s.WaitEnded(ctx, req.Msg.Id); err != nil {
		return nil, fmt.Errorf("wait for sandbox %q: %w", req.Msg.Id, errdefs.ErrDeadlineExceeded)
	}
	sb, err := h.s.store.GetSandbox(ctx, req.Msg.Id)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(toProto(sb)), nil
}

func (h *sandboxService) Terminate(ctx context.Context, req *connect.Request[v1.TerminateSandboxRequest]) (*connect.Response[v1.Sandbox], error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	sb, err := h.s.sandboxFor(ctx, req.Msg.Id)
	if err != nil {
		return nil, err
	}
	h.s.end(sb.ID, "terminated")
	sb, err = h.s.store.GetSandbox(ctx, sb.ID)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(toProto(sb)), nil
}

// startHold bounds how long an exec's started event waits for the next
// message when its caller only waits (ExecRequest.wait). (A variable for
// tests.)
var startHold = 10 * time.Millisecond

// execEntry is a running exec whose stdin or signals are still reachable.
type execEntry struct {
	sandboxID string
	proc      node.Process
	stdinMu   sync.Mutex
}

// streamWriter sends output chunks as exec events. procapi calls it from one
// goroutine; the mutex orders it against the started and exited events.
type streamWriter struct {
	mu     *sync.Mutex
	stream *connect.ServerStream[v1.ExecEvent]
	stderr bool
	touch  func()
	ready  <-chan struct{} // closed once the started event is sent
}

func (w streamWriter) Write(b []byte) (int, error) {
	<-w.ready
	ev := &v1.ExecEvent{}
	data := append([]byte(nil), b...)
	if w.stderr {
		ev.Event = &v1.ExecEvent_Stderr{Stderr: data}
	} else {
		ev.Event = &v1.ExecEvent_Stdout{Stdout: data}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.touch()
	if err := w.stream.Send(ev); err != nil {
		return 0, err
	}
	return len(b), nil
}

func (h *sandboxService) Exec(ctx context.Context, req *connect.Request[v1.ExecRequest], stream *connect.ServerStream[v1.ExecEvent]) error {
	s := h.s
	r := req.Msg
	sb, err := s.runningFor(ctx, r.SandboxId)
	if err != nil {
		return err
	}
	if len(r.Argv) == 0 || r.Argv[0] == "" {
		return invalid("argv: a command is required")
	}
	if r.TimeoutSeconds < 0 {
		return invalid("timeout_seconds %d: must not be negative", r.TimeoutSeconds)
	}
	if r.Workdir != "" && !path.IsAbs(r.Workdir) {
		return invalid("workdir %q: must be an absolute path", r.Workdir)
	}
	if err := noNUL("argv", r.Argv...); err != nil {
		return err
	}
	if err := noNUL("workdir", r.Workdir); err != nil {
		return err
	}
	if err := noNUL("user", r.User); err != nil {
		return err
	}
	if err := validateEnv(r.Env); err != nil {
		return err
	}
	if err := argBounds("argv", r.Argv, r.Env); err != nil {
		return err
	}
	tty, err := execPTY(r)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	touch := func() { s.touch(sb.ID) }
	ready := make(chan struct{})
	defer func() {
		select {
		case <-ready:
		default:
			close(ready)
		}
	}()
	// A caller that only waits (and sends no stdin) gets the started event
	// with the first output or the exit status, in one write.
	wait := r.Wait && !r.Stdin
	proc, err := s.node.Exec(ctx, sb.ID, procapi.ExecRequest{
		Argv: r.Argv, Env: envList(r.Env), Dir: r.Workdir, Stdin: r.Stdin, User: r.User, PTY: tty, Wait: wait,
	}, streamWriter{&mu, stream, false, touch, ready}, streamWriter{&mu, stream, true, touch, ready})
	if err != nil {
		return fmt.Errorf("exec in sandbox %q: %w", sb.ID, err)
	}
	id := newID()[3:]
	s.mu.Lock()
	s.execs[id] = &execEntry{sandboxID: sb.ID, proc: proc}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.execs, id)
		s.mu.Unlock()
	}()
	mu.Lock()
	if wait && holdNextFlush(ctx) {
		// Flushed by the next message, or here after startHold; never
		// once the handler has returned (ended, under mu).
		ended := false
		t := time.AfterFunc(startHold, func() {
			mu.Lock()
			defer mu.Unlock()
			if !ended {
				flushPending(ctx)
			}
		})
		defer func() {
			t.Stop()
			mu.Lock()
			ended = true
			mu.Unlock()
		}()
	}
	err = stream.Send(&v1.ExecEvent{Event: &v1.ExecEvent_Started{Started: &v1.ExecStarted{ExecId: id, Pid: int32(proc.Pid())}}})
	mu.Unlock()
	close(ready)
	if err != nil {
		_ = proc.Signal(syscall.SIGKILL)
		_, _ = proc.Wait()
		return err
	}
	// The per-exec timeout kills the process (group); the exit status then
	// reports the kill and timed_out.
	var timedOut atomic.Bool
	if r.TimeoutSeconds > 0 {
		t := time.AfterFunc(time.Duration(r.TimeoutSeconds)*time.Second, func() {
			timedOut.Store(true)
			_ = proc.Signal(syscall.SIGKILL)
		})
		defer t.Stop()
	}
	st, werr := proc.Wait()
	if werr != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if s.IsRunning(ctx, sb.ID) {
			return fmt.Errorf("exec in sandbox %q: %w", sb.ID, werr)
		}
		return fmt.Errorf("exec in sandbox %q: the sandbox ended: %w", sb.ID, errdefs.ErrFailedPrecondition)
	}
	mu.Lock()
	defer mu.Unlock()
	// The exit status is the last message: it goes out with the end of the
	// stream in one write when this handler returns (heldFlushWriter).
	holdFlushes(ctx)
	return stream.Send(&v1.ExecEvent{Event: &v1.ExecEvent_Exited{Exited: &v1.ExecExited{
		ExitCode: int32(st.Code), Signal: st.Signal, TimedOut: timedOut.Load(),
	}}})
}

func (s *Server) execFor(ctx context.Context, sandboxID, execID string) (*execEntry, error) {
	if _, err := s.runningFor(ctx, sandboxID); err != nil {
		return nil, err
	}
	s.mu.Lock()
	e := s.execs[execID]
	s.mu.Unlock()
	if e == nil || e.sandboxID != sandboxID {
		return nil, fmt.Errorf("exec %q in sandbox %q: %w", execID, sandboxID, errdefs.ErrNotFound)
	}
	return e, nil
}

func (h *sandboxService) WriteStdin(ctx context.Context, req *connect.Request[v1.WriteStdinRequest]) (*connect.Response[v1.WriteStdinResponse], error) {
	e, err := h.s.execFor(ctx, req.Msg.SandboxId, req.Msg.ExecId)
	if err != nil {
		return nil, err
	}
	in := e.proc.Stdin()
	if in == nil {
		return nil, fmt.Errorf("exec %q was started without stdin: %w", req.Msg.ExecId, errdefs.ErrFailedPrecondition)
	}
	e.stdinMu.Lock()
	defer e.stdinMu.Unlock()
	if len(req.Msg.Data) > 0 {
		if _, err := in.Write(req.Msg.Data); err != nil {
			return nil, fmt.Errorf("stdin of exec %q: %v: %w", req.Msg.ExecId, err, errdefs.ErrFailedPrecondition)
		}
	}
	if req.Msg.Close {
		if err := in.Close(); err != nil {
			return nil, fmt.Errorf("close stdin of exec %q: %v: %w", req.Msg.ExecId, err, errdefs.ErrFailedPrecondition)
		}
	}
	return connect.NewResponse(&v1.WriteStdinResponse{}), nil
}

func (h *sandboxService) SignalExec(ctx context.Context, req *connect.Request[v1.SignalExecRequest]) (*connect.Response[v1.SignalExecResponse], error) {
	e, err := h.s.execFor(ctx, req.Msg.SandboxId, req.Msg.ExecId)
	if err != nil {
		return nil, err
	}
	name := strings.ToUpper(req.Msg.Signal)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return nil, invalid("signal %q: unknown", req.Msg.Signal)
	}
	if err := e.proc.Signal(sig); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.SignalExecResponse{}), nil
}

func (h *sandboxService) Logs(ctx context.Context, req *connect.Request[v1.LogsRequest], stream *connect.ServerStream[v1.LogChunk]) error {
	sb, err := h.s.sandboxFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return err
	}
	log, err := h.s.node.Logs(sb.ID)
	if err != nil {
		return err
	}
	defer log.Close()
	buf := make([]byte, 32<<10)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		n, err := log.Read(buf)
		if n > 0 {
			if serr := stream.Send(&v1.LogChunk{Data: append([]byte(nil), buf[:n]...)}); serr != nil {
				return serr
			}
			continue
		}
		if err != nil && err != io.EOF {
			return err
		}
		if !req.Msg.Follow || !h.s.IsRunning(ctx, sb.ID) {
			// One more read after the end so nothing written last is lost.
			if n, _ := log.Read(buf); n > 0 {
				if serr := stream.Send(&v1.LogChunk{Data: append([]byte(nil), buf[:n]...)}); serr != nil {
					return serr
				}
				continue
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (h *sandboxService) ReadFile(ctx context.Context, req *connect.Request[v1.ReadFileRequest], stream *connect.ServerStream[v1.FileChunk]) error {
	sb, err := h.s.runningFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return err
	}
	if !path.IsAbs(req.Msg.Path) {
		return invalid("path %q: must be absolute", req.Msg.Path)
	}
	if err := noNUL("path", req.Msg.Path); err != nil {
		return err
	}
	rc, err := h.s.node.Files(sb.ID).ReadFile(ctx, req.Msg.Path)
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := rc.Read(buf)
		if n > 0 {
			if serr := stream.Send(&v1.FileChunk{Data: append([]byte(nil), buf[:n]...)}); serr != nil {
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

func (h *sandboxService) WriteFile(ctx context.Context, req *connect.Request[v1.WriteFileRequest]) (*connect.Response[v1.WriteFileResponse], error) {
	sb, err := h.s.runningFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	if !path.IsAbs(req.Msg.Path) {
		return nil, invalid("path %q: must be absolute", req.Msg.Path)
	}
	if err := noNUL("path", req.Msg.Path); err != nil {
		return nil, err
	}
	mode := fs.FileMode(req.Msg.Mode)
	if mode == 0 {
		mode = 0o644
	}
	if mode&^fs.ModePerm != 0 {
		return nil, invalid("mode %o: only permission bits are allowed", req.Msg.Mode)
	}
	if err := h.s.node.Files(sb.ID).WriteFile(ctx, req.Msg.Path, mode, strings.NewReader(string(req.Msg.Data))); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.WriteFileResponse{Size: int64(len(req.Msg.Data))}), nil
}

func (h *sandboxService) ListFiles(ctx context.Context, req *connect.Request[v1.ListFilesRequest]) (*connect.Response[v1.ListFilesResponse], error) {
	sb, err := h.s.runningFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	if !path.IsAbs(req.Msg.Path) {
		return nil, invalid("path %q: must be absolute", req.Msg.Path)
	}
	if err := noNUL("path", req.Msg.Path); err != nil {
		return nil, err
	}
	infos, err := h.s.node.Files(sb.ID).ListDir(ctx, req.Msg.Path)
	if err != nil {
		return nil, err
	}
	out := &v1.ListFilesResponse{}
	for _, fi := range infos {
		out.Files = append(out.Files, &v1.FileInfo{Name: fi.Name, Size: fi.Size, Mode: uint32(fi.Mode.Perm()), IsDir: fi.IsDir, ModTime: fi.ModTime.UTC().Format(time.RFC3339)})
	}
	return connect.NewResponse(out), nil
}

func (h *sandboxService) RemoveFile(ctx context.Context, req *connect.Request[v1.RemoveFileRequest]) (*connect.Response[v1.RemoveFileResponse], error) {
	sb, err := h.s.runningFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	if !path.IsAbs(req.Msg.Path) || path.Clean(req.Msg.Path) == "/" {
		return nil, invalid("path %q: must be absolute and not /", req.Msg.Path)
	}
	if err := noNUL("path", req.Msg.Path); err != nil {
		return nil, err
	}
	if err := h.s.node.Files(sb.ID).Remove(ctx, req.Msg.Path, req.Msg.Recursive); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.RemoveFileResponse{}), nil
}

func (h *sandboxService) EgressLog(ctx context.Context, req *connect.Request[v1.EgressLogRequest]) (*connect.Response[v1.EgressLogResponse], error) {
	sb, err := h.s.sandboxFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return nil, err
	}
	if h.s.cfg.Policies == nil {
		return nil, fmt.Errorf("egress log: network policies are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	return connect.NewResponse(&v1.EgressLogResponse{Drops: h.s.cfg.Policies.Drops(sb.ID)}), nil
}

func ts(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func toProto(sb *store.Sandbox) *v1.Sandbox {
	state := sb.State
	if state == store.StateRunning && sb.Paused {
		state = statePaused
	}
	return &v1.Sandbox{
		Id: sb.ID, OrgId: sb.OrgID, State: state, Image: sb.Image, ImageDigest: sb.ImageDigest,
		Entrypoint: sb.Entrypoint, Env: sb.Env, Workdir: sb.Workdir, Cpu: sb.CPU, MemoryMb: sb.MemoryMB,
		TimeoutSeconds: int64(sb.Timeout / time.Second), IdleTimeoutSeconds: int64(sb.IdleTimeout / time.Second),
		CreatedAt: ts(sb.CreatedAt), StartedAt: ts(sb.StartedAt), EndedAt: ts(sb.EndedAt),
		ExitCode: int32(sb.ExitCode), EndReason: sb.EndReason, Error: sb.Error, ImageWarm: sb.ImageWarm,
		Ip: sb.IP, NetworkPolicies: sb.Policies, Tunnels: sb.Tunnels, Labels: sb.Labels, CreatedBy: sb.CreatedBy,
		ImageHash: sb.ImageHash,
	}
}

var _ = errors.New

// execPTY checks the terminal fields of an exec request: nil without pty;
// a size of 0 (both) or 1..procapi.MaxWinsize each; a plain TERM name.
func execPTY(r *v1.ExecRequest) (*procapi.PTY, error) {
	if !r.Pty {
		if r.Rows != 0 || r.Cols != 0 || r.Term != "" {
			return nil, invalid("rows, cols and term need pty")
		}
		return nil, nil
	}
	if r.Rows != 0 || r.Cols != 0 {
		if err := checkWinsize(r.Rows, r.Cols); err != nil {
			return nil, err
		}
	}
	if r.Term != "" && !procapi.ValidTerm(r.Term) {
		return nil, invalid("term %.80q: want a plain terminal name (letters, digits, .+-_; at most 64 bytes)", r.Term)
	}
	return &procapi.PTY{Rows: uint16(r.Rows), Cols: uint16(r.Cols), Term: r.Term}, nil
}

func checkWinsize(rows, cols uint32) error {
	if rows < 1 || rows > procapi.MaxWinsize || cols < 1 || cols > procapi.MaxWinsize {
		return invalid("terminal size %dx%d: rows and cols must be 1..%d", rows, cols, procapi.MaxWinsize)
	}
	return nil
}

// ResizeExec resizes the terminal of an exec started with pty; its process
// gets SIGWINCH.
func (h *sandboxService) ResizeExec(ctx context.Context, req *connect.Request[v1.ResizeExecRequest]) (*connect.Response[v1.ResizeExecResponse], error) {
	if err := checkWinsize(req.Msg.Rows, req.Msg.Cols); err != nil {
		return nil, err
	}
	e, err := h.s.execFor(ctx, req.Msg.SandboxId, req.Msg.ExecId)
	if err != nil {
		return nil, err
	}
	if !e.proc.PTY() {
		return nil, fmt.Errorf("exec %q was started without pty: %w", req.Msg.ExecId, errdefs.ErrFailedPrecondition)
	}
	if err := e.proc.Resize(int(req.Msg.Rows), int(req.Msg.Cols)); err != nil {
		return nil, fmt.Errorf("resize exec %q: %w", req.Msg.ExecId, err)
	}
	return connect.NewResponse(&v1.ResizeExecResponse{}), nil
}
