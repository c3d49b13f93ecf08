package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/imagespec"
	"github.com/chalkcompute/chalkcompute/internal/periodic"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// The steps of Start, in order. Each builds one subsystem from the Daemon's
// config and what the steps before it built; none reaches anything built
// later (the live set, built with the agent, is what the API fills).

// prepareDataDir makes the data and run dirs with their modes, and makes
// chalkd the subreaper of its sandboxes' inits.
func (d *Daemon) prepareDataDir(ctx context.Context) error {
	cfg := &d.cfg
	for _, dir := range []string{cfg.DataDir, cfg.RunDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
	}
	if !cfg.NoUserNS {
		// Sandboxes' roots are unprivileged host uids that must pass through
		// the data dir to their own rootfs and binds (as dockerd's under
		// userns-remap): searchable, not listable. Everything secret in it
		// is 0600/0700 on its own.
		if err := os.Chmod(cfg.DataDir, 0o711); err != nil {
			return err
		}
	}
	if err := restrictDataDir(cfg.DataDir, !cfg.NoUserNS); err != nil {
		return err
	}
	identityFilesTmpfs(d.log, cfg.DataDir)
	nsFilesTmpfs(d.log, cfg.RunDir, !cfg.NoUserNS)
	go pruneLogsLoop(ctx, d.log, cfg.DataDir, cfg.Limits.LogRetention)
	if err := sandbox.SetSubreaper(); err != nil {
		return fmt.Errorf("become subreaper: %w", err)
	}
	return nil
}

// openStore opens the store: PostgreSQL, or the SQLite file (0600).
func (d *Daemon) openStore(ctx context.Context) (err error) {
	if d.Store, err = store.Open(ctx, d.cfg.Database); err != nil {
		return err
	}
	if store.IsPostgres(d.cfg.Database) {
		d.log.Info("store on PostgreSQL", "database", store.Redact(d.cfg.Database))
		return nil
	}
	for _, f := range []string{d.cfg.Database, d.cfg.Database + "-wal", d.cfg.Database + "-shm"} {
		if err := os.Chmod(f, 0o600); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// startImages starts the embedded registry and opens the node cache, which
// pulls from it.
func (d *Daemon) startImages(ctx context.Context) (err error) {
	cfg := &d.cfg
	regCfg := registryConfig(cfg.sharedDir(), cfg.RegistryAddr, cfg.Logger)
	regCfg.Upstreams = cfg.Upstreams
	// Replicas share the registry's storage: another one's write would not
	// be seen by this one's cache.
	regCfg.CacheTags = !cfg.replicated()
	if d.Registry, err = registry.New(ctx, regCfg); err != nil {
		return fmt.Errorf("embedded registry: %w", err)
	}
	if d.Cache, err = nodecache.New(nodecache.Config{
		Root: filepath.Join(cfg.DataDir, "cache"), MaxBytes: cfg.CacheMaxBytes, Logger: cfg.Logger,
		Remote: d.Registry.PullOptions(), // the node pulls with the read-only credential
	}); err != nil {
		return fmt.Errorf("node cache: %w", err)
	}
	return nil
}

// startNetwork sets up sandbox networking (subnets, nftables, spare namespaces).
func (d *Daemon) startNetwork(ctx context.Context) (err error) {
	cfg := &d.cfg
	netCfg := sandboxnet.Config{
		Prefix: cfg.NetPrefix, Table: cfg.NetTable, NetnsDir: filepath.Join(cfg.RunDir, "netns"), Logger: cfg.Logger,
		MetadataPort: cfg.MetadataPort, ServicePorts: []uint16{cfg.MetadataPort}, DNSPort: 53,
		UserNS: !cfg.NoUserNS, UIDBase: cfg.UIDBase,
		NetnsPool: cfg.NetnsPool, NetnsPoolMax: cfg.NetnsPoolMax,
	}
	if cfg.Subnet != "" {
		if netCfg.Subnet, err = netip.ParsePrefix(cfg.Subnet); err != nil {
			return fmt.Errorf("subnet %q: %w", cfg.Subnet, err)
		}
	}
	if cfg.Subnet6 != "" {
		if netCfg.Subnet6, err = netip.ParsePrefix(cfg.Subnet6); err != nil {
			return fmt.Errorf("subnet6 %q: %w", cfg.Subnet6, err)
		}
	}
	if cfg.TunnelSubnets == "" {
		cfg.TunnelSubnets = DefaultTunnelSubnets
	}
	if tp, err := netip.ParsePrefix(cfg.TunnelSubnets); err == nil {
		netCfg.Reserved = append(netCfg.Reserved, tp.Masked()) // validated with the tunnels below
	}
	if d.Net, err = sandboxnet.New(netCfg); err != nil {
		return err
	}
	if err := d.Net.Init(ctx); err != nil {
		return fmt.Errorf("sandbox network: %w", err)
	}
	return nil
}

// startRuntime sets up the container runtime (runc or runsc) and the
// binaries it puts in every sandbox.
func (d *Daemon) startRuntime(context.Context) (err error) {
	cfg := &d.cfg
	if !cfg.NoUserNS {
		// Sandbox roots bind-mount chalk-init and chalk as unprivileged host
		// uids: wherever the binaries were built (say under /root, 0700), a
		// copy in the data dir is reachable.
		if cfg.InitBinary, cfg.ChalkBinary, err = stageBinaries(filepath.Join(cfg.DataDir, "bin"), cfg.InitBinary, cfg.ChalkBinary); err != nil {
			return err
		}
	}
	if d.Runtime, err = sandbox.New(sandbox.Config{
		StateDir: filepath.Join(cfg.DataDir, "sandboxes"), LogDir: filepath.Join(cfg.DataDir, "logs"),
		RuncRoot: filepath.Join(cfg.RunDir, "runc"), InitBinary: cfg.InitBinary, ChalkBinary: cfg.ChalkBinary,
		CgroupParent: cfg.CgroupParent, Logger: cfg.Logger, Runtime: cfg.Runtime, RuncBinary: cfg.RuntimeBinary,
		LogMaxBytes: cfg.Limits.LogMaxBytes, Seccomp: cfg.SeccompLoader,
	}); err != nil {
		return err
	}
	if !cfg.NoUserNS {
		if err := d.Runtime.CheckUserNS(); err != nil {
			return fmt.Errorf("%w (or run chalkd --userns=false)", err)
		}
	}
	return nil
}

// startAgent builds the node agent with its pre-start pool, the live set
// the pool and the API share, and the workload identity files the pool's
// members are made with (its issuer comes in startIdentity).
func (d *Daemon) startAgent(context.Context) (err error) {
	cfg := &d.cfg
	// Which sandboxes are live: filled by the API server (built last), read
	// by the identity issuer (built before it).
	d.live = api.NewLive()
	d.wi = &workloadIdentity{store: d.Store, live: d.live, filesAt: filepath.Join(cfg.DataDir, "identity-files"), userNS: d.userNS, stops: map[string][]func(){}, queryURL: cfg.QueryURL, awsRegion: cfg.AWSRegion}
	pool := node.PoolConfig{
		Size: cfg.Prestart, Slots: max(cfg.PrestartSlots, 0), Dir: filepath.Join(cfg.DataDir, "prestarted"),
		NewID: api.NewSandboxID, Binds: d.wi.binds, Discard: d.wi.discard,
		CountsFile: filepath.Join(cfg.DataDir, "prestart-counts.json"),
		Memory:     cfg.Limits.DefaultMemoryMB << 20, DiskMB: min(sandbox.DefaultDiskMB, cfg.Limits.DefaultMemoryMB),
	}
	if d.nodeMode {
		nodePool(&pool)
	}
	d.Agent, err = node.New(node.Config{
		Runtime: d.Runtime, Net: d.Net, Cache: d.Cache, Registry: d.Registry, Logger: cfg.Logger,
		ReservedSlots: buildSlots, Pool: pool, ResolvConf: d.agentResolvConf(),
		TeardownDir: filepath.Join(cfg.DataDir, "teardown"), TeardownHold: teardownHold(cfg.Logger),
	})
	return err
}

// startEgress starts the tunnels, and the egress policies with the DNS
// proxy every sandbox resolves through (it answers the tunnels' names
// itself).
func (d *Daemon) startEgress(ctx context.Context) (err error) {
	cfg := &d.cfg
	d.Tunnels = tunnel.NewManager(cfg.Logger)
	tunnelManagers.Store(d.Tunnels, struct{}{})
	if d.tun, err = newTunnels(d.Tunnels, d.Agent, d.Store, cfg.TunnelSubnets, cfg.TunnelEndpoint); err != nil {
		return err
	}
	if d.Egress, err = egress.New(egress.Config{
		Table: d.Net.Table(), Logger: cfg.Logger, Upstream: cfg.DNSUpstream, Local: localNames(d.tun),
		ListenAddrs: []string{
			netip.AddrPortFrom(d.Net.ServiceAddr(), 53).String(),
			netip.AddrPortFrom(d.Net.ServiceAddr6(), 53).String(),
		},
	}); err != nil {
		return err
	}
	if err := d.Egress.Start(ctx); err != nil {
		return fmt.Errorf("egress: %w", err)
	}
	d.pol = &policies{m: d.Egress, agent: d.Agent}
	d.wi.pol = d.pol // the network_policy claim of its tokens
	return nil
}

// startBuilds sets up image builds and uploaded content.
func (d *Daemon) startBuilds(ctx context.Context) error {
	cfg := &d.cfg
	blobs, err := imagebuild.NewBlobs(filepath.Join(cfg.sharedDir(), "blobs"))
	if err != nil {
		return err
	}
	builder, err := imagebuild.New(imagebuild.Config{
		Registry: d.Registry, Cache: d.Cache, Runtime: d.Runtime, Blobs: blobs,
		Network: newBuildNet(d.Net, d.Agent.Slots()), Env: cfg.BuildEnv, MemoryMB: cfg.Limits.BuildMemoryMB,
		Defaults: imagespec.Defaults{PythonVersion: DefaultPython}, Logger: cfg.Logger,
	})
	if err != nil {
		return err
	}
	d.im = &images{b: builder, blobs: blobs, dir: filepath.Join(cfg.DataDir, "mounts")}
	if err := os.MkdirAll(d.im.dir, 0o700); err != nil {
		return err
	}
	// Uploads live sandboxes (this machine's, or the store's: a fleet's
	// nodes') bind are kept; with replicas the leader collects.
	// The orgs' records of removed content go with it (their upload
	// budgets' charge).
	go uploadGC(ctx, d.log.With("component", "upload-gc"), blobs, d.im.dir, cfg.UploadGCGrace, d.leaderFunc(), storeUploads{d.Store},
		storeMountRefs(d.Store), bundleRefs(filepath.Join(cfg.DataDir, "sandboxes"), blobs.Dir(), d.im.dir))
	return nil
}

// startIdentity starts the workload identity issuer (its keys rotate in
// the background) and the metadata service that hands its tokens out.
func (d *Daemon) startIdentity(ctx context.Context) (err error) {
	cfg := &d.cfg
	if d.Issuer, err = identity.New(ctx, identity.Config{
		Issuer: cfg.IssuerURL, Dir: filepath.Join(cfg.sharedDir(), "identity"), Logger: cfg.Logger,
		Alg: cfg.IdentityAlg, IsActive: d.isActive, Leading: d.leaderFunc(),
	}); err != nil {
		return fmt.Errorf("identity issuer: %w", err)
	}
	d.wi.iss = d.Issuer
	go func() {
		if err := d.Issuer.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("identity key rotation", "err", err)
		}
	}()
	if d.Metadata, err = metadata.New(metadata.Config{Issuer: d.Issuer, Resolver: d.wi, Logger: cfg.Logger}); err != nil {
		return err
	}
	d.wi.meta = d.Metadata
	return nil
}

// startMCP opens the MCP gateway. It never dials sandboxes, the node's
// service address or tunnel space (besides the link-local and metadata
// addresses it always refuses).
func (d *Daemon) startMCP(context.Context) (err error) {
	s4, s6 := d.Net.Subnets()
	deny := []netip.Prefix{s4, s6, netip.PrefixFrom(d.Net.ServiceAddr(), 32), d.tun.base}
	if d.mcp, err = newMCPGateway(d.cfg.sharedDir(), d.Store, d.Issuer, deny, d.cfg.MCPAuditRetention, d.cfg.Logger); err != nil {
		return fmt.Errorf("MCP gateway: %w", err)
	}
	d.mcp.leading = d.leaderFunc()
	return nil
}

// newAuth builds the authenticator of API keys and workload tokens, which
// the API server and the ingress listener share.
func (d *Daemon) newAuth(context.Context) error {
	d.auth = api.NewAuthenticator(d.Store, d.wi)
	return nil
}

// newIngress builds the ingress routes to exposed sandbox ports (served
// once the API runs: startIngress). Private routes check keys with the
// authenticator and sandboxes with the live set, both built before it; the
// API server, built after it, routes exposures through it.
func (d *Daemon) newIngress(context.Context) (err error) {
	d.ingress, err = newIngress(&d.cfg, d.Store, d.auth, d.live)
	return err
}

// startAPI builds the API server on everything above and reconciles the
// store with the node (sandboxes that ran on, ended, or were left behind).
func (d *Daemon) startAPI(ctx context.Context) error {
	cfg := &d.cfg
	acfg := api.Config{
		Store: d.Store, Node: d.apiNode(), Logger: cfg.Logger, ImageStore: imageStore{d.Registry, d.Cache},
		DefaultMemoryMB: cfg.Limits.DefaultMemoryMB, NodeMemoryMB: cfg.Limits.nodeMemoryMB,
		Workload: d.wi, Identity: d.wi, Policies: d.pol, Images: d.im, Tunnels: d.tun, MCP: d.mcp,
		DefaultQuota: cfg.DefaultQuota, OrgMaxTunnels: orgMaxTunnels(cfg.OrgMaxTunnels), Live: d.live, Auth: d.auth, Ingress: d.ingress.backend(),
		KeepStopped: cfg.Limits.KeepStopped, KeepStoppedMB: cfg.Limits.KeepStoppedMB,
		Hooks: d.sandboxHooks(),
	}
	if d.leader != nil {
		acfg.Leader = d.leader
	}
	if d.router != nil {
		// Egress rules are enforced on the node a sandbox runs on: the
		// control plane resolves its policies and sends them there
		// (daemon/fleetegress.go). Builds run here and land in this
		// registry, which nodes pull from; their references are handed to
		// nodes registry-independent (fleetImages).
		// Tunnel members run on their nodes; the membership is kept in
		// the store, shared by replicas (daemon/fleettunnel.go).
		d.ftun = newFleetTunnels(d.tun, d.router, d.Store, d.log.With("component", "fleet"))
		d.ftun.leading = d.leaderFunc()
		go d.ftun.run(ctx)
		acfg.Tunnels = d.ftun
		// Snapshots: the node streams the layer (a stopped sandbox's from
		// where its teardown kept it, on its node), this control plane
		// pushes it (fleetsnapshot.go).
		acfg.Policies, acfg.Hooks, acfg.Fleet, acfg.Images = &fleetPolicies{router: d.router}, d.fleetHooks(), d.router, fleetImages{d.im, d.Registry}
	}
	d.API = api.New(ctx, acfg)
	if d.router != nil {
		d.router.SetReadopter(d.API.ReadoptLost) // lost sandboxes a returned node still runs
		go d.API.RunDrains(ctx, time.Second)     // drain deadlines, on the leader
	}
	if err := d.API.Reconcile(ctx); err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	// After reconcile reaped the previous process's pre-started sandboxes.
	if err := d.Agent.RestorePool(); err != nil {
		d.log.Warn("pre-started sandboxes: counts of the previous run", "err", err)
	}
	// Egress rules left by the previous process for sandboxes that ended meanwhile.
	for _, id := range d.Egress.Adopted() {
		if !d.API.IsActive(ctx, id) {
			_ = d.Egress.Remove(ctx, id)
		}
	}
	return nil
}

// sandboxHooks is what the daemon adds to a sandbox's life, in one place:
// before it starts (image mounts, identity files), once it runs (tunnels),
// when it ends and when a restart finds it running.
func (d *Daemon) sandboxHooks() api.Hooks {
	return api.Hooks{
		Prepare: func(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
			if d.cfg.Runtime == sandbox.RuntimeRunsc && len(sb.Tunnels) > 0 {
				// The WireGuard device is added to the sandbox's network
				// namespace after start; gVisor's network stack only
				// takes over the interfaces present when it starts.
				return fmt.Errorf("sandbox %s: tunnels are not available on this node: it runs sandboxes on gVisor (chalkd --runtime runsc), whose network stack cannot use the tunnel's device: %w", sb.ID, errdefs.ErrFailedPrecondition)
			}
			if err := d.im.binds(ctx, sb, req); err != nil {
				return err
			}
			return d.wi.prepare(ctx, sb, req)
		},
		Started: d.tun.started,
		Ended: func(ctx context.Context, sb *store.Sandbox) {
			t0 := time.Now()
			d.ingress.ended(ctx, sb)
			d.Tunnels.Leave(sb.ID)
			d.mcp.ended(sb.ID)
			t1 := time.Now()
			d.wi.ended(ctx, sb)
			t2 := time.Now()
			d.pol.remove(ctx, sb)
			d.log.Debug("sandbox end hooks", "sandbox", sb.ID, "ingress_tunnels_mcp", t1.Sub(t0), "identity", t2.Sub(t1), "egress", time.Since(t2))
		},
		Resumed: func(ctx context.Context, sb *store.Sandbox) {
			d.wi.resume(ctx, sb)
			if err := d.pol.resume(ctx, d.Store, sb); err != nil {
				d.log.Error("resume egress policy", "sandbox", sb.ID, "err", err)
			}
			if err := d.tun.resume(ctx, sb); err != nil {
				d.log.Error("rejoin tunnels", "sandbox", sb.ID, "err", err)
			}
		},
	}
}

// startBackground starts the node cache's garbage collection (under its
// size cap, every 10 minutes).
func (d *Daemon) startBackground(ctx context.Context) error {
	go periodic.WhileLeading(ctx, 10*time.Minute, nil, func() {
		if freed, err := d.Agent.CollectGarbage(ctx); err != nil {
			d.log.Warn("node cache GC", "err", err)
		} else if freed > 0 {
			d.log.Info("node cache GC", "freed_bytes", freed)
		}
	})
	return nil
}

// agentResolvConf is the agent's ResolvConf: nil (its default, the DNS proxy
// at the sandbox's gateway) unless the daemon set one (node mode).
func (d *Daemon) agentResolvConf() func(*sandboxnet.Net) []byte {
	if d.resolvConf == nil {
		return nil
	}
	return func(*sandboxnet.Net) []byte { return d.resolvConf() }
}
