package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/ingress"
	"github.com/chalkcompute/chalkcompute/internal/periodic"
	"github.com/chalkcompute/chalkcompute/store"
)

// IngressConfig configures the ingress listener (ingress/).
type IngressConfig struct {
	// Listen is its address (default DefaultIngressListen; "off" disables it).
	Listen string
	// Domain enables host routing, <port>-<sandbox>.<Domain> (wildcard DNS
	// to the listener); without it URLs use the path form /s/<sandbox>/<port>/.
	Domain string
	// URL is the listener's base URL as clients reach it (default from
	// Listen, or Domain with Listen's port).
	URL string
	// TLSCert and TLSKey serve HTTPS (and HTTP/2). SelfSigned serves HTTPS
	// with a certificate made at first start (DataDir/ingress-tls/).
	TLSCert, TLSKey string
	SelfSigned      bool
	Limits          ingress.Limits
}

// DefaultIngressListen is the ingress listener's default address.
const DefaultIngressListen = "127.0.0.1:7449"

// ingressNode joins the ingress server to the API (api.IngressBackend) and
// the store.
type ingressNode struct {
	srv   *ingress.Server
	store *store.Store
	tls   *tls.Config
	ln    net.Listener
	log   *slog.Logger
	// lostGrace (fleet): the exposures of a sandbox reported lost are kept
	// this long, for its re-adoption (0: deleted at its end, as any).
	lostGrace time.Duration
}

var _ api.IngressBackend = (*ingressNode)(nil)

func (n *ingressNode) Route(e *store.Exposure, addr netip.Addr) {
	n.srv.Add(ingress.Route{SandboxID: e.SandboxID, Port: e.Port, OrgID: e.OrgID, Public: e.Public, Addr: addr})
}
func (n *ingressNode) Unroute(id string, port uint16)               { n.srv.Remove(id, port) }
func (n *ingressNode) URLs(id string, port uint16) (string, string) { return n.srv.URLs(id, port) }
func (n *ingressNode) Sign(id string, port uint16, exp time.Time) string {
	return n.srv.Sign(id, port, exp)
}

// ended forgets a sandbox's exposures: its routes are cut at once. Those
// of a sandbox reported lost (its node stopped answering) stay recorded:
// it may be re-adopted (resumed routes them again), and they go when its
// loss is final (lostFinal, or prune once the grace has passed).
func (n *ingressNode) ended(ctx context.Context, sb *store.Sandbox) {
	if n == nil {
		return
	}
	n.srv.Remove(sb.ID, 0)
	if sb.EndReason == "lost" && n.lostGrace > 0 {
		return
	}
	if err := n.store.DeleteExposures(ctx, sb.ID); err != nil {
		n.log.Warn("delete exposures", "sandbox", sb.ID, "err", err)
	}
}

// resumed routes the recorded exposures of a sandbox running again
// (re-adopted after its loss, or found running at a start), at the
// sandbox's address.
func (n *ingressNode) resumed(ctx context.Context, sb *store.Sandbox) {
	if n == nil {
		return
	}
	addr, err := netip.ParseAddr(sb.IP)
	if err != nil {
		return
	}
	es, err := n.store.ListExposures(ctx, sb.ID)
	if err != nil {
		n.log.Warn("exposures of a resumed sandbox", "sandbox", sb.ID, "err", err)
		return
	}
	for _, e := range es {
		n.Route(e, addr)
	}
}

// lostFinal deletes the exposures of sandbox id, lost and not re-adopted
// (its node answered again without it).
func (n *ingressNode) lostFinal(ctx context.Context, id string) {
	if n == nil {
		return
	}
	n.srv.Remove(id, 0)
	if err := n.store.DeleteExposures(ctx, id); err != nil {
		n.log.Warn("delete exposures of a lost sandbox", "sandbox", id, "err", err)
	}
}

// keep reports whether the exposures of sb, which does not run here, are
// kept: it was reported lost less than the grace ago and may be
// re-adopted.
func (n *ingressNode) keep(sb *store.Sandbox, now time.Time) bool {
	return n.lostGrace > 0 && sb.State == store.StateStopped && sb.EndReason == "lost" && sb.Node != "" &&
		now.Sub(sb.EndedAt) < n.lostGrace
}

// prune deletes the exposures of sandboxes that do not run (running
// reports which do), except those kept for a re-adoption (keep); it
// returns those of running sandboxes, with their addresses. A sandbox
// whose record cannot be read (not: does not exist) keeps its exposures
// unrouted, and the error is returned with the routes: a store that
// fails for a moment deletes nothing.
func (n *ingressNode) prune(ctx context.Context, running func(id string) bool) (map[*store.Exposure]netip.Addr, error) {
	es, err := n.store.ListExposures(ctx, "")
	if err != nil {
		return nil, err
	}
	out := map[*store.Exposure]netip.Addr{}
	now := time.Now()
	sbs := map[string]*store.Sandbox{}
	failed := map[string]error{}
	for _, e := range es {
		sb, ok := sbs[e.SandboxID]
		if !ok && failed[e.SandboxID] == nil {
			var err error
			if sb, err = n.store.GetSandbox(ctx, e.SandboxID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				failed[e.SandboxID] = err
			}
			sbs[e.SandboxID] = sb
		}
		if failed[e.SandboxID] != nil {
			continue
		}
		var addr netip.Addr
		if sb != nil {
			addr, _ = netip.ParseAddr(sb.IP)
		}
		switch {
		case sb != nil && addr.IsValid() && running(e.SandboxID):
			out[e] = addr
		case sb != nil && (n.keep(sb, now) || n.lostGrace > 0 && sb.Live()):
			// Kept for a re-adoption, or being re-adopted now (its
			// record revived, its watch not started yet).
		default:
			_ = n.store.DeleteExposures(ctx, e.SandboxID)
		}
	}
	var errs []error
	for id, err := range failed {
		errs = append(errs, fmt.Errorf("exposures of sandbox %s kept: %w", id, err))
	}
	return out, errors.Join(errs...)
}

// pruneLoop deletes, every interval while this control plane leads, the
// exposures of lost sandboxes whose grace has passed (their node did not
// return in time).
func (n *ingressNode) pruneLoop(ctx context.Context, interval time.Duration, leading func() bool, running func(id string) bool) {
	periodic.WhileLeading(ctx, interval, leading, func() {
		if _, err := n.prune(ctx, running); err != nil && ctx.Err() == nil {
			n.log.Warn("prune exposures of lost sandboxes", "err", err)
		}
	})
}

// newIngress makes the ingress server (nil when off): its signing key
// (DataDir/ingress.key, made at first start), listener and TLS settings.
// Keys are checked by auth (one of the sandbox's org; workload tokens
// never open a route) and routes lead only to sandboxes live runs.
func newIngress(cfg *Config, st *store.Store, auth *api.Authenticator, live *api.Live) (*ingressNode, error) {
	ic := cfg.Ingress
	if ic.Listen == "off" {
		return nil, nil
	}
	if ic.Listen == "" {
		ic.Listen = DefaultIngressListen
	}
	key, err := loadOrMakeKey(filepath.Join(cfg.sharedDir(), "ingress.key"))
	if err != nil {
		return nil, fmt.Errorf("ingress signing key: %w", err)
	}
	n := &ingressNode{store: st, log: cfg.Logger}
	switch {
	case ic.TLSCert != "" || ic.TLSKey != "":
		c, err := tls.LoadX509KeyPair(ic.TLSCert, ic.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("--ingress-tls-cert/--ingress-tls-key: %w", err)
		}
		n.tls = &tls.Config{Certificates: []tls.Certificate{c}}
	case ic.SelfSigned:
		c, err := selfSigned(filepath.Join(cfg.DataDir, "ingress-tls"), ic.Domain)
		if err != nil {
			return nil, fmt.Errorf("ingress self-signed certificate: %w", err)
		}
		n.tls = &tls.Config{Certificates: []tls.Certificate{c}}
	}
	if n.ln, err = net.Listen("tcp", ic.Listen); err != nil {
		return nil, fmt.Errorf("--ingress-listen %s: %w", ic.Listen, err)
	}
	base := ic.URL
	if base == "" {
		scheme := "http"
		if n.tls != nil {
			scheme = "https"
		}
		host := n.ln.Addr().String()
		if ic.Domain != "" {
			_, port, _ := net.SplitHostPort(host)
			host = net.JoinHostPort(ic.Domain, port)
		}
		base = scheme + "://" + host
	}
	n.srv, err = ingress.New(ingress.Config{
		BaseURL: base, Domain: ic.Domain, Key: key, Limits: ic.Limits, Logger: cfg.Logger,
		Live:         func(id string) bool { return live.IsRunning(context.Background(), id) },
		Authenticate: ingressAuth(auth),
	})
	if err != nil {
		n.ln.Close()
		return nil, err
	}
	return n, nil
}

// ingressAuth is the ingress's check of an Authorization header: an API
// key (as every API call checks it) gives its org; workload tokens never
// open a route.
func ingressAuth(auth *api.Authenticator) func(ctx context.Context, h string) (string, error) {
	return func(ctx context.Context, h string) (string, error) {
		p, err := auth.Authenticate(ctx, h)
		if err != nil {
			return "", err
		}
		if p.IsWorkload() {
			return "", fmt.Errorf("workload tokens do not open ingress routes: %w", errdefs.ErrPermissionDenied)
		}
		return p.OrgID, nil
	}
}

// exposurePrune is how often the leader deletes the exposures of lost
// sandboxes whose grace has passed.
const exposurePrune = 30 * time.Second

// startIngress restores the routes of running sandboxes (exposures of
// ended ones are deleted, but for lost ones that may be re-adopted) and
// serves the ingress listener.
func startIngress(ctx context.Context, d *Daemon) error {
	n := d.ingress
	if n == nil {
		return nil
	}
	running := func(id string) bool { return d.API.IsRunning(ctx, id) }
	routes, err := n.prune(ctx, running)
	if routes == nil {
		return err
	}
	if err != nil {
		n.log.Warn("ingress: exposures not restored", "err", err)
	}
	for e, addr := range routes {
		n.Route(e, addr)
	}
	if n.lostGrace > 0 {
		go n.pruneLoop(ctx, exposurePrune, d.leaderFunc(), running)
	}
	srv := n.srv.HTTPServer()
	d.servers = append(d.servers, srv)
	ln := n.srv.Listener(n.ln)
	if n.tls != nil {
		srv.TLSConfig = n.tls.Clone()
		srv.TLSConfig.NextProtos = []string{"h2", "http/1.1"}
		ln = tls.NewListener(ln, srv.TLSConfig)
	}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("ingress server", "err", err)
		}
	}()
	d.log.Info("ingress serving", "addr", n.ln.Addr().String())
	return nil
}

// loadOrMakeKey reads a 32-byte key from path, making it (0600) if missing.
func loadOrMakeKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil && len(b) == 32 {
		return b, nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	b = make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return b, writeFile0600(path, b)
}

// selfSigned loads or makes (in dir, key 0600) a self-signed certificate
// for localhost, 127.0.0.1, ::1, domain and *.domain.
func selfSigned(dir, domain string) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if c, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil {
		return c, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return tls.Certificate{}, err
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "chalkd ingress"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(5, 0, 0),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	if domain != "" {
		tmpl.DNSNames = append(tmpl.DNSNames, domain, "*."+domain)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return tls.Certificate{}, err
	}
	kb, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := writeFile0600(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})); err != nil {
		return tls.Certificate{}, err
	}
	if err := writeFile0600(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})); err != nil {
		return tls.Certificate{}, err
	}
	return tls.LoadX509KeyPair(certPath, keyPath)
}

// backend is n as the API's backend (a nil interface when off).
func (n *ingressNode) backend() api.IngressBackend {
	if n == nil {
		return nil
	}
	return n
}

// close cuts the routes' requests and closes the listener.
func (n *ingressNode) close() {
	if n == nil {
		return
	}
	n.srv.Close()
	n.ln.Close()
}
