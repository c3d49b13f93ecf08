package noderpc

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/errdefs/errconnect"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/registry"
	"github.com/chalkcompute/chalkcompute/store"
)

// Join tokens: "chalkjoin1.<secret>.<CA fingerprint>". The secret (32 random
// bytes, base64url) authenticates the node once; the store keeps only its
// SHA-256, with an expiry, and marks it used at the first join. The CA
// fingerprint lets the joining node check the control plane before it
// sends the secret.
const tokenPrefix = "chalkjoin1"

// DefaultTokenTTL is how long a join token is valid.
const DefaultTokenTTL = time.Hour

// NewJoinToken makes a join token for the fleet of ca, valid for ttl, and
// records its hash in st. The token is returned to be shown once; it is
// never stored or logged.
func NewJoinToken(ctx context.Context, st *store.Store, ca *CA, ttl time.Duration) (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	secret := base64.RawURLEncoding.EncodeToString(b[:])
	if err := st.AddJoinToken(ctx, hashSecret(secret), time.Now().Add(ttl)); err != nil {
		return "", err
	}
	return tokenPrefix + "." + secret + "." + ca.Fingerprint(), nil
}

func hashSecret(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// parseToken splits a join token (errors never quote it).
func parseToken(tok string) (secret, caFingerprint string, err error) {
	parts := strings.Split(strings.TrimSpace(tok), ".")
	if len(parts) != 3 || parts[0] != tokenPrefix || len(parts[1]) != 43 || len(parts[2]) != 64 {
		return "", "", fmt.Errorf("join token: malformed (want %s.<secret>.<CA sha256>): %w", tokenPrefix, errdefs.ErrInvalidArgument)
	}
	if _, err := hex.DecodeString(parts[2]); err != nil {
		return "", "", fmt.Errorf("join token: malformed CA fingerprint: %w", errdefs.ErrInvalidArgument)
	}
	return parts[1], parts[2], nil
}

// peerNode is the context key of the verified node a fleet call comes from.
type peerNode struct{}

// NodeFromContext is the id of the node whose certificate the current
// fleet call presented ("" if none).
func NodeFromContext(ctx context.Context) string {
	id, _ := ctx.Value(peerNode{}).(string)
	return id
}

// Fleet is the control plane's side of joining and heartbeats.
type Fleet struct {
	Store *store.Store
	CA    *CA
	Log   *slog.Logger
	// Registry is what RegistryAccess hands nodes: the control plane's
	// registry on its TLS listener and the read-only pull credential (never
	// the push credential). nil: nodes get nothing (failed_precondition).
	Registry *RegistryAccess
	// FirstHeartbeat, if set, runs (in its own goroutine) at the first
	// heartbeat of each node in this process: a node that joined, or one
	// seen again after the control plane started (its API serves by then).
	FirstHeartbeat func(nodeID string)
	// Workloads, if set, answers nodes' Workload calls (workload identity
	// of node sandboxes); nil: refused.
	Workloads Workloads

	// CertGrace is how long a certificate a renewal superseded is still
	// accepted (default DefaultCertGrace; certcheck.go).
	CertGrace time.Duration

	seen     sync.Map // node id → struct{}: FirstHeartbeat ran
	inflight certInflight
	clock    clock // SetClock
}

// RegistryAccess is how nodes pull from the control plane's registry.
type RegistryAccess struct {
	// Addr is host:port of the registry's TLS listener; an empty host is
	// the host the node reaches the fleet listener at.
	Addr string
	// Pull is the registry's read-only pull credential.
	Pull registry.Credential
}

var _ nodev1connect.FleetServiceHandler = (*Fleet)(nil)

// Handler is the fleet service; serve it behind ControlServerTLS.
func (f *Fleet) Handler() (string, http.Handler) {
	path, h := nodev1connect.NewFleetServiceHandler(f, connect.WithInterceptors(errInterceptor{}), connect.WithReadMaxBytes(MaxFleetMessage))
	return path, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, MaxFleetMessage+4096)
		ctx := r.Context()
		if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
			if leaf := r.TLS.VerifiedChains[0][0]; NodeIDOf(leaf) != "" {
				actx, cancel, err := f.AdmitCert(ctx, leaf)
				if err != nil {
					cerr := errconnect.ToConnect(err)
					var ce *connect.Error
					if errors.Is(err, ErrNodeRemoved) && errors.As(cerr, &ce) {
						// Only the holder of this node's key reads it: the
						// node destroys its sandboxes and stops (daemon's
						// heartbeat loop).
						ce.Meta().Set(RemovedHeader, NodeIDOf(leaf))
					}
					_ = connect.NewErrorWriter().Write(w, r, cerr)
					return
				}
				defer cancel()
				ctx = actx
			}
		}
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// SetClock makes now the fleet's clock (nil: time.Now), also while its
// goroutines read it (tests move it).
func (f *Fleet) SetClock(now func() time.Time) { f.clock.set(now) }

func (f *Fleet) now() time.Time { return f.clock.Now() }

func (f *Fleet) log() *slog.Logger {
	if f.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return f.Log
}

func checkNodeURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.Path != "" && u.Path != "/" || u.User != nil {
		return fmt.Errorf("node_url %q: want https://host:port: %w", s, errdefs.ErrInvalidArgument)
	}
	return nil
}

func checkCapacity(c *nodev1.Capacity) error {
	if c == nil || c.Cpu <= 0 || c.MemoryMb <= 0 || c.Slots <= 0 || c.Cpu > 1<<16 || c.MemoryMb > 1<<40 || c.Slots > 1<<20 {
		return fmt.Errorf("capacity %v: cpu, memory_mb and slots must be positive and plausible: %w", c, errdefs.ErrInvalidArgument)
	}
	return nil
}

func (f *Fleet) Join(ctx context.Context, req *connect.Request[nodev1.JoinRequest]) (*connect.Response[nodev1.JoinResponse], error) {
	secret, fp, err := parseToken(req.Msg.Token)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare([]byte(fp), []byte(f.CA.Fingerprint())) != 1 {
		return nil, fmt.Errorf("join token: for another fleet: %w", errdefs.ErrPermissionDenied)
	}
	if err := checkNodeURL(req.Msg.NodeUrl); err != nil {
		return nil, err
	}
	if err := checkCapacity(req.Msg.Capacity); err != nil {
		return nil, err
	}
	name := req.Msg.Name
	if len(name) > 64 || strings.ContainsFunc(name, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		return nil, fmt.Errorf("name %q: up to 64 printable characters: %w", name, errdefs.ErrInvalidArgument)
	}
	// The request is checked before the token is spent.
	if _, err := x509.ParseCertificateRequest(req.Msg.CsrDer); err != nil {
		return nil, fmt.Errorf("certificate request: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := f.Store.UseJoinToken(ctx, hashSecret(secret), f.now()); err != nil {
		f.log().Warn("fleet: join refused", "name", name, "reason", "token unknown, expired or used")
		return nil, err
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	id := "nd-" + hex.EncodeToString(b[:])
	certPEM, serial, err := f.CA.IssueNode(req.Msg.CsrDer, id)
	if err != nil {
		return nil, err
	}
	if name == "" {
		name = id
	}
	now := f.now().UTC()
	n := &store.Node{ID: id, Name: name, URL: req.Msg.NodeUrl, State: store.NodeReady, CPU: req.Msg.Capacity.Cpu,
		MemoryMB: req.Msg.Capacity.MemoryMb, Slots: int(req.Msg.Capacity.Slots), CertSerial: serial, JoinedAt: now, LastHeartbeat: now}
	if err := f.Store.PutNode(ctx, n); err != nil {
		return nil, err
	}
	f.log().Info("fleet: node joined", "node", id, "name", name, "url", n.URL)
	return connect.NewResponse(&nodev1.JoinResponse{NodeId: id, CertPem: certPEM, CaPem: f.CA.PEM}), nil
}

func (f *Fleet) Heartbeat(ctx context.Context, req *connect.Request[nodev1.HeartbeatRequest]) (*connect.Response[nodev1.HeartbeatResponse], error) {
	peer := NodeFromContext(ctx)
	if peer == "" {
		return nil, fmt.Errorf("heartbeat: a node certificate is required: %w", errdefs.ErrUnauthenticated)
	}
	if req.Msg.NodeId != peer {
		f.log().Warn("fleet: node acting for another refused", "node", peer, "for", req.Msg.NodeId)
		return nil, fmt.Errorf("heartbeat for node %q from node %q: %w", req.Msg.NodeId, peer, errdefs.ErrPermissionDenied)
	}
	if req.Msg.Capacity != nil {
		if err := checkCapacity(req.Msg.Capacity); err != nil {
			return nil, err
		}
	}
	if req.Msg.NodeUrl != "" {
		if err := checkNodeURL(req.Msg.NodeUrl); err != nil {
			return nil, err
		}
	}
	if err := checkBootID(req.Msg.BootId); err != nil {
		return nil, err
	}
	n, err := f.Store.UpdateNode(ctx, peer, func(n *store.Node) error {
		if c := req.Msg.Capacity; c != nil {
			n.CPU, n.MemoryMB, n.Slots = c.Cpu, c.MemoryMb, int(c.Slots)
		}
		if req.Msg.NodeUrl != "" {
			n.URL = req.Msg.NodeUrl
		}
		if req.Msg.BootId != "" {
			n.BootID = req.Msg.BootId
		}
		n.LastHeartbeat = f.now().UTC()
		return nil
	})
	if err != nil {
		return nil, err
	}
	if f.FirstHeartbeat != nil {
		if _, again := f.seen.LoadOrStore(peer, struct{}{}); !again {
			go f.FirstHeartbeat(peer)
		}
	}
	return connect.NewResponse(&nodev1.HeartbeatResponse{State: n.State}), nil
}

// RegistryAccess hands the calling node (by its certificate; it must be a
// member of the fleet) the registry address and the read-only pull
// credential. Over the mTLS fleet channel only: Join's TLS and any caller
// without a node certificate get nothing.
func (f *Fleet) RegistryAccess(ctx context.Context, req *connect.Request[nodev1.RegistryAccessRequest]) (*connect.Response[nodev1.RegistryAccessResponse], error) {
	peer := NodeFromContext(ctx)
	if peer == "" {
		return nil, fmt.Errorf("registry access: a node certificate is required: %w", errdefs.ErrUnauthenticated)
	}
	if req.Msg.NodeId != peer {
		f.log().Warn("fleet: node acting for another refused", "node", peer, "for", req.Msg.NodeId)
		return nil, fmt.Errorf("registry access for node %q from node %q: %w", req.Msg.NodeId, peer, errdefs.ErrPermissionDenied)
	}
	if _, err := f.Store.GetNode(ctx, peer); err != nil {
		if errdefs.Is(err, errdefs.ErrNotFound) {
			return nil, fmt.Errorf("registry access: node %s is not a member of this fleet: %w", peer, errdefs.ErrPermissionDenied)
		}
		return nil, err
	}
	if f.Registry == nil || f.Registry.Pull.Username == "" {
		return nil, fmt.Errorf("registry access: this control plane serves no registry to nodes: %w", errdefs.ErrFailedPrecondition)
	}
	return connect.NewResponse(&nodev1.RegistryAccessResponse{Addr: f.Registry.Addr,
		Username: f.Registry.Pull.Username, Password: f.Registry.Pull.Password}), nil
}

// RemoteRegistry asks the control plane at controlURL (the fleet listener)
// for registry access and returns the client-mode registry the node
// resolves and pulls images through: HTTPS only, the control plane's
// certificate checked against the fleet CA, the pull credential.
func RemoteRegistry(ctx context.Context, fc nodev1connect.FleetServiceClient, id *NodeIdentity, controlURL string, log *slog.Logger) (*registry.Registry, error) {
	res, err := fc.RegistryAccess(ctx, connect.NewRequest(&nodev1.RegistryAccessRequest{NodeId: id.ID}))
	if err != nil {
		return nil, fmt.Errorf("registry access from %s: %w", controlURL, wire(err))
	}
	host, port, err := net.SplitHostPort(res.Msg.Addr)
	if err != nil || port == "" {
		return nil, fmt.Errorf("registry access: the control plane sent address %q: want host:port: %w", res.Msg.Addr, errdefs.ErrInvalidArgument)
	}
	if host == "" {
		u, err := url.Parse(controlURL)
		if err != nil || u.Hostname() == "" {
			return nil, fmt.Errorf("registry access: control URL %q: %w", controlURL, errdefs.ErrInvalidArgument)
		}
		host = u.Hostname()
	}
	return registry.NewRemote(registry.RemoteConfig{Addr: net.JoinHostPort(host, port),
		Pull: registry.Credential{Username: res.Msg.Username, Password: res.Msg.Password},
		TLS:  RegistryClientTLS(id), Logger: log, Generation: id.Renewals})
}

// JoinRequest is what a node sends to join (Join).
type JoinRequest struct {
	ControlURL string // https://control:port of the fleet listener
	Token      string
	Name       string
	NodeURL    string // where this node serves NodeService
	CPU        float64
	MemoryMB   int64
	Slots      int
}

// Join joins the fleet: it makes this node's key, sends a certificate
// request with the token to the control plane (checked against the CA the
// token names), and saves the identity it gets in dir.
func Join(ctx context.Context, dir string, req JoinRequest) (*NodeIdentity, error) {
	_, fp, err := parseToken(req.Token)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: req.Name}}, key)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: joinTLS(fp), ForceAttemptHTTP2: true}, Timeout: 30 * time.Second}
	defer hc.CloseIdleConnections()
	res, err := nodev1connect.NewFleetServiceClient(hc, req.ControlURL).Join(ctx, connect.NewRequest(&nodev1.JoinRequest{
		Token: req.Token, CsrDer: csr, Name: req.Name, NodeUrl: req.NodeURL,
		Capacity: &nodev1.Capacity{Cpu: req.CPU, MemoryMb: req.MemoryMB, Slots: int32(req.Slots)},
	}))
	if err != nil {
		return nil, fmt.Errorf("join %s: %w", req.ControlURL, wire(err))
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	if err := SaveNodeIdentity(dir, res.Msg.NodeId, keyPEM, res.Msg.CertPem, res.Msg.CaPem); err != nil {
		return nil, err
	}
	return LoadNodeIdentity(dir)
}

// HTTPClient is an HTTP/2 client with cfg (mTLS both ways). A connection
// silent for 5 s is pinged and dropped if the ping goes unanswered for 5 s:
// the streams on it (a Wait, a log follow) then fail instead of hanging on
// a peer that died without closing.
func HTTPClient(cfg *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true,
		IdleConnTimeout: 90 * time.Second, TLSHandshakeTimeout: 10 * time.Second,
		HTTP2: &http.HTTP2Config{SendPingTimeout: 5 * time.Second, PingTimeout: 5 * time.Second}}}
}

// FleetClient is a node's client of the control plane's fleet service.
// After a renewal its calls go over new connections (nodeTransport).
func FleetClient(id *NodeIdentity, controlURL string) nodev1connect.FleetServiceClient {
	return nodev1connect.NewFleetServiceClient(&http.Client{Transport: nodeTransport(id, NodeClientTLS(id))}, controlURL)
}
