// Package daemon wires chalkd together: the store, the embedded registry, the
// node cache, sandbox networking, the runc runtime, the node agent and the API,
// plus the optional identity, egress and build integrations.
package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/console"
	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/imagespec"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// stageBinaries copies chalk-init and chalk (if any) into dir (0755), each
// replaced atomically (running sandboxes keep the file they mounted) unless
// the copy there is already of that file, and
// returns the copies' paths.
func stageBinaries(dir, initBin, chalkBin string) (string, string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", "", err
	}
	var out [2]string
	for i, src := range []string{initBin, chalkBin} {
		if src == "" {
			continue
		}
		dst := filepath.Join(dir, filepath.Base(src))
		if err := copyExecutable(src, dst); err != nil {
			return "", "", fmt.Errorf("stage %s for sandboxes: %w", src, err)
		}
		out[i] = dst
	}
	return out[0], out[1], nil
}

func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	// A copy made from this very file (same size, its mtime) is kept.
	if d, err := os.Stat(dst); err == nil && d.Size() == st.Size() && d.ModTime().Equal(st.ModTime()) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".stage-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chtimes(tmp.Name(), st.ModTime(), st.ModTime()); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// userNS is the user namespace of sandbox id in slot (nil without).
func (d *Daemon) userNS(id string, slot int) *sandboxnet.UserNS { return d.Net.Lookup(id, slot).UserNS }

// Config is chalkd's configuration. The zero value plus a DataDir works.
type Config struct {
	DataDir       string // state: store, registry, cache, keys, tokens (default /var/lib/chalk)
	RunDir        string // runtime state: runc root, netns files (default /run/chalk)
	Listen        string // API TCP address (default 127.0.0.1:7447); "" with Socket set disables TCP
	Socket        string // API unix socket (default RunDir/chalkd.sock)
	RegistryAddr  string // embedded registry (default 127.0.0.1:7448)
	InitBinary    string // default: chalk-init next to the chalkd executable
	ChalkBinary   string // default: chalk next to the chalkd executable (optional)
	Subnet        string // sandbox IPv4 subnet (sandboxnet default if empty)
	Subnet6       string
	NetPrefix     string // interface name prefix (sandboxnet default if empty)
	NetTable      string // nftables table (sandboxnet default if empty)
	CgroupParent  string
	CacheMaxBytes int64
	// ClientConfig, if set, is where chalkd writes the CLI/SDK config (API URL +
	// admin token) on first start. Default: $HOME/.config/chalk/config.json.
	ClientConfig string
	Upstreams    map[string]string // registry pull-through upstreams
	// IssuerURL is the workload identity issuer (https in production; the
	// discovery document and JWKS must be reachable there). Default:
	// http://<Listen>, for development.
	IssuerURL string
	// BuildEnv is added to image build RUN steps (e.g. PIP_INDEX_URL,
	// PIP_TRUSTED_HOST for a private package index); not part of image hashes.
	BuildEnv []string
	// DNSUpstream is where the DNS proxy forwards allowed names (host:port;
	// default: the first nameserver of /etc/resolv.conf).
	DNSUpstream string
	// MetadataPort is where the metadata service listens on the node service
	// address (sandboxes reach it as 169.254.169.254:80). Default 80.
	MetadataPort uint16
	// QueryURL is the organisation's Chalk query server as reachable from
	// inside sandboxes. When set, every sandbox gets a token for it
	// (audience QueryURL) and CHALK_QUERY_URL, so `chalk query` inside
	// works with no configuration (metadata.ChalkQueryFederation).
	QueryURL string
	// AWSRegion is the AWS region (AWS_REGION, AWS_DEFAULT_REGION) of
	// sandboxes created with an AWS role and no region of their own; ""
	// means metadata.DefaultAWSRegion.
	AWSRegion string
	// TunnelSubnets is carved into one /24 per WireGuard tunnel (default
	// DefaultTunnelSubnets). TunnelEndpoint is the node's address as external
	// WireGuard peers reach it (default: its address toward the outside).
	TunnelSubnets  string
	TunnelEndpoint string
	// NoUserNS runs sandboxes without user namespaces: their root is then the
	// host's root, confined only by capabilities, seccomp and the rest. The
	// default gives each sandbox a user namespace mapping its ids to a host
	// range of its own starting at UIDBase (default sandboxnet.DefaultUIDBase).
	NoUserNS bool
	UIDBase  uint32
	// Runtime is the OCI runtime of this node's sandboxes: "runc" (default)
	// or "runsc" (gVisor; implies NoUserNS). RuntimeBinary overrides its
	// path (default: the name, from PATH).
	Runtime       string
	RuntimeBinary string
	// Prestart is how many sandboxes are kept pre-started for each of the
	// recently used images (node/pool.go); 0 turns that off (`image warm
	// --sandboxes N` still pre-starts). PrestartSlots is the network slot
	// range of pre-started sandboxes; negative: none at all. Defaults 2
	// and 32 (DefaultPrestart, DefaultPrestartSlots).
	Prestart      int
	PrestartSlots int
	// MCPAuditRetention is how long MCP gateway audit records are kept
	// (default DefaultMCPAuditRetention).
	MCPAuditRetention time.Duration
	Limits            Limits // memory defaults, console log bounds (limits.go)
	Logger            *slog.Logger
	// DefaultQuota is every org's quota where the node admin set none (zero: no limits).
	DefaultQuota store.Quota
}

// Defaults of the pre-started sandboxes.
const (
	DefaultPrestart      = 2
	DefaultPrestartSlots = 32
)

func (c *Config) defaults() error {
	if c.PrestartSlots == 0 {
		c.PrestartSlots = DefaultPrestartSlots
	}
	if c.Prestart < 0 {
		return fmt.Errorf("prestart %d: want 0 or more: %w", c.Prestart, errdefs.ErrInvalidArgument)
	}
	if err := c.Limits.defaults(); err != nil {
		return err
	}
	if c.DataDir == "" {
		c.DataDir = "/var/lib/chalk"
	}
	if c.Runtime == sandbox.RuntimeRunsc {
		c.NoUserNS = true // see sandbox/runsc.go
	}
	if c.RunDir == "" {
		c.RunDir = "/run/chalk"
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.RunDir, "chalkd.sock")
	}
	if c.RegistryAddr == "" {
		c.RegistryAddr = "127.0.0.1:7448"
	}
	exe, _ := os.Executable()
	if c.InitBinary == "" {
		c.InitBinary = filepath.Join(filepath.Dir(exe), "chalk-init")
	}
	if c.ChalkBinary == "" {
		if p := filepath.Join(filepath.Dir(exe), "chalk"); fileExists(p) {
			c.ChalkBinary = p
		}
	}
	if c.ClientConfig == "" {
		if home, err := os.UserHomeDir(); err == nil {
			c.ClientConfig = filepath.Join(home, ".config", "chalk", "config.json")
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.IssuerURL == "" {
		host := c.Listen
		if host == "" {
			host = "127.0.0.1:7447"
		}
		c.IssuerURL = "http://" + host
	}
	if c.MetadataPort == 0 {
		c.MetadataPort = 80
	}
	if c.AWSRegion != "" {
		if err := metadata.ValidateAWS("", c.AWSRegion); err != nil {
			return fmt.Errorf("--aws-region: %w", err)
		}
	}
	if c.QueryURL != "" {
		if _, err := metadata.ChalkQueryFederation(c.QueryURL); err != nil {
			return fmt.Errorf("--query-url: %w", err)
		}
	}
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// Daemon is a running chalkd.
type Daemon struct {
	cfg      Config
	log      *slog.Logger
	Store    *store.Store
	Registry *registry.Registry
	Cache    *nodecache.Cache
	Net      *sandboxnet.Manager
	Runtime  *sandbox.Runtime
	Agent    *node.Agent
	API      *api.Server
	Egress   *egress.Manager
	Tunnels  *tunnel.Manager
	Issuer   *identity.Issuer
	Metadata *metadata.Server

	tun *tunnels
	mcp *mcpGateway

	AdminToken string // set when this start created it
	servers    []*http.Server
	listeners  []net.Listener
	cancel     context.CancelFunc
}

// Start brings up every component and serves the API. It returns once serving.
func Start(ctx context.Context, cfg Config) (_ *Daemon, err error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger}
	ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	for _, dir := range []string{cfg.DataDir, cfg.RunDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
	}
	if !cfg.NoUserNS {
		// Sandboxes' roots are unprivileged host uids that must pass through
		// the data dir to their own rootfs and binds (as dockerd's under
		// userns-remap): searchable, not listable. Everything secret in it
		// is 0600/0700 on its own.
		if err := os.Chmod(cfg.DataDir, 0o711); err != nil {
			return nil, err
		}
	}
	if err := restrictDataDir(cfg.DataDir, !cfg.NoUserNS); err != nil {
		return nil, err
	}
	go pruneLogsLoop(ctx, d.log, cfg.DataDir, cfg.Limits.LogRetention)
	if err := sandbox.SetSubreaper(); err != nil {
		return nil, fmt.Errorf("become subreaper: %w", err)
	}
	if d.Store, err = store.Open(ctx, filepath.Join(cfg.DataDir, "chalk.db")); err != nil {
		return nil, err
	}
	for _, f := range []string{"chalk.db", "chalk.db-wal", "chalk.db-shm"} {
		if err := os.Chmod(filepath.Join(cfg.DataDir, f), 0o600); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	regCfg := registryConfig(cfg.DataDir, cfg.RegistryAddr, cfg.Logger)
	regCfg.Upstreams = cfg.Upstreams
	if d.Registry, err = registry.New(ctx, regCfg); err != nil {
		return nil, fmt.Errorf("embedded registry: %w", err)
	}
	if d.Cache, err = nodecache.New(nodecache.Config{
		Root: filepath.Join(cfg.DataDir, "cache"), MaxBytes: cfg.CacheMaxBytes, Logger: cfg.Logger,
		Remote: d.Registry.PullOptions(), // the node pulls with the read-only credential
	}); err != nil {
		return nil, fmt.Errorf("node cache: %w", err)
	}
	netCfg := sandboxnet.Config{
		Prefix: cfg.NetPrefix, Table: cfg.NetTable, NetnsDir: filepath.Join(cfg.RunDir, "netns"), Logger: cfg.Logger,
		MetadataPort: cfg.MetadataPort, ServicePorts: []uint16{cfg.MetadataPort}, DNSPort: 53,
		UserNS: !cfg.NoUserNS, UIDBase: cfg.UIDBase,
	}
	if cfg.Subnet != "" {
		if netCfg.Subnet, err = netip.ParsePrefix(cfg.Subnet); err != nil {
			return nil, fmt.Errorf("subnet %q: %w", cfg.Subnet, err)
		}
	}
	if cfg.Subnet6 != "" {
		if netCfg.Subnet6, err = netip.ParsePrefix(cfg.Subnet6); err != nil {
			return nil, fmt.Errorf("subnet6 %q: %w", cfg.Subnet6, err)
		}
	}
	if cfg.TunnelSubnets == "" {
		cfg.TunnelSubnets = DefaultTunnelSubnets
	}
	if tp, err := netip.ParsePrefix(cfg.TunnelSubnets); err == nil {
		netCfg.Reserved = append(netCfg.Reserved, tp.Masked()) // validated with the tunnels below
	}
	if d.Net, err = sandboxnet.New(netCfg); err != nil {
		return nil, err
	}
	if err := d.Net.Init(ctx); err != nil {
		return nil, fmt.Errorf("sandbox network: %w", err)
	}
	if !cfg.NoUserNS {
		// Sandbox roots bind-mount chalk-init and chalk as unprivileged host
		// uids: wherever the binaries were built (say under /root, 0700), a
		// copy in the data dir is reachable.
		if cfg.InitBinary, cfg.ChalkBinary, err = stageBinaries(filepath.Join(cfg.DataDir, "bin"), cfg.InitBinary, cfg.ChalkBinary); err != nil {
			return nil, err
		}
	}
	if d.Runtime, err = sandbox.New(sandbox.Config{
		StateDir: filepath.Join(cfg.DataDir, "sandboxes"), LogDir: filepath.Join(cfg.DataDir, "logs"),
		RuncRoot: filepath.Join(cfg.RunDir, "runc"), InitBinary: cfg.InitBinary, ChalkBinary: cfg.ChalkBinary,
		CgroupParent: cfg.CgroupParent, Logger: cfg.Logger, Runtime: cfg.Runtime, RuncBinary: cfg.RuntimeBinary,
		LogMaxBytes: cfg.Limits.LogMaxBytes,
	}); err != nil {
		return nil, err
	}
	if !cfg.NoUserNS {
		if err := d.Runtime.CheckUserNS(); err != nil {
			return nil, fmt.Errorf("%w (or run chalkd --userns=false)", err)
		}
	}
	wi := &workloadIdentity{api: func() *api.Server { return d.API }, filesAt: filepath.Join(cfg.DataDir, "identity-files"), userNS: d.userNS, stops: map[string][]func(){}, queryURL: cfg.QueryURL, awsRegion: cfg.AWSRegion}
	pool := node.PoolConfig{
		Size: cfg.Prestart, Slots: max(cfg.PrestartSlots, 0), Dir: filepath.Join(cfg.DataDir, "prestarted"),
		NewID: api.NewSandboxID, Binds: wi.binds, Discard: wi.discard,
		CountsFile: filepath.Join(cfg.DataDir, "prestart-counts.json"),
		SlotBusy:   func(slot int) bool { return d.API != nil && d.API.SlotLive(slot) },
		Memory:     cfg.Limits.DefaultMemoryMB << 20, DiskMB: min(sandbox.DefaultDiskMB, cfg.Limits.DefaultMemoryMB),
	}
	if d.Agent, err = node.New(node.Config{
		Runtime: d.Runtime, Net: d.Net, Cache: d.Cache, Registry: d.Registry, Logger: cfg.Logger,
		ReservedSlots: buildSlots, Pool: pool,
	}); err != nil {
		return nil, err
	}
	d.Tunnels = tunnel.NewManager(cfg.Logger)
	tun, err := newTunnels(d.Tunnels, d.Agent, d.Store, cfg.TunnelSubnets, cfg.TunnelEndpoint)
	if err != nil {
		return nil, err
	}
	d.tun = tun
	// Egress policies and the DNS proxy every sandbox resolves through; it
	// answers the tunnels' names itself.
	if d.Egress, err = egress.New(egress.Config{
		Table: d.Net.Table(), Logger: cfg.Logger, Upstream: cfg.DNSUpstream, Local: localNames(tun),
		ListenAddrs: []string{
			netip.AddrPortFrom(d.Net.ServiceAddr(), 53).String(),
			netip.AddrPortFrom(d.Net.ServiceAddr6(), 53).String(),
		},
	}); err != nil {
		return nil, err
	}
	if err := d.Egress.Start(ctx); err != nil {
		return nil, fmt.Errorf("egress: %w", err)
	}
	pol := &policies{m: d.Egress, agent: d.Agent}
	// Image builds and uploaded content.
	blobs, err := imagebuild.NewBlobs(filepath.Join(cfg.DataDir, "blobs"))
	if err != nil {
		return nil, err
	}
	builder, err := imagebuild.New(imagebuild.Config{
		Registry: d.Registry, Cache: d.Cache, Runtime: d.Runtime, Blobs: blobs,
		Network: &buildNet{net: d.Net, used: map[int]bool{}}, Env: cfg.BuildEnv, MemoryMB: cfg.Limits.BuildMemoryMB,
		Defaults: imagespec.Defaults{PythonVersion: DefaultPython}, Logger: cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	im := &images{b: builder, blobs: blobs, dir: filepath.Join(cfg.DataDir, "mounts")}
	if err := os.MkdirAll(im.dir, 0o700); err != nil {
		return nil, err
	}
	if d.Issuer, err = identity.New(ctx, identity.Config{
		Issuer: cfg.IssuerURL, Dir: filepath.Join(cfg.DataDir, "identity"), Logger: cfg.Logger,
		IsActive: func(ctx context.Context, id string) bool { return d.API.IsActive(ctx, id) },
	}); err != nil {
		return nil, fmt.Errorf("identity issuer: %w", err)
	}
	wi.iss = d.Issuer
	go func() {
		if err := d.Issuer.Run(ctx); err != nil && ctx.Err() == nil {
			d.log.Error("identity key rotation", "err", err)
		}
	}()
	if d.Metadata, err = metadata.New(metadata.Config{Issuer: d.Issuer, Resolver: wi, Logger: cfg.Logger}); err != nil {
		return nil, err
	}
	wi.meta = d.Metadata
	// The MCP gateway never dials sandboxes, the node's service address or
	// tunnel space (besides the link-local and metadata addresses it always refuses).
	s4, s6 := d.Net.Subnets()
	deny := []netip.Prefix{s4, s6, netip.PrefixFrom(d.Net.ServiceAddr(), 32), tun.base}
	if d.mcp, err = newMCPGateway(cfg.DataDir, d.Store, d.Issuer, deny, cfg.MCPAuditRetention, cfg.Logger); err != nil {
		return nil, fmt.Errorf("MCP gateway: %w", err)
	}
	d.API = api.New(ctx, api.Config{
		Store: d.Store, Node: d.Agent, Logger: cfg.Logger, ImageStore: imageStore{d.Registry, d.Cache},
		DefaultMemoryMB: cfg.Limits.DefaultMemoryMB, NodeMemoryMB: cfg.Limits.nodeMemoryMB,
		Workload: wi, Identity: wi, Policies: pol, Images: im, Tunnels: tun, MCP: d.mcp,
		DefaultQuota: cfg.DefaultQuota,
		Hooks: api.Hooks{
			Prepare: func(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
				if cfg.Runtime == sandbox.RuntimeRunsc && len(sb.Tunnels) > 0 {
					// The WireGuard device is added to the sandbox's network
					// namespace after start; gVisor's network stack only
					// takes over the interfaces present when it starts.
					return fmt.Errorf("sandbox %s: tunnels are not available on this node: it runs sandboxes on gVisor (chalkd --runtime runsc), whose network stack cannot use the tunnel's device: %w", sb.ID, errdefs.ErrFailedPrecondition)
				}
				if err := im.binds(ctx, sb, req); err != nil {
					return err
				}
				return wi.prepare(ctx, sb, req)
			},
			Started: tun.started,
			Ended: func(ctx context.Context, sb *store.Sandbox) {
				d.Tunnels.Leave(sb.ID)
				d.mcp.ended(sb.ID)
				wi.ended(ctx, sb)
				pol.remove(ctx, sb)
			},
			Resumed: func(ctx context.Context, sb *store.Sandbox) {
				wi.resume(ctx, sb)
				if err := pol.resume(ctx, d.Store, sb); err != nil {
					d.log.Error("resume egress policy", "sandbox", sb.ID, "err", err)
				}
				if err := tun.resume(ctx, sb); err != nil {
					d.log.Error("rejoin tunnels", "sandbox", sb.ID, "err", err)
				}
			},
		},
	})
	if err := d.API.Reconcile(ctx); err != nil {
		return nil, fmt.Errorf("reconcile: %w", err)
	}
	// After reconcile reaped the previous process's pre-started sandboxes.
	if err := d.Agent.RestorePool(); err != nil {
		d.log.Warn("pre-started sandboxes: counts of the previous run", "err", err)
	}
	// Keep the node cache under its size cap.
	go func() {
		t := time.NewTicker(10 * time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if freed, err := d.Agent.CollectGarbage(ctx); err != nil {
					d.log.Warn("node cache GC", "err", err)
				} else if freed > 0 {
					d.log.Info("node cache GC", "freed_bytes", freed)
				}
			}
		}
	}()
	// Egress rules left by the previous process for sandboxes that ended meanwhile.
	for _, id := range d.Egress.Adopted() {
		if !d.API.IsActive(ctx, id) {
			_ = d.Egress.Remove(ctx, id)
		}
	}
	if err := d.bootstrapToken(ctx); err != nil {
		return nil, err
	}
	if err := d.serve(); err != nil {
		return nil, err
	}
	return d, nil
}

// handler is the API plus the issuer's discovery documents and the web console.
func (d *Daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/.well-known/", d.Issuer.DiscoveryHandler())
	mux.Handle("/metrics", d.API.RequireAdmin(promhttp.Handler()))
	// The web console: pages, sign-in and terminals; its browsers call the
	// API below with a session cookie (api.Server.Session).
	con := console.New(console.Config{API: d.API, Logger: d.log.With("component", "console")})
	mux.Handle("/console/", con)
	mux.Handle("/console", con)
	mux.Handle("/", d.API.Handler())
	return mux
}

// serve starts the API on the unix socket and the TCP address.
func (d *Daemon) serve() error {
	h := d.handler()
	// The metadata service on the node service address; sandboxes reach it as
	// 169.254.169.254 and, under /api, reach the API with their own identity.
	d.Metadata.Handle("/api/", sandboxAPI(d.API), metadata.WithoutFlavorHeader())
	d.Metadata.Handle("GET /v1/tunnels", http.HandlerFunc(d.tun.metadataTunnels))
	// The MCP gateway: stock MCP clients send no Metadata-Flavor header.
	d.Metadata.Handle("/mcp/", d.mcp.gw, metadata.WithoutFlavorHeader())
	ml, err := net.Listen("tcp", netip.AddrPortFrom(d.Net.ServiceAddr(), d.cfg.MetadataPort).String())
	if err != nil {
		return fmt.Errorf("metadata service: %w", err)
	}
	msrv := d.Metadata.HTTPServer()
	d.servers = append(d.servers, msrv)
	go func() {
		if err := msrv.Serve(d.Metadata.Listener(ml)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metadata server", "err", err)
		}
	}()
	if d.cfg.Socket != "" {
		_ = os.Remove(d.cfg.Socket)
		l, err := net.Listen("unix", d.cfg.Socket)
		if err != nil {
			return fmt.Errorf("listen %s: %w", d.cfg.Socket, err)
		}
		_ = os.Chmod(d.cfg.Socket, 0o600)
		d.listeners = append(d.listeners, l)
	}
	if d.cfg.Listen != "" {
		l, err := net.Listen("tcp", d.cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen %s: %w", d.cfg.Listen, err)
		}
		d.listeners = append(d.listeners, l)
	}
	for _, l := range d.listeners {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute, MaxHeaderBytes: 64 << 10}
		d.servers = append(d.servers, srv)
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				d.log.Error("api server", "err", err)
			}
		}()
	}
	return nil
}

// APIURL is the TCP URL of the API ("" if TCP is off).
func (d *Daemon) APIURL() string {
	for _, l := range d.listeners {
		if l.Addr().Network() == "tcp" {
			return "http://" + l.Addr().String()
		}
	}
	return ""
}

// SocketPath is the API's unix socket.
func (d *Daemon) SocketPath() string { return d.cfg.Socket }

// ClientConfig is what the CLI and SDKs read to find and authenticate to chalkd.
type ClientConfig struct {
	APIURL string `json:"api_url"`
	Token  string `json:"token"`
}

// bootstrapToken creates the admin token on first start and writes it 0600 to
// the data dir and to the CLI's config.
func (d *Daemon) bootstrapToken(ctx context.Context) error {
	if has, err := d.Store.HasUsers(ctx); err != nil || has {
		return err
	}
	// The node admin "admin", admin of the org "default", with one key.
	secret, prefix, hash := api.NewKey()
	now := time.Now().UTC()
	key := &store.APIKey{ID: "admin", Hash: hash, Prefix: prefix, OrgID: "default", User: "admin", Name: "admin",
		Role: store.RoleAdmin, CreatedBy: "chalkd", CreatedAt: now}
	if err := d.Store.CreateOrg(ctx, store.Org{Name: "default", CreatedAt: now}, "admin", true, key); err != nil {
		return err
	}
	d.AdminToken = secret
	if err := writeFile0600(filepath.Join(d.cfg.DataDir, "admin.token"), []byte(secret+"\n")); err != nil {
		return err
	}
	if d.cfg.ClientConfig != "" {
		url := "http://" + d.cfg.Listen
		if d.cfg.Listen == "" {
			url = "unix://" + d.cfg.Socket
		}
		b, _ := json.MarshalIndent(ClientConfig{APIURL: url, Token: secret}, "", "  ")
		if err := os.MkdirAll(filepath.Dir(d.cfg.ClientConfig), 0o700); err != nil {
			return err
		}
		if err := writeFile0600(d.cfg.ClientConfig, append(b, '\n')); err != nil {
			return err
		}
	}
	d.log.Info("created admin API token", "file", filepath.Join(d.cfg.DataDir, "admin.token"))
	return nil
}

func writeFile0600(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Close stops serving. Running sandboxes keep running; the next start
// reattaches to them.
func (d *Daemon) Close() error {
	var errs []error
	for _, s := range d.servers {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = s.Shutdown(ctx)
		cancel()
	}
	if d.API != nil {
		d.API.Shutdown()
	}
	if d.Agent != nil {
		d.Agent.ClosePool()
	}
	if d.cancel != nil {
		d.cancel()
	}
	if d.Tunnels != nil {
		d.Tunnels.Close()
	}
	if d.mcp != nil {
		d.mcp.close()
	}
	if d.Cache != nil {
		errs = append(errs, d.Cache.Flush())
	}
	if d.Registry != nil {
		errs = append(errs, d.Registry.Close())
	}
	if d.Store != nil {
		errs = append(errs, d.Store.Close())
	}
	return errors.Join(errs...)
}

// Main runs chalkd until ctx is done.
func Main(ctx context.Context, cfg Config) error {
	d, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	cfg.Logger.Info("chalkd serving", "api", d.APIURL(), "socket", d.SocketPath(), "registry", d.Registry.Addr())
	<-ctx.Done()
	return d.Close()
}
