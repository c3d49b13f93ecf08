package api

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/procapi"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// Node is what the control plane needs from a node agent (implemented by
// *node.Agent in-process; an RPC client later for multi-node).
type Node interface {
	EnsureImage(ctx context.Context, ref string, progress func(nodecache.Progress)) (*nodecache.Image, error)
	// ReserveSlot gives sandbox req.ID a network slot on the node (slots
	// are the node's: the control plane records the one it got; a fleet
	// places the sandbox on a node by req here).
	ReserveSlot(req node.StartRequest) (int, error)
	Start(ctx context.Context, req node.StartRequest) (node.Started, error)
	Wait(ctx context.Context, id string, pid int) (sandbox.Exit, error)
	Running(ctx context.Context, id string) (int, bool)
	// Kill kills every process of the sandbox and returns at once (Wait
	// then reports its end). Teardown removes what an ended sandbox left
	// on the node in the background and frees its slot when done; Destroy
	// does both and returns when done. Both are idempotent.
	// Teardown may keep the sandbox's writable layer for a snapshot of the
	// stopped sandbox (keep; kept is its size, 0 when not kept).
	Kill(ctx context.Context, id string) error
	Teardown(id string, slot int, keep node.KeepUpper) (kept int64, err error)
	Destroy(ctx context.Context, id string, slot int) error
	Exec(ctx context.Context, id string, req procapi.ExecRequest, stdout, stderr io.Writer) (node.Process, error)
	Files(id string) node.Files
	// Logs opens the sandbox's console log from its start (its rotated
	// part first). Read returns io.EOF at the end of what is written; a
	// later Read returns what was written since (follow).
	Logs(id string) (io.ReadCloser, error)
	Leftovers(ctx context.Context, live map[string]int) ([]string, error)
	Adopt(id, imageDigest string)
	// Claim hands out a pre-started sandbox fitting req (its id and slot are
	// then the new sandbox's); Unclaim gives back one (or a reserved slot)
	// whose create failed before Start.
	Claim(req node.StartRequest) (id string, slot int, ok bool)
	Unclaim(id string)
	// Restore brings the node in line at a start: its slot allocator learns
	// the live sandboxes' slots, unfinished teardowns are finished, and
	// pre-started sandboxes a previous process left are removed.
	Restore(ctx context.Context, live map[string]int) error
	SetPrestarted(ctx context.Context, img *nodecache.Image, n int, progress func(ready, want int)) error
	// SetPaused freezes or thaws a sandbox; Snapshot commits its writable
	// layer on its image into the registry (see node.Agent.Snapshot).
	SetPaused(ctx context.Context, id string, paused bool) error
	Snapshot(ctx context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error)
}

var _ Node = (*node.Agent)(nil)

// Hooks are optional integrations the daemon wires in (identity, egress,
// builds). Nil hooks are skipped.
type Hooks struct {
	// Prepare runs after the sandbox record exists and before it starts; it may
	// add bind mounts and env (identity token files, cloud federation).
	Prepare func(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error
	// Started runs once the sandbox runs (egress rules, etc.).
	Started func(ctx context.Context, sb *store.Sandbox, st node.Started) error
	// Ended runs when the sandbox has ended, before its resources are freed
	// (sb.EndReason is "lost" for a sandbox whose node stopped answering:
	// it may be re-adopted, ReadoptLost).
	Ended func(ctx context.Context, sb *store.Sandbox)
	// Resumed runs for a sandbox found running when chalkd starts, and for
	// one re-adopted after its loss.
	Resumed func(ctx context.Context, sb *store.Sandbox)
}

// Config configures the API server.
type Config struct {
	Store    *store.Store
	Node     Node
	Workload WorkloadVerifier // nil: workload tokens are refused
	// Auth authenticates callers (nil: NewAuthenticator(Store, Workload));
	// the daemon shares one with the ingress listener.
	Auth       *Authenticator
	Hooks      Hooks
	Images     ImageBackend // nil: image builds are unavailable
	ImageStore ImageStore
	Policies   PolicyBackend
	Identity   IdentityBackend
	Tunnels    TunnelBackend  // nil: tunnels are unavailable
	MCP        MCPBackend     // nil: the MCP gateway is unavailable
	Ingress    IngressBackend // nil: ingress (Expose) is unavailable
	Fleet      FleetBackend   // nil: not the control plane of a fleet
	Logger     *slog.Logger
	// MaxWriteFile bounds WriteFile payloads (default 64 MiB).
	MaxWriteFile int64
	// DefaultQuota is every org's quota where the node admin set none (zero: no limits).
	DefaultQuota store.Quota
	// OrgMaxTunnels is the most tunnels an org may have (0: no limit).
	// Tunnel subnets are shared by every org: without a limit one org
	// could take them all and no other could make a tunnel.
	OrgMaxTunnels int
	// DefaultMemoryMB is the memory limit of a create without memory_mb
	// (default DefaultMemoryMB). A sandbox's disk is a tmpfs whose pages
	// count toward this limit (see resources).
	DefaultMemoryMB int64
	// DefaultDiskMB is the disk quota of a create without disk_mb, capped
	// at its memory limit (default 10 GiB).
	DefaultDiskMB int64
	// NodeMemoryMB is the node's memory; no sandbox may ask for more
	// (0: not checked).
	NodeMemoryMB int64
	// Limits bound request bodies per caller (see Limits).
	Limits Limits
	// KeepStopped is how long a stopped sandbox's writable layer is kept so
	// that it can still be snapshotted (default DefaultKeepStopped; < 0:
	// never kept). KeepStoppedMB bounds what one org's kept layers hold
	// (default DefaultKeepStoppedMB): they are host memory (tmpfs) that no
	// cgroup counts any more, so a layer that does not fit is not kept.
	KeepStopped   time.Duration
	KeepStoppedMB int64
	// Live is where the server keeps the sandboxes it starts and watches;
	// those who must know which sandboxes are live (the identity issuer)
	// are built before the server with the same one. Nil: the server makes
	// its own.
	Live *Live
	// Leader is the control plane's leader lease when replicas share the
	// store (nil: this process is the only control plane; see replicas.go).
	Leader Leadership
}

// DefaultMemoryMB is Config.DefaultMemoryMB's default: 1 GiB.
const DefaultMemoryMB = 1024

// Defaults of Config.KeepStopped and KeepStoppedMB.
const (
	DefaultKeepStopped   = 10 * time.Minute
	DefaultKeepStoppedMB = 1024
)

// Server implements every service of the API.
type Server struct {
	cfg   Config
	log   *slog.Logger
	store *store.Store
	node  Node
	auth  *Authenticator
	// budget counts request body bytes in flight per caller (guard).
	budget *reqlimit.Budget
	// sessions are the web console's signed-in browsers (session.go).
	sessions *sessions

	live *Live // the sandboxes this process starts and watches
	kept *keptLayers

	// audits stores the audit records of batchedAudit's calls.
	audits *auditWriter

	mu      sync.Mutex
	execs   map[string]*execEntry
	baseCtx context.Context
}

// New returns a Server. Call Reconcile before serving.
func New(ctx context.Context, cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxWriteFile == 0 {
		cfg.MaxWriteFile = 64 << 20
	}
	if cfg.DefaultMemoryMB == 0 {
		cfg.DefaultMemoryMB = DefaultMemoryMB
	}
	if cfg.DefaultDiskMB == 0 {
		cfg.DefaultDiskMB = 10 << 10
	}
	cfg.Limits.defaults(cfg.MaxWriteFile + 1<<20)
	if cfg.Live == nil {
		cfg.Live = NewLive()
	}
	if cfg.Auth == nil {
		cfg.Auth = NewAuthenticator(cfg.Store, cfg.Workload)
	}
	if cfg.KeepStopped == 0 {
		cfg.KeepStopped = DefaultKeepStopped
	}
	if cfg.KeepStoppedMB == 0 {
		cfg.KeepStoppedMB = DefaultKeepStoppedMB
	}
	return &Server{
		budget:   reqlimit.NewBudget(cfg.Limits.InFlightPerCaller, cfg.Limits.InFlightTotal),
		cfg:      cfg,
		log:      cfg.Logger,
		store:    cfg.Store,
		node:     cfg.Node,
		auth:     cfg.Auth,
		sessions: newSessions(time.Now),
		live:     cfg.Live,
		kept:     newKeptLayers(cfg.KeepStopped, cfg.KeepStoppedMB<<20),
		execs:    map[string]*execEntry{},
		baseCtx:  context.WithoutCancel(ctx),
		audits:   newAuditWriter(cfg.Store, cfg.Logger, auditBatchDelay),
	}
}

// CloseAudit stores the audit records still queued and stops the audit
// writer (later records are stored by their calls). Call it after the
// listeners stopped, before the store is closed.
func (s *Server) CloseAudit() { s.audits.Close() }

// Handler returns the HTTP handler serving every service. Every request is
// authenticated from its headers, and its body admitted against the caller's
// budget, before a byte of the body is read (guard).
func (s *Server) Handler() http.Handler { return s.guard(s.services(), nil) }

// SandboxHandler is Handler for requests the metadata service relays from a
// sandbox (its /api route): from names the calling sandbox, and a workload
// token is accepted only from the sandbox it was issued to.
func (s *Server) SandboxHandler(from SandboxOf) http.Handler {
	if from == nil {
		panic("api: SandboxHandler needs the calling sandbox")
	}
	return s.guard(s.services(), from)
}

// compressMinBytes is the smallest message compressed for clients that
// accept gzip.
const compressMinBytes = 8 << 10

func (s *Server) services() http.Handler {
	opts := []connect.HandlerOption{
		connect.WithInterceptors(errorInterceptor{}, authInterceptor{s.auth}, authzInterceptor{s}),
		connect.WithReadMaxBytes(int(s.maxMessage())),
		// Small messages (every exec event, most answers) are sent as they
		// are: gzip's per-message set-up cost more than the bytes it saved
		// (0.13 ms of chalkd's CPU per exec of `true`, profiled).
		connect.WithCompressMinBytes(compressMinBytes),
	}
	mux := http.NewServeMux()
	sbPath, sbHandler := computev1connect.NewSandboxServiceHandler(&sandboxService{s}, opts...)
	mux.Handle(sbPath, withHeldFlush(sbHandler))
	mux.Handle(computev1connect.NewImageServiceHandler(&imageService{s}, opts...))
	mux.Handle(computev1connect.NewPolicyServiceHandler(&policyService{s}, opts...))
	mux.Handle(computev1connect.NewIdentityServiceHandler(&identityService{s}, opts...))
	mux.Handle(computev1connect.NewTunnelServiceHandler(&tunnelService{s}, opts...))
	mux.Handle(computev1connect.NewMcpServiceHandler(&mcpService{s}, opts...))
	mux.Handle(computev1connect.NewTeamServiceHandler(&teamService{s}, opts...))
	mux.Handle(computev1connect.NewNodeAdminServiceHandler(&nodeAdminService{s}, opts...))
	return mux
}
