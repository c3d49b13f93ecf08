// Command chalkd is the chalkcompute daemon: control plane and node agent in one
// process by default; `chalkd control` is the control plane of a fleet and
// `chalkd node` one of its node agents (daemon/fleet.go).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/daemon"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/sandboxnet"
	"github.com/chalkcompute/chalkcompute/store"
)

func main() {
	args, mode := os.Args[1:], ""
	if len(args) > 0 {
		switch args[0] {
		case "seed":
			seed(args[1:])
			return
		case "control":
			if len(args) > 1 && args[1] == "token" {
				controlToken(args[2:])
				return
			}
			mode, args = "control", args[1:]
		case "node":
			mode, args = "node", args[1:]
		case "copy-store":
			copyStore(args[1:])
			return
		}
	}
	f := newFlags(mode, flag.ExitOnError)
	cfg, nopts := &f.cfg, &f.nopts
	_ = f.fs.Parse(args)
	cfg.NoUserNS = !*f.userns
	level, upstreams, pprofSocket := f.level, f.upstreams, f.pprofSocket
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintln(os.Stderr, "chalkd: bad -log-level:", err)
		os.Exit(2)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	if upstreams != "" {
		cfg.Upstreams = map[string]string{}
		for _, kv := range strings.Split(upstreams, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				fmt.Fprintf(os.Stderr, "chalkd: bad -registry-upstreams entry %q (want host=url)\n", kv)
				os.Exit(2)
			}
			cfg.Upstreams[k] = v
		}
	}
	if pprofSocket != "" {
		if err := servePprof(pprofSocket); err != nil {
			fmt.Fprintln(os.Stderr, "chalkd: -pprof-socket:", err)
			os.Exit(2)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch mode {
	case "node":
		err = daemon.MainNode(ctx, *cfg, *nopts)
	case "control":
		if f.nodeTimeout <= 0 {
			fmt.Fprintf(os.Stderr, "chalkd control: --node-timeout %v: must be positive\n", f.nodeTimeout)
			os.Exit(2)
		}
		if f.lostGrace < 0 {
			fmt.Fprintf(os.Stderr, "chalkd control: --lost-grace %v: want 0 (never re-adopt) or more\n", f.lostGrace)
			os.Exit(2)
		}
		cfg.Fleet = &daemon.FleetConfig{Listen: f.fleetListen, RegistryListen: f.fleetRegistry, RegistryAdvertise: f.fleetRegistryAdvertise, NodeTimeout: f.nodeTimeout, LostGrace: f.lostGrace, Prestart: cfg.Prestart, SharedDir: f.sharedDir}
		if cfg.Prestart < 0 {
			fmt.Fprintf(os.Stderr, "chalkd control: --prestart %d: want 0 or more\n", cfg.Prestart)
			os.Exit(2)
		}
		err = daemon.Main(ctx, *cfg)
	default:
		err = daemon.Main(ctx, *cfg)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "chalkd:", err)
		os.Exit(1)
	}
}

// controlToken prints a one-time join token for a node (its hash is stored;
// the token itself is shown once, here).
func controlToken(args []string) {
	fs := flag.NewFlagSet("chalkd control token", flag.ExitOnError)
	dataDir := fs.String("data-dir", "/var/lib/chalk", "the control plane's data dir")
	database := fs.String("database", os.Getenv("CHALK_DATABASE"), "the control plane's store, as its --database (a postgres:// URL or a SQLite file; default $CHALK_DATABASE, else DATA_DIR/chalk.db)")
	ttl := fs.Duration("ttl", time.Hour, "how long the token is valid")
	sharedDir := fs.String("shared-dir", "", "the replicas' shared dir, as their --shared-dir (the fleet CA is there)")
	_ = fs.Parse(args)
	if *sharedDir != "" {
		if !store.IsPostgres(*database) {
			fmt.Fprintln(os.Stderr, "chalkd control token: --shared-dir needs --database postgres://… (the replicas' store)")
			os.Exit(2)
		}
		*dataDir = *sharedDir // the CA is in the shared dir
	}
	if *ttl <= 0 || *ttl > 7*24*time.Hour {
		fmt.Fprintln(os.Stderr, "chalkd control token: --ttl must be positive and at most a week")
		os.Exit(2)
	}
	tok, err := daemon.NewJoinToken(context.Background(), *dataDir, *database, *ttl)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chalkd control token:", err)
		os.Exit(1)
	}
	fmt.Println(tok)
}

// seed pushes the base images into the embedded registry's storage.
func seed(args []string) {
	var o daemon.SeedOptions
	fs := flag.NewFlagSet("chalkd seed", flag.ExitOnError)
	fs.StringVar(&o.DataDir, "data-dir", "/var/lib/chalk", "chalkd's data dir (chalkd must not be running on it)")
	fs.BoolVar(&o.Busybox, "busybox", false, "seed "+daemon.BusyboxRef+" from the host's busybox-static")
	fs.StringVar(&o.CacheDir, "cache-dir", "", "where the Python base layer is cached (default DATA_DIR/seed-cache)")
	fs.BoolVar(&o.Python, "python", false, "seed "+daemon.PythonRef+" (debootstrap from the Debian mirror; minutes, once)")
	_ = fs.Parse(args)
	if !o.Busybox && !o.Python {
		fmt.Fprintln(os.Stderr, "chalkd seed: say what to seed: --busybox and/or --python")
		os.Exit(2)
	}
	o.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := daemon.Seed(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "chalkd seed:", err)
		os.Exit(1)
	}
}

// copyStore copies a SQLite store into an empty PostgreSQL database.
func copyStore(args []string) {
	fs := flag.NewFlagSet("chalkd copy-store", flag.ExitOnError)
	from := fs.String("from", "/var/lib/chalk/chalk.db", "the SQLite store (chalkd must not be running on it)")
	to := fs.String("to", os.Getenv("CHALK_DATABASE"), "the PostgreSQL database (postgres://…; empty, chalkd's tables are made first); default $CHALK_DATABASE")
	_ = fs.Parse(args)
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "chalkd copy-store:", err)
		os.Exit(1)
	}
	if !store.IsPostgres(*to) {
		fail(fmt.Errorf("--to %q: want a postgres:// URL", store.Redact(*to)))
	}
	if _, err := os.Stat(*from); err != nil {
		fail(fmt.Errorf("--from: %w", err)) // Open would make an empty one
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	src, err := store.Open(ctx, *from)
	if err != nil {
		fail(err)
	}
	defer src.Close()
	dst, err := store.Open(ctx, *to)
	if err != nil {
		fail(err)
	}
	defer dst.Close()
	total := 0
	if err := src.CopyTo(ctx, dst, func(table string, rows int) {
		total += rows
		fmt.Fprintf(os.Stderr, "copied %s: %d rows\n", table, rows)
	}); err != nil {
		fail(err)
	}
	fmt.Printf("copied %d rows from %s to %s; start chalkd with --database set to it\n", total, *from, store.Redact(*to))
}

// servePprof serves net/http/pprof on a unix socket only root can connect to
// (profiles show memory contents: never on a TCP port).
func servePprof(path string) error {
	_ = os.Remove(path)
	old := syscall.Umask(0o077) // no window in which others may connect; nothing else runs yet
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	go func() { _ = http.Serve(l, mux) }()
	return nil
}

// chalkdFlags is chalkd's flag set of a mode ("", "control" or "node") and
// where its values land (the deployment guide's test checks the flags of
// deploy/systemd's units against it).
type chalkdFlags struct {
	fs                                                 *flag.FlagSet
	cfg                                                daemon.Config
	nopts                                              daemon.NodeOptions
	level, upstreams, pprofSocket                      string
	fleetListen, fleetRegistry, fleetRegistryAdvertise string
	sharedDir                                          string
	lostGrace                                          time.Duration
	nodeTimeout                                        time.Duration
	userns                                             *bool
}

func newFlags(mode string, eh flag.ErrorHandling) *chalkdFlags {
	f := &chalkdFlags{}
	cfg, nopts := &f.cfg, &f.nopts
	fs := flag.NewFlagSet(strings.TrimSpace("chalkd "+mode), eh)
	switch mode {
	case "control":
		fs.StringVar(&f.fleetListen, "fleet-listen", daemon.DefaultFleetListen, "the fleet listener (TLS with the fleet CA): node agents join and heartbeat here")
		fs.StringVar(&f.fleetRegistry, "fleet-registry-listen", daemon.DefaultFleetRegistryListen, "the embedded registry for node agents (TLS with the fleet CA; the read-only pull credential, which nodes get over the fleet channel)")
		fs.StringVar(&f.fleetRegistryAdvertise, "fleet-registry-advertise", "", "the registry's TLS listener as nodes reach it, host:port (default: the host a node joined at, the port of --fleet-registry-listen)")
		fs.DurationVar(&f.nodeTimeout, "node-timeout", noderpc.DefaultHeartbeatTimeout, "a node silent this long is lost (its sandboxes end as lost)")
		fs.DurationVar(&f.lostGrace, "lost-grace", noderpc.DefaultLostGrace, "a node that returns within this long of its sandboxes being reported lost has those still running there re-adopted (running again); later, or not running, they are destroyed there (0: never re-adopt)")
		fs.StringVar(&f.sharedDir, "shared-dir", "", "run as one of several control-plane replicas on one PostgreSQL --database: the directory they share (fleet CA, identity and other keys, the registry's storage; docs/DEPLOY.md)")
	case "node":
		fs.StringVar(&nopts.Join, "join", "", "the control plane's fleet listener, https://control:7450 (control-plane replicas: each one's, separated by commas)")
		fs.StringVar(&nopts.JoinToken, "join-token", os.Getenv("CHALK_JOIN_TOKEN"), "one-time join token from `chalkd control token` (default $CHALK_JOIN_TOKEN; needed at the first start only)")
		fs.StringVar(&nopts.Listen, "node-listen", daemon.DefaultNodeListen, "address of the node API (mTLS; only the control plane may call)")
		fs.StringVar(&nopts.Advertise, "advertise", "", "the node API as the control plane reaches it, https://host:port (default from --node-listen)")
		fs.StringVar(&nopts.Name, "name", "", "this node's name (default: the host name)")
	}
	fs.StringVar(&cfg.DataDir, "data-dir", "/var/lib/chalk", "state directory (store, registry, cache, keys)")
	fs.StringVar(&cfg.Database, "database", os.Getenv("CHALK_DATABASE"), "the store: a postgres://user@host/db URL (PostgreSQL; the password from $PGPASSWORD or ~/.pgpass keeps it out of ps), or the path of a SQLite file; default $CHALK_DATABASE, else DATA_DIR/chalk.db")
	fs.StringVar(&cfg.RunDir, "run-dir", "/run/chalk", "runtime directory (runc state, netns, API socket)")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:7447", "API TCP address (empty: unix socket only)")
	fs.StringVar(&cfg.Socket, "socket", "", "API unix socket (default RUN_DIR/chalkd.sock)")
	fs.StringVar(&cfg.RegistryAddr, "registry-addr", "127.0.0.1:7448", "embedded OCI registry address")
	fs.StringVar(&cfg.InitBinary, "init-binary", "", "static chalk-init (default: next to chalkd)")
	fs.StringVar(&cfg.ChalkBinary, "chalk-binary", "", "chalk CLI mounted into sandboxes (default: next to chalkd)")
	fs.StringVar(&cfg.Subnet, "subnet", "", "sandbox IPv4 subnet (default 10.213.0.0/16)")
	fs.StringVar(&cfg.Subnet6, "subnet6", "", "sandbox IPv6 subnet")
	fs.StringVar(&cfg.NetPrefix, "net-prefix", "", "host interface name prefix")
	fs.StringVar(&cfg.NetTable, "nft-table", "", "nftables table name")
	fs.StringVar(&cfg.CgroupParent, "cgroup-parent", "", "cgroup parent of sandboxes (default /chalk)")
	fs.StringVar(&cfg.ClientConfig, "client-config", "", "where to write the CLI config on first start (default ~/.config/chalk/config.json)")
	fs.IntVar(&cfg.DefaultQuota.MaxRunning, "org-max-sandboxes", 0, "default per-org quota: running sandboxes (0: no limit; the node admin sets others per org)")
	fs.Float64Var(&cfg.DefaultQuota.MaxVCPU, "org-max-vcpu", 0, "default per-org quota: total vCPU of running sandboxes (0: no limit)")
	fs.Int64Var(&cfg.DefaultQuota.MaxMemoryMB, "org-max-memory-mb", 0, "default per-org quota: total memory of running sandboxes in MiB (0: no limit)")
	fs.IntVar(&cfg.DefaultQuota.MaxCreatesPerMinute, "org-max-creates-per-minute", 0, "default per-org quota: sandbox creates per minute (0: no limit)")
	fs.Int64Var(&cfg.DefaultQuota.MaxUploadBytes, "org-max-upload-bytes", daemon.DefaultOrgMaxUploadBytes, "default per-org quota: bytes of uploaded content (UploadBlob) an org may have on the data dir, each distinct digest it uploaded until the upload GC removes it (-1: no limit)")
	fs.IntVar(&cfg.OrgMaxTunnels, "org-max-tunnels", daemon.DefaultOrgMaxTunnels, "the most tunnels an org may have (their subnets are shared by all orgs; -1: no limit)")
	fs.Int64Var(&cfg.CacheMaxBytes, "cache-max-bytes", 0, "node image cache size cap (default 20 GiB)")
	fs.StringVar(&cfg.DNSUpstream, "dns-upstream", "", "DNS server the sandboxes' DNS proxy forwards to (default: from /etc/resolv.conf)")
	fs.StringVar(&cfg.AWSRegion, "aws-region", "", "AWS region (AWS_REGION, AWS_DEFAULT_REGION) of sandboxes created with an AWS role and no region of their own (default us-east-1)")
	fs.StringVar(&cfg.QueryURL, "query-url", "", "the organisation's Chalk query server as sandboxes reach it; `chalk query` inside sandboxes uses it with the sandbox's identity")
	fs.StringVar(&cfg.TunnelSubnets, "tunnel-subnets", "", "IPv4 network carved into one /24 per WireGuard tunnel (default "+daemon.DefaultTunnelSubnets+")")
	fs.StringVar(&cfg.TunnelEndpoint, "tunnel-endpoint", "", "this node's address as external WireGuard peers (and, on a fleet node, the other nodes) reach it (default: its address toward the outside; on a fleet node the host of --advertise)")
	fs.StringVar(&cfg.Ingress.Listen, "ingress-listen", daemon.DefaultIngressListen, "address of the ingress listener serving exposed sandbox ports (\"off\": none)")
	fs.StringVar(&cfg.Ingress.Domain, "ingress-domain", "", "route <port>-<sandbox>.DOMAIN to exposed ports (wildcard DNS to the ingress listener); without it URLs use /s/<sandbox>/<port>/")
	fs.StringVar(&cfg.Ingress.URL, "ingress-url", "", "the ingress listener's base URL as clients reach it (default from --ingress-domain or --ingress-listen)")
	fs.StringVar(&cfg.Ingress.TLSCert, "ingress-tls-cert", "", "PEM certificate (chain) of the ingress listener: serve HTTPS and HTTP/2")
	fs.StringVar(&cfg.Ingress.TLSKey, "ingress-tls-key", "", "PEM private key of --ingress-tls-cert")
	fs.IntVar(&cfg.Ingress.Limits.MaxPerRoute, "ingress-max-per-route", 256, "requests and WebSockets in flight per exposed port; more are answered 503")
	fs.IntVar(&cfg.Ingress.Limits.MaxConnsPerClient, "ingress-max-conns-per-client", 64, "open ingress connections per client address; more are closed at accept")
	fs.BoolVar(&cfg.Ingress.SelfSigned, "ingress-tls-self-signed", false, "serve the ingress over HTTPS with a self-signed certificate made at first start (DATA_DIR/ingress-tls/)")
	fs.StringVar(&cfg.SeccompLoader, "seccomp-loader", "init", "who loads a runc sandbox's seccomp filter: init (compiled once by chalkd, loaded by chalk-init before anything else; chalkd refuses a sandbox whose init is not filtered) or runc (runc compiles the profile with libseccomp on every start)")
	fs.StringVar(&cfg.Runtime, "runtime", "runc", "OCI runtime of sandboxes: runc, or runsc (gVisor: a user-space kernel between sandboxes and the host; implies --userns=false)")
	fs.DurationVar(&cfg.MCPAuditRetention, "mcp-audit-retention", daemon.DefaultMCPAuditRetention, "how long MCP gateway audit records are kept")
	fs.DurationVar(&cfg.AuditRetention, "audit-retention", daemon.DefaultAuditRetention, "how long the orgs' audit trail records are kept (pruned at start and hourly; with replicas by the leader); 0: kept for ever")
	fs.StringVar(&cfg.RuntimeBinary, "runtime-binary", "", "path of the runtime binary (default: --runtime's name from PATH)")
	if mode == "control" {
		fs.IntVar(&cfg.Prestart, "prestart", 0, "pre-started sandboxes of the base image (busybox) every node keeps, set when it joins (0: none set; each node pre-starts its recently used images by its own --prestart)")
		fs.IntVar(&cfg.PrestartSlots, "prestart-slots", daemon.DefaultPrestartSlots, "unused by the control plane (which runs no sandboxes): each node's own --prestart-slots counts")
	} else {
		fs.IntVar(&cfg.Prestart, "prestart", daemon.DefaultPrestart, "sandboxes kept pre-started for each of the 4 most recently used images, so a create is a claim instead of a runc start (0: off; `chalk compute image warm --sandboxes N` sets an image's count)")
		fs.IntVar(&cfg.PrestartSlots, "prestart-slots", daemon.DefaultPrestartSlots, "network slots reserved for pre-started sandboxes and the sandboxes they become (-1: no pre-starting at all)")
	}
	fs.Int64Var(&cfg.Limits.DefaultMemoryMB, "default-memory-mb", api.DefaultMemoryMB, "memory limit (MiB) of sandboxes whose request gives none; a sandbox's disk (a tmpfs) counts toward its memory limit, so its disk quota is at most this")
	fs.Int64Var(&cfg.Limits.BuildMemoryMB, "build-memory-mb", daemon.DefaultBuildMemoryMB, "memory limit (MiB) of image build RUN steps, their disk included")
	fs.Int64Var(&cfg.Limits.LogMaxBytes, "log-max-bytes", daemon.DefaultLogMaxBytes, "cap of a sandbox's console log: past it the log is rotated to LOG.1 (the last two parts are kept)")
	fs.DurationVar(&cfg.UploadGCGrace, "upload-gc-grace", daemon.DefaultUploadGCGrace, "uploaded content (copy and mount sources, build contexts, a node's copies of mounts) that no live sandbox binds and no build or create holds is removed this long after its last use (upload, or a client told it is there); 0: never removed")
	fs.DurationVar(&cfg.Limits.LogRetention, "log-retention", daemon.DefaultLogRetention, "how long console logs of ended sandboxes are kept")
	fs.DurationVar(&cfg.Limits.KeepStopped, "keep-stopped", api.DefaultKeepStopped, "how long a stopped sandbox's writable layer is kept so it can still be snapshotted (negative: not kept)")
	fs.Int64Var(&cfg.Limits.KeepStoppedMB, "keep-stopped-mb", api.DefaultKeepStoppedMB, "MiB of stopped sandboxes' kept writable layers per org (host memory); a layer that does not fit is not kept")
	f.userns = fs.Bool("userns", true, "give each sandbox a user namespace (its root is an unprivileged host uid range of its own); false: sandbox root is host root, confined by capabilities and seccomp only")
	fs.Func("uid-base", "first host uid of the sandboxes' user namespace ranges (default 1048576; 65536 ids per sandbox)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("uid-base %q: %w", v, err)
		}
		cfg.UIDBase = uint32(n)
		return nil
	})
	fs.IntVar(&cfg.NetnsPool, "netns-pool", sandboxnet.DefaultNetnsPool, "sandbox networks (network and user namespace, veth pair) kept made ahead, so a create does not make its own (-1: none)")
	fs.IntVar(&cfg.NetnsPoolMax, "netns-pool-max", sandboxnet.DefaultNetnsPoolMax, "how far the spare network pool grows after bursts: each create that finds no spare adds one, a minute without creates shrinks it back to --netns-pool (-1: no growth)")
	fs.StringVar(&cfg.IssuerURL, "issuer", "", "workload identity issuer URL (https in production; default http://LISTEN)")
	fs.StringVar(&cfg.IdentityAlg, "identity-alg", "", "signing algorithm of new workload identity keys, ES256 or RS256 (default: ES256 for new keys, keeping existing RS256 keys until they rotate out; a value given here also replaces a published next key of the other algorithm at start)")
	fs.Func("build-env", "NAME=VALUE added to image build RUN steps, e.g. PIP_INDEX_URL=... (repeatable)", func(v string) error {
		if !strings.Contains(v, "=") {
			return fmt.Errorf("want NAME=VALUE")
		}
		cfg.BuildEnv = append(cfg.BuildEnv, v)
		return nil
	})
	fs.StringVar(&f.upstreams, "registry-upstreams", "", "pull-through mirrors, e.g. docker.io=https://registry-1.docker.io,nvcr.io=https://nvcr.io")
	fs.StringVar(&f.level, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.pprofSocket, "pprof-socket", "", "serve Go's profiler (net/http/pprof, /debug/pprof/) on this unix socket (0600, root only), for profiling chalkd; empty: off")
	f.fs = fs
	return f
}
