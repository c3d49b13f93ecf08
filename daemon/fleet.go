package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	goruntime "runtime"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	computev1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/store"
)

// Fleet modes (issue #17). `chalkd control` is the all-in-one daemon whose
// API places sandboxes on node agents (noderpc.Router) instead of its own
// node, and serves the fleet listener (joins, heartbeats) over TLS with the
// fleet CA; `chalkd node` runs only the node side (image cache, network,
// runtime, agent) and serves the node API over mTLS to the control plane.
// With neither, nothing here runs: the all-in-one path is unchanged.

// DefaultFleetListen is the control plane's fleet listener; DefaultNodeListen
// is where a node serves the node API.
// DefaultFleetRegistryListen is where the control plane serves its registry
// to nodes (TLS).
const (
	DefaultFleetListen         = ":7450"
	DefaultNodeListen          = ":7451"
	DefaultFleetRegistryListen = ":7452"
)

// FleetConfig turns Start into the control plane of a fleet.
type FleetConfig struct {
	Listen string // fleet listener (default DefaultFleetListen)
	// RegistryListen is the registry's TLS listener for nodes (default
	// DefaultFleetRegistryListen); RegistryAdvertise is it as nodes reach
	// it, host:port (default: the host a node joined at, this port).
	RegistryListen, RegistryAdvertise string
	// NodeTimeout: a node silent this long is lost (default
	// noderpc.DefaultHeartbeatTimeout).
	NodeTimeout time.Duration
	// LostGrace: a node that returns this long after its sandboxes were
	// reported lost has those still running re-adopted (0: never;
	// noderpc.DefaultLostGrace by the command line).
	LostGrace time.Duration
	// Prestart is how many pre-started sandboxes of the base image
	// (busybox) each node keeps, set when it joins (its first heartbeat
	// here); 0: none set (nodes pre-start recently used images by their own
	// --prestart).
	Prestart int
	// SharedDir makes this control plane one of several replicas on one
	// PostgreSQL database: it holds their shared keys and registry
	// storage (daemon/replicas.go).
	SharedDir string
}

// fleetDir is where the control plane keeps its CA.
func fleetDir(dataDir string) string { return filepath.Join(dataDir, "fleet") }

// startFleet loads (or makes) the fleet CA, starts the fleet listener and
// the router the API places sandboxes with.
func (d *Daemon) startFleet(ctx context.Context) error {
	fc := d.cfg.Fleet
	if fc == nil {
		return nil
	}
	ca, err := noderpc.LoadOrCreateCA(fleetDir(d.cfg.sharedDir()))
	if err != nil {
		return fmt.Errorf("fleet CA: %w", err)
	}
	ca.NodeTTL = nodeCertTTL(d.log)
	cert, err := ca.ControlCert(nil)
	if err != nil {
		return err
	}
	d.router = noderpc.NewRouter(d.Store, ca, cert, d.log.With("component", "fleet"))
	d.router.HeartbeatTimeout = fc.NodeTimeout
	d.router.Leading = d.leaderFunc()
	d.router.LostGrace = fc.LostGrace
	if err := d.router.Refresh(ctx); err != nil {
		return err
	}
	go d.router.Run(ctx, noderpc.HeartbeatInterval)
	if d.ingress != nil {
		// Exposed ports of node sandboxes: through their node (DialSandbox).
		d.ingress.srv.DialVia(d.router.DialSandbox)
		// A lost sandbox's exposures are kept for its re-adoption; they go
		// when its node answers without it.
		d.ingress.lostGrace = fc.LostGrace
		d.router.SetLostFinal(d.ingress.lostFinal)
	}
	if err := d.router.SetSnapshots(filepath.Join(d.cfg.DataDir, "fleet-snapshots"), d.pushFleetSnapshot); err != nil {
		return err
	}
	// Nodes pull images from this registry: over TLS with the control
	// plane's certificate (fleet CA), with the read-only pull credential
	// they get over the mTLS fleet channel (RegistryAccess).
	rl, err := net.Listen("tcp", cmpOr(fc.RegistryListen, DefaultFleetRegistryListen))
	if err != nil {
		return fmt.Errorf("fleet registry listener: %w", err)
	}
	f := &noderpc.Fleet{Store: d.Store, CA: ca, Log: d.log.With("component", "fleet"),
		FirstHeartbeat: func(id string) {
			if !d.cfg.replicated() { // replicas: the leader warms (warmByLeader)
				d.warmBase(ctx, id)
			}
		}, Workloads: fleetWorkloads{d}, CertGrace: certGrace(d.log)}
	// Only fleet members reach it: a node certificate not revoked and not
	// superseded by a renewal past its grace (a removed node keeps its copy
	// of the pull credential).
	if err := d.Registry.ServeTLSConfig(rl, noderpc.RegistryServerTLS(ca, cert), f.RegistryGate); err != nil {
		_ = rl.Close()
		return err
	}
	d.fleetRegistryAddr = rl.Addr().String()
	access := &noderpc.RegistryAccess{Pull: d.Registry.Credentials().Pull}
	if fc.RegistryAdvertise != "" {
		if _, _, err := net.SplitHostPort(fc.RegistryAdvertise); err != nil {
			return fmt.Errorf("--fleet-registry-advertise %q: want host:port: %w", fc.RegistryAdvertise, errdefs.ErrInvalidArgument)
		}
		access.Addr = fc.RegistryAdvertise
	} else {
		_, port, _ := net.SplitHostPort(d.fleetRegistryAddr)
		access.Addr = net.JoinHostPort("", port)
	}
	f.Registry = access
	mux := http.NewServeMux()
	mux.Handle(f.Handler())
	mux.Handle(noderpc.RelayPrefix, d.fleetRelay(f.AdmitCert))
	l, err := net.Listen("tcp", cmpOr(fc.Listen, DefaultFleetListen))
	if err != nil {
		return fmt.Errorf("fleet listener: %w", err)
	}
	d.fleetAddr = l.Addr().String()
	srv := &http.Server{Handler: mux, TLSConfig: noderpc.ControlServerTLS(ca, cert), ReadHeaderTimeout: 10 * time.Second}
	d.servers = append(d.servers, srv)
	go func() {
		if err := srv.ServeTLS(l, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("fleet listener", "err", err)
		}
	}()
	return nil
}

// warmBase warms the base images this control plane's registry holds
// (seeded: busybox, Python) on node id, at its first heartbeat here: a
// node that joined has them before its first sandbox needs them.
func (d *Daemon) warmBase(ctx context.Context, id string) {
	if err := d.router.Refresh(ctx); err != nil {
		d.log.Warn("fleet: warm base images", "node", id, "err", err)
		return
	}
	for _, ref := range []string{BusyboxRef, PythonRef} {
		local, err := d.Registry.LocalRef(ref)
		if err != nil {
			continue
		}
		if _, err := remote.Head(local, d.Registry.RemoteOptions(ctx)...); err != nil {
			continue // not seeded here
		}
		res, err := d.router.WarmImage(ctx, ref, []string{id}, nil)
		if err == nil && len(res) == 1 {
			err = res[0].Err
		}
		if err != nil {
			d.log.Warn("fleet: warm base image", "node", id, "image", ref, "err", err)
			continue
		}
		d.log.Info("fleet: base image warm", "node", id, "image", ref, "pulled", res[0].Image.BytesPulled)
		if ref == BusyboxRef && d.cfg.Fleet.Prestart > 0 {
			d.prestartBase(ctx, id, res[0].Image)
		}
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// FleetAddr is the fleet listener's address ("" unless control mode).
func (d *Daemon) FleetAddr() string { return d.fleetAddr }

// FleetRegistryAddr is the registry's TLS listener for nodes ("" unless
// control mode).
func (d *Daemon) FleetRegistryAddr() string { return d.fleetRegistryAddr }

// apiNode is the node the API places sandboxes on: the fleet's router in
// control mode, else this process's agent.
func (d *Daemon) apiNode() api.Node {
	if d.router != nil {
		return d.router
	}
	return d.Agent
}

// fleetHooks are the sandbox hooks of control mode. The node-side ones
// are the nodes' own or sent to them: egress rules, the metadata service and
// the identity files (fleetegress.go, fleetidentity.go, fleettokens.go),
// upload mounts (fleetmounts.go), tunnel devices, with the membership kept
// in the store (fleettunnel.go).
func (d *Daemon) fleetHooks() api.Hooks {
	return api.Hooks{
		Prepare: func(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
			if err := d.fleetMountBinds(ctx, sb, req); err != nil {
				return err
			}
			// Its identity files: its node writes them and keeps the
			// tokens fresh (fleettokens.go).
			return d.wi.fleetIdentityFiles(sb, req)
		},
		Started: d.ftun.started,
		Ended: func(ctx context.Context, sb *store.Sandbox) {
			d.ingress.ended(ctx, sb)
			d.ftun.ended(ctx, sb)
			d.mcp.ended(sb.ID)
		},
		Resumed: func(ctx context.Context, sb *store.Sandbox) {
			d.ftun.resumed(ctx, sb)
			d.ingress.resumed(ctx, sb) // re-adopted: its exposures served again
		},
	}
}

// fleetImages are the image builds of control mode: a built image's
// reference names it in this registry by its loopback address; a node
// resolves it in the same registry through its TLS listener, so it gets
// the reference without the address ("chalk.local/build:<key>").
type fleetImages struct {
	*images
	reg *registry.Registry
}

func (f fleetImages) Build(ctx context.Context, specJSON []byte, force bool, events func(*computev1.ImageProgress)) (*api.BuildResult, error) {
	res, err := f.images.Build(ctx, specJSON, force, events)
	if res != nil {
		res.Ref = f.reg.UserRef(res.Ref)
	}
	return res, err
}

func (f fleetImages) RefForHash(ctx context.Context, h string) (string, bool) {
	ref, ok := f.images.RefForHash(ctx, h)
	return f.reg.UserRef(ref), ok
}

// NewJoinToken makes a join token for the control plane whose data dir is
// dataDir and whose store is database (its --database: a postgres:// URL or
// a SQLite file; "" is DataDir/chalk.db). It may be running: the store is
// shared safely.
func NewJoinToken(ctx context.Context, dataDir, database string, ttl time.Duration) (string, error) {
	if database == "" {
		// Never create a store here: a token in a SQLite file that no
		// control plane reads (one on PostgreSQL) would be refused at the
		// join, with nothing saying why.
		database = filepath.Join(dataDir, "chalk.db")
		if _, err := os.Stat(database); errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("no store at %s: has the control plane started on this data dir? On PostgreSQL pass its --database (or set $CHALK_DATABASE): %w", database, errdefs.ErrFailedPrecondition)
		}
	}
	if !store.IsPostgres(database) && !filepath.IsAbs(database) {
		return "", fmt.Errorf("database %q: want a postgres:// URL or the absolute path of a SQLite file: %w", store.Redact(database), errdefs.ErrInvalidArgument)
	}
	ca, err := noderpc.LoadOrCreateCA(fleetDir(dataDir))
	if err != nil {
		return "", err
	}
	st, err := store.Open(ctx, database)
	if err != nil {
		return "", err
	}
	defer st.Close()
	return noderpc.NewJoinToken(ctx, st, ca, ttl)
}

// NodeOptions configure `chalkd node`.
type NodeOptions struct {
	// Join is the control plane's fleet listener, https://host:port; with
	// control-plane replicas, each one's, separated by commas (the node
	// joins, heartbeats and asks for identities at whichever answers).
	Join      string
	JoinToken string // needed once, to join
	Listen    string // node API (default DefaultNodeListen)
	Advertise string // the node API as the control plane reaches it (https://host:port)
	Name      string // default: the host name
}

// NodeDaemon is a running `chalkd node`.
type NodeDaemon struct {
	d       *Daemon
	ID      string
	srv     *http.Server
	addr    string
	cancel  context.CancelFunc
	removed chan struct{} // closed once the node wiped itself after its removal (or certificate expiry)
	why     error         // why it wiped itself; set before removed is closed
}

// Removed is closed when the control plane refused this node as removed
// from the fleet and the node has destroyed every sandbox it ran and
// stopped serving its API (MainNode then exits with an error).
func (n *NodeDaemon) Removed() <-chan struct{} { return n.removed }

// Addr is the node API's address.
func (n *NodeDaemon) Addr() string { return n.addr }

// StartNode brings up the node side, joins the fleet (once; the identity is
// kept in DATA_DIR/fleet-node) and serves the node API.
func StartNode(ctx context.Context, cfg Config, opts NodeOptions) (_ *NodeDaemon, err error) {
	// The sandboxes resolve through this node's DNS proxy and hold its
	// egress rules (daemon/fleetegress.go); its pre-started sandboxes are
	// made without identity files (fleetpool.go).
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if opts.Join == "" {
		return nil, fmt.Errorf("chalkd node: --join is required: %w", errdefs.ErrInvalidArgument)
	}
	controls, err := noderpc.ControlURLs(opts.Join)
	if err != nil {
		return nil, fmt.Errorf("chalkd node: --join: %w", err)
	}
	if opts.Listen == "" {
		opts.Listen = DefaultNodeListen
	}
	if opts.Advertise == "" {
		host, port, err := net.SplitHostPort(opts.Listen)
		if err != nil || host == "" || net.ParseIP(host).IsUnspecified() {
			return nil, fmt.Errorf("chalkd node: --advertise is required when --node-listen (%q) names no address: %w", opts.Listen, errdefs.ErrInvalidArgument)
		}
		opts.Advertise = "https://" + net.JoinHostPort(host, port)
	}
	if u, err := url.Parse(opts.Advertise); err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("chalkd node: --advertise %q: want https://host:port: %w", opts.Advertise, errdefs.ErrInvalidArgument)
	}
	if opts.Name == "" {
		opts.Name, _ = os.Hostname()
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, nodeMode: true}
	ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	capacity := func() *nodev1.Capacity {
		mem, _ := nodeMemoryMB()
		slots := 1
		if d.Agent != nil {
			slots = d.Agent.Slots().Size(node.SlotSandbox)
		} else if d.Net != nil {
			slots = d.Net.MaxSlot() // until the agent runs; the heartbeats say exactly
		}
		return &nodev1.Capacity{Cpu: float64(goruntime.NumCPU()), MemoryMb: max(mem, 1), Slots: int32(max(slots, 1))}
	}
	var id *noderpc.NodeIdentity
	var fc nodev1connect.FleetServiceClient
	// joinFleet loads this node's identity, joining the fleet the first
	// time (the identity is kept in DATA_DIR/fleet-node).
	joinFleet := func(ctx context.Context) (err error) {
		dir := filepath.Join(cfg.DataDir, "fleet-node")
		id, err = noderpc.LoadNodeIdentity(dir)
		if errors.Is(err, os.ErrNotExist) {
			if opts.JoinToken == "" {
				return fmt.Errorf("chalkd node: not joined yet: --join-token is required: %w", errdefs.ErrInvalidArgument)
			}
			c := capacity()
			// The first replica that answers takes the join (they share
			// the store: the token is good at any of them).
			for _, u := range controls {
				id, err = noderpc.Join(ctx, dir, noderpc.JoinRequest{ControlURL: u, Token: opts.JoinToken, Name: opts.Name,
					NodeURL: opts.Advertise, CPU: c.Cpu, MemoryMB: c.MemoryMb, Slots: int(c.Slots)})
				if err == nil || !errdefs.Is(err, errdefs.ErrUnavailable) {
					break
				}
			}
		}
		if err != nil {
			return fmt.Errorf("chalkd node: %w", err)
		}
		fc = noderpc.FailoverFleetClient(id, controls)
		return nil
	}
	// remoteImages: the node resolves and pulls images from the control
	// plane's registry (over TLS, with the pull credential it gets over the
	// mTLS fleet channel at every start) into its own cache. It runs no
	// registry of its own.
	remoteImages := func(ctx context.Context) (err error) {
		// A control plane that is down (restarting) is waited for: the
		// node has nothing to pull images with until it answers. Any
		// other refusal (not a member any more) fails the start.
		for warned := false; ; warned = true {
			// The registry of the first replica that answers (its
			// --fleet-registry-advertise, else its host with the other
			// replicas' as alternates).
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			d.Registry, err = noderpc.RemoteRegistryAt(cctx, id, controls, d.log.With("component", "registry"))
			cancel()
			if err != nil {
				if xerr := certExpired(id.NotAfter(), time.Now(), err); xerr != nil {
					// No control plane will ever accept this node again:
					// what it still runs goes now.
					d.removedFromFleet(ctx, id.ID, xerr, nil)
					return fmt.Errorf("every sandbox this node ran was destroyed: %w", xerr)
				}
			}
			if err == nil || !errdefs.Is(err, errdefs.ErrUnavailable) && !errdefs.Is(err, errdefs.ErrDeadlineExceeded) {
				break
			}
			if !warned {
				d.log.Warn("fleet: waiting for the control plane to hand out registry access", "control", opts.Join, "err", err)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(2 * time.Second):
			}
		}
		if err != nil {
			// Refused (not unreachable): if the control plane says this
			// node was removed from the fleet (a partitioned or stopped
			// node removed meanwhile), what it still runs goes now.
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, herr := fc.Heartbeat(cctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: id.ID, NodeUrl: opts.Advertise, Capacity: capacity()}))
			cancel()
			if noderpc.RemovedFromFleet(herr, id.ID) {
				d.removedFromFleet(ctx, id.ID, herr, nil)
				return fmt.Errorf("this node was removed from the fleet (every sandbox it ran was destroyed): %w", herr)
			}
			return err
		}
		if d.Cache, err = nodecache.New(nodecache.Config{
			Root: filepath.Join(cfg.DataDir, "cache"), MaxBytes: cfg.CacheMaxBytes, Logger: cfg.Logger,
			Remote: d.Registry.PullOptions(),
		}); err != nil {
			return fmt.Errorf("node cache: %w", err)
		}
		return nil
	}
	for _, step := range []struct {
		name string
		run  func(context.Context) error
	}{
		{"data dir", d.prepareDataDir},
		{"sandbox network", d.startNetwork},
		{"sandbox runtime", d.startRuntime},
		{"fleet identity", joinFleet},
		{"control plane registry and node cache", remoteImages},
		{"node agent", d.startAgent},
		{"tunnels", func(context.Context) error { return d.startNodeTunnels(opts.Advertise) }},
		{"egress", d.startNodeEgress},
		{"pre-started sandboxes", d.startNodePool},
	} {
		if err := step.run(ctx); err != nil {
			return nil, fmt.Errorf("%s: %w", step.name, err)
		}
	}
	n := &NodeDaemon{d: d, ID: id.ID, cancel: d.cancel, removed: make(chan struct{})}
	relay, err := noderpc.NewRelayClientOver(id, controls, noderpc.CurrentReplica(fc), d.log.With("component", "metadata"))
	if err != nil {
		return nil, err
	}
	if err := d.startNodeMetadata(noderpc.NewWorkloadClientOver(fc), relay); err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	ids := &nodeIdentity{d: d, stops: map[string][]func(){}}
	ids.resume(nil) // a restarted node process: its sandboxes' tokens (Restore prunes)
	mounts, err := newNodeMounts(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("upload mounts: %w", err)
	}
	go mounts.gc(ctx, d.log.With("component", "upload-gc"), cfg.DataDir, cfg.UploadGCGrace)
	mux.Handle(noderpc.NewServer(d.Agent, d.log.With("component", "node-api")).WithEgress(nodeEgress{d}).
		WithTunnels(nodeTunnels{d: d, host: d.tun.endpoint}).WithIdentity(ids).WithDialer(d.dialSandbox).
		WithMounts(mounts).Handler())
	l, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("node API: %w", err)
	}
	n.addr = l.Addr().String()
	n.srv = &http.Server{Handler: mux, TLSConfig: noderpc.NodeServerTLS(id), ReadHeaderTimeout: 10 * time.Second}
	d.servers = append(d.servers, n.srv)
	go func() {
		if err := n.srv.ServeTLS(l, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("node API", "err", err)
		}
	}()
	go heartbeatLoop(ctx, d.log, fc, id.ID, opts.Advertise, newBootID(), capacity, id.NotAfter, func(err error) {
		n.srv.Close() // this node serves nothing more
		n.why = err
		d.removedFromFleet(ctx, id.ID, err, ids)
		close(n.removed)
	})
	every, due := renewSchedule(d.log)
	go noderpc.RenewLoop(ctx, d.log, id, fc, every, due) // its certificate, before it expires
	go func() { _ = d.startBackground(ctx) }()
	d.log.Info("chalkd node serving", "node", id.ID, "api", n.addr, "advertise", opts.Advertise, "control", opts.Join)
	return n, nil
}

// heartbeatLoop tells the control plane every HeartbeatInterval that this
// node lives, where it serves and what it offers. When the control plane
// refuses a heartbeat because this node was removed from the fleet
// (noderpc.RemovedFromFleet: `chalk admin node rm`, also one made while
// the node was cut off), or a heartbeat fails once the node's certificate
// (notAfter) has expired (certExpired), removed runs and the loop ends;
// any other failure is retried.
func heartbeatLoop(ctx context.Context, log *slog.Logger, fc interface {
	Heartbeat(context.Context, *connect.Request[nodev1.HeartbeatRequest]) (*connect.Response[nodev1.HeartbeatResponse], error)
}, id, advertise, bootID string, capacity func() *nodev1.Capacity, notAfter func() time.Time, removed func(error)) {
	t := time.NewTicker(noderpc.HeartbeatInterval)
	defer t.Stop()
	failing := false
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := fc.Heartbeat(cctx, connect.NewRequest(&nodev1.HeartbeatRequest{NodeId: id, NodeUrl: advertise, Capacity: capacity(), BootId: bootID}))
		cancel()
		if noderpc.RemovedFromFleet(err, id) {
			log.Warn("fleet: heartbeat failed", "err", err)
			removed(err)
			return
		}
		if err != nil && ctx.Err() == nil {
			if xerr := certExpired(notAfter(), time.Now(), err); xerr != nil {
				log.Warn("fleet: heartbeat failed", "err", xerr)
				removed(xerr)
				return
			}
		}
		switch {
		case err != nil && !failing && ctx.Err() == nil:
			log.Warn("fleet: heartbeat failed", "err", err)
			failing = true
		case err == nil && failing:
			log.Info("fleet: heartbeat back")
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close stops the node (its sandboxes keep running).
func (n *NodeDaemon) Close() error { return n.d.Close() }

// MainNode runs `chalkd node` until ctx is done.
func MainNode(ctx context.Context, cfg Config, opts NodeOptions) error {
	n, err := StartNode(ctx, cfg, opts)
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return n.Close()
	case <-n.Removed():
		_ = n.Close()
		if errors.Is(n.why, errCertExpired) {
			return fmt.Errorf("chalkd node: node %s: %v: its sandboxes were destroyed; to bring this machine back, delete DATA_DIR/fleet-node and join with a new token: %w", n.ID, n.why, errdefs.ErrPermissionDenied)
		}
		return fmt.Errorf("chalkd node: node %s was removed from the fleet: its sandboxes were destroyed; to bring this machine back, delete DATA_DIR/fleet-node and join with a new token: %w", n.ID, errdefs.ErrPermissionDenied)
	}
}

// errCertExpired is in the error of a node whose certificate has expired.
var errCertExpired = errors.New("the node certificate has expired")

// certExpired is why a node whose call to the control plane failed (err)
// can never be reached again: its certificate expired at notAfter (now,
// by the node's clock). No control plane accepts it any more (heartbeats,
// renewal, registry) or connects to its node API with it, so nothing can
// re-adopt its sandboxes or end them: the node destroys them itself
// (removedFromFleet) and stops; the machine comes back only by joining
// anew. nil while the certificate is valid, or when the call did not
// fail: a control plane that still answers (its clock behind the node's)
// decides, not the node's clock alone.
func certExpired(notAfter, now time.Time, err error) error {
	if err == nil || notAfter.IsZero() || now.Before(notAfter) {
		return nil
	}
	return fmt.Errorf("%w (at %s), and a call to the control plane failed (%v)", errCertExpired, notAfter.UTC().Format(time.RFC3339), err)
}

// removedFromFleet destroys every sandbox this node machine runs (its
// pre-started ones too) after the control plane refused the node as
// removed, or once its certificate expired (certExpired): their records
// ended as lost there (or will when a control plane finds the node
// silent), nobody can reach them any more, and the node's certificate is
// good for nothing (the node gets no token, image or relay for them).
// Best effort, bounded; what fails is logged (and left to whoever wipes
// the machine).
func (d *Daemon) removedFromFleet(ctx context.Context, id string, why error, ids *nodeIdentity) {
	d.log.Error("fleet: this node is out of the fleet for good: destroying every sandbox it runs and stopping", "node", id, "why", why)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if d.Agent != nil {
		d.Agent.ClosePool() // pre-starts nothing more, destroys its unclaimed members
		_ = d.Agent.WaitTeardowns(ctx)
	}
	var destroyed []string
	var errs []error
	if d.Runtime != nil {
		running, err := d.Runtime.List(ctx)
		errs = append(errs, err)
		for _, sb := range running {
			var err error
			if d.Agent != nil {
				slot, _ := d.Agent.Slots().Of(sb)
				err = d.Agent.Destroy(ctx, sb, slot)
			} else {
				err = errors.Join(d.Runtime.Destroy(ctx, sb), d.Net.Teardown(ctx, sb, 0))
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("sandbox %s: %w", sb, err))
				continue
			}
			destroyed = append(destroyed, sb)
		}
	}
	if d.Net != nil {
		left, err := d.Net.Leftovers(ctx, nil)
		errs = append(errs, err)
		for _, l := range left { // network namespaces, their links and rules
			errs = append(errs, d.Net.RemoveLeftover(ctx, l))
		}
	}
	// Their egress rules and kept policies, identity files (refreshes
	// stopped first, when they run).
	if d.Egress != nil {
		nodeEgress{d}.Prune(ctx, nil)
	}
	if ids != nil {
		ids.Restore(ctx, nil)
	}
	for _, dir := range []string{"egress-policies", "identity-files"} {
		ents, _ := os.ReadDir(filepath.Join(d.cfg.DataDir, dir))
		for _, e := range ents {
			errs = append(errs, os.RemoveAll(filepath.Join(d.cfg.DataDir, dir, e.Name())))
		}
	}
	if err := errors.Join(errs...); err != nil {
		d.log.Warn("fleet: removed node: not everything was destroyed", "node", id, "err", err)
	}
	d.log.Warn("fleet: removed node: sandboxes destroyed", "node", id, "count", len(destroyed), "sandboxes", destroyed)
}
