// Package daemon wires chalkd together: the store, the embedded registry, the
// node cache, sandbox networking, the runc runtime, the node agent and the API,
// plus the optional identity, egress and build integrations.
package daemon

import (
	"context"
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
	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/console"
	"github.com/chalkcompute/chalkcompute/egress"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/identity"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/nodecache"
	"github.com/chalkcompute/chalkcompute/noderpc"
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
	DataDir string // state: store, registry, cache, keys, tokens (default /var/lib/chalk)
	// Database is the store: a postgres:// URL, or a SQLite file's absolute
	// path (default: DataDir/chalk.db).
	Database      string
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
	// IdentityAlg is the signing algorithm of new identity keys
	// (identity.Config.Alg): "" is ES256 without replacing existing keys,
	// "RS256" or "ES256" replaces a published next key of the other one.
	IdentityAlg string
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
	// NetnsPool and NetnsPoolMax size the spare network pool
	// (sandboxnet.Config's fields of the same names; 0: its defaults).
	NetnsPool, NetnsPoolMax int
	// Runtime is the OCI runtime of this node's sandboxes: "runc" (default)
	// or "runsc" (gVisor; implies NoUserNS). RuntimeBinary overrides its
	// path (default: the name, from PATH).
	Runtime       string
	RuntimeBinary string
	// SeccompLoader is who loads a runc sandbox's seccomp filter:
	// sandbox.SeccompInit (default: compiled once by chalkd, loaded by
	// chalk-init) or sandbox.SeccompRunc (runc and libseccomp on every start).
	SeccompLoader string
	// Prestart is how many sandboxes are kept pre-started for each of the
	// recently used images (node/pool.go); 0 turns that off (`image warm
	// --sandboxes N` still pre-starts). PrestartSlots is the network slot
	// range of pre-started sandboxes; negative: none at all. Defaults 2
	// and 32 (DefaultPrestart, DefaultPrestartSlots).
	Prestart      int
	PrestartSlots int
	// UploadGCGrace: uploaded content (DataDir/blobs, DataDir/mounts) no
	// live sandbox binds and nothing holds is removed this long after its
	// last use (uploadgc.go; 0: never, as before; chalkd's flag defaults to
	// DefaultUploadGCGrace).
	UploadGCGrace time.Duration
	// MCPAuditRetention is how long MCP gateway audit records are kept
	// (default DefaultMCPAuditRetention).
	MCPAuditRetention time.Duration
	// AuditRetention is how long the orgs' audit trail records are kept
	// (auditprune.go); 0 or less: for ever (chalkd's flag defaults to
	// DefaultAuditRetention).
	AuditRetention time.Duration
	Limits         Limits // memory defaults, console log bounds (limits.go)
	Logger         *slog.Logger
	// DefaultQuota is every org's quota where the node admin set none (zero: no limits;
	// chalkd sets MaxUploadBytes to DefaultOrgMaxUploadBytes unless told).
	DefaultQuota store.Quota
	// OrgMaxTunnels is the most tunnels an org may have (0:
	// DefaultOrgMaxTunnels; negative: no limit).
	OrgMaxTunnels int
	Ingress       IngressConfig // exposed sandbox ports (daemon/ingress.go)
	// Fleet, if set, makes this the control plane of a fleet (fleet.go):
	// sandboxes are placed on joined node agents, none run here.
	Fleet *FleetConfig
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
	if c.Database == "" {
		c.Database = filepath.Join(c.DataDir, "chalk.db")
	}
	if !store.IsPostgres(c.Database) && !filepath.IsAbs(c.Database) {
		return fmt.Errorf("database %q: want a postgres:// URL or the absolute path of a SQLite file: %w", store.Redact(c.Database), errdefs.ErrInvalidArgument)
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
		c.ClientConfig = chalkcompute.DefaultConfigPath()
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

	tun     *tunnels
	ftun    *fleetTunnels // control mode: the fleet's tunnel membership (fleettunnel.go)
	mcp     *mcpGateway
	ingress *ingressNode
	// Built by Start's steps for later ones (start.go).
	live *api.Live // which sandboxes are live: filled by API, read by the pool and the issuer
	wi   *workloadIdentity
	auth *api.Authenticator // API keys and workload tokens: the API's callers and the ingress's
	pol  *policies
	im   *images
	// Fleet (fleet.go): the router of control mode, the fleet listener's
	// address; resolvConf replaces the agent's default resolv.conf (node mode).
	router            *noderpc.Router
	fleetAddr         string
	fleetRegistryAddr string
	resolvConf        func() []byte
	nodeMode          bool // `chalkd node` (fleetpool.go)
	nodeWL            *nodeWorkloads

	// leader is the leader lease's state (replicas only); releaseStart
	// gives the start lease back (replicas.go).
	leader       *leadership
	releaseStart func()

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
	if err := cfg.checkReplicas(); err != nil {
		return nil, err
	}
	if cfg.Fleet != nil {
		// No sandboxes run on the control plane: no pre-started ones either.
		cfg.Prestart, cfg.PrestartSlots = 0, -1
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger}
	ctx, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	// Each step builds one subsystem from those built before it (start.go).
	for _, step := range []struct {
		name string
		run  func(context.Context) error
	}{
		{"data dir", d.prepareDataDir},
		{"store", d.openStore},
		{"replica start lease", d.takeStartLease},
		{"registry and node cache", d.startImages},
		{"sandbox network", d.startNetwork},
		{"sandbox runtime", d.startRuntime},
		{"node agent", d.startAgent},
		{"tunnels and egress", d.startEgress},
		{"image builds", d.startBuilds},
		{"identity and metadata", d.startIdentity},
		{"MCP gateway", d.startMCP},
		{"authentication", d.newAuth},
		{"ingress", d.newIngress},
		{"fleet", d.startFleet},
		{"API", d.startAPI},
		{"background work", d.startBackground},
		{"audit retention", d.startAuditRetention},
	} {
		if err := step.run(ctx); err != nil {
			d.log.Debug("start step failed", "step", step.name, "err", err)
			return nil, err
		}
	}
	if err := d.bootstrapToken(ctx); err != nil {
		return nil, err
	}
	if err := d.serve(); err != nil {
		return nil, err
	}
	if err := startIngress(ctx, d); err != nil {
		return nil, err
	}
	d.endStart(ctx)
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
		// The format is the SDKs' (chalkcompute owns it).
		if err := chalkcompute.WriteConfigFile(d.cfg.ClientConfig, &chalkcompute.FileConfig{APIURL: url, Token: secret}); err != nil {
			return err
		}
	}
	d.log.Info("created admin API token", "file", filepath.Join(d.cfg.DataDir, "admin.token"))
	return nil
}

func writeFile0600(path string, b []byte) error { return atomicfile.WriteFile(path, b, 0o600) }

// Close stops serving. Running sandboxes keep running; the next start
// reattaches to them.
func (d *Daemon) Close() error {
	var errs []error
	if d.releaseStart != nil {
		d.releaseStart() // a start that failed
	}
	d.ingress.close() // cut exposed routes' streams first: Shutdown waits for requests
	for _, s := range d.servers {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = s.Shutdown(ctx)
		cancel()
	}
	if d.API != nil {
		d.API.Shutdown()
		d.API.CloseAudit()
	}
	if d.Agent != nil {
		d.Agent.ClosePool()
		// Teardowns under way finish now (a bounded wait); the next
		// start finishes any left (their journal).
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := d.Agent.WaitTeardowns(ctx); err != nil {
			d.log.Warn("stop", "err", err)
		}
		cancel()
		d.Agent.DropKept() // stopped sandboxes' kept layers (a restart would remove them)
		// The teardowns' refill of spare networks ends before the process
		// does, and the spares are deleted (a pool grown by a burst holds
		// up to --netns-pool-max).
		d.Net.WaitRefill()
		if err := d.Net.CloseSpares(); err != nil {
			d.log.Warn("stop: spare networks", "err", err)
		}
	}
	if d.wi != nil {
		d.wi.removing.Wait()
	}
	if d.cancel != nil {
		d.cancel()
	}
	if d.Tunnels != nil {
		d.Tunnels.Close()
		tunnelManagers.Delete(d.Tunnels)
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

// DefaultOrgMaxUploadBytes is --org-max-upload-bytes' default: an org's
// uploads (each distinct digest it uploaded, until the upload GC removes
// it) may take 10 GiB of the data dir every org shares.
const DefaultOrgMaxUploadBytes = 10 << 30
