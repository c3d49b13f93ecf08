package noderpc

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/internal/fresh"
)

// Node certificate rotation. A node's certificate lasts certTTL; once less
// than a third of it is left, the node makes a new key and asks the control
// plane over the mTLS fleet channel (Renew, with its current certificate,
// which must not be revoked) for a certificate for it; the control plane
// issues one naming the same node id and records its serial. The node keeps
// the new pair (node.key.new and node.crt.new, then renamed over the old:
// a crash at any point leaves a pair that loads, finishRenewal) and
// presents it on every new connection (NodeIdentity.current). The old one
// is accepted only for the control plane's grace after that
// (DefaultCertGrace, certcheck.go), so at a renewal the node moves every
// client of the control plane to new connections (Renewals: the fleet
// client, the relay, the registry's pulls go over fresh transports at
// their next request), and a request that runs on an old connection past
// the grace is ended by the control plane.

// current is the certificate the node presents.
func (id *NodeIdentity) current() *tls.Certificate {
	if c := id.rotated.Load(); c != nil {
		return c
	}
	return &id.Cert
}

// NotAfter is when the certificate in use expires.
func (id *NodeIdentity) NotAfter() time.Time {
	c := id.current()
	if c.Leaf != nil {
		return c.Leaf.NotAfter
	}
	if leaf, err := x509.ParseCertificate(c.Certificate[0]); err == nil {
		return leaf.NotAfter
	}
	return time.Time{}
}

// RenewDue says whether the certificate in use has less than a third of
// its lifetime left at now.
func (id *NodeIdentity) RenewDue(now time.Time) bool {
	return id.NotAfter().Sub(now) < certTTL/3
}

// Renew gets a certificate for a new key from the control plane (fc: its
// fleet listener, called with the current certificate), saves the pair
// where the identity is kept, and uses it from then on.
func (id *NodeIdentity) Renew(ctx context.Context, fc nodev1connect.FleetServiceClient) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	res, err := fc.Renew(ctx, connect.NewRequest(&nodev1.RenewRequest{CsrDer: csr}))
	if err != nil {
		return fmt.Errorf("renew the node certificate: %w", wire(err))
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	pair, err := tls.X509KeyPair(res.Msg.CertPem, keyPEM)
	if err != nil {
		return fmt.Errorf("renewed certificate: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return err
	}
	if NodeIDOf(leaf) != id.ID {
		return fmt.Errorf("renewed certificate names %q, not this node (%s): %w", NodeIDOf(leaf), id.ID, errdefs.ErrInvalidArgument)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: id.CA, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("renewed certificate: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	pair.Leaf = leaf
	if id.dir != "" {
		if err := saveRenewal(id.dir, keyPEM, res.Msg.CertPem); err != nil {
			return err
		}
	}
	id.rotated.Store(&pair)
	id.renewals.Add(1)
	return nil
}

// Renewals counts this process's renewals: a client of the control plane
// over internal/fresh moves to new connections when it changes.
func (id *NodeIdentity) Renewals() uint64 { return id.renewals.Load() }

// nodeTransport is a node's transport to the control plane over cfg: new
// connections after each renewal (Renewals).
func nodeTransport(id *NodeIdentity, cfg *tls.Config) *fresh.Transport {
	return fresh.New(HTTPClient(cfg).Transport.(*http.Transport), id.Renewals)
}

// saveRenewal replaces the kept pair: both new files first, then renamed
// over the old ones, key first (finishRenewal completes an interrupted one).
func saveRenewal(dir string, keyPEM, certPEM []byte) error {
	if err := atomicfile.WriteFile(filepath.Join(dir, "node.key.new"), keyPEM, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, "node.crt.new"), certPEM, 0o644); err != nil {
		return err
	}
	return finishRenewal(dir)
}

// finishRenewal completes (or drops) a renewal a crash interrupted, so
// node.key and node.crt are a pair: both new files written → both
// renamed; only the new key → dropped (its certificate never arrived);
// only the new certificate → the key was renamed already, so it is too.
func finishRenewal(dir string) error {
	key, crt := filepath.Join(dir, "node.key.new"), filepath.Join(dir, "node.crt.new")
	_, kerr := os.Stat(key)
	_, cerr := os.Stat(crt)
	hasKey, hasCrt := kerr == nil, cerr == nil
	switch {
	case hasKey && hasCrt:
		if err := os.Rename(key, filepath.Join(dir, "node.key")); err != nil {
			return err
		}
		return os.Rename(crt, filepath.Join(dir, "node.crt"))
	case hasKey:
		return os.Remove(key)
	case hasCrt:
		return os.Rename(crt, filepath.Join(dir, "node.crt"))
	}
	return nil
}

// RenewRetry is how soon a failed renewal is tried again (or the
// interval, if shorter): within the control plane's grace
// (DefaultCertGrace), so a node whose renewal answer was lost asks again
// with its old certificate while that one is still accepted.
const RenewRetry = 20 * time.Second

// RenewLoop renews the node's certificate when it is due (due(now); nil:
// RenewDue, a third of its life left), checked every interval; a failure
// is logged and retried after RenewRetry; until ctx ends.
func RenewLoop(ctx context.Context, log *slog.Logger, id *NodeIdentity, fc nodev1connect.FleetServiceClient, interval time.Duration, due func(time.Time) bool) {
	if due == nil {
		due = id.RenewDue
	}
	for {
		wait := interval
		if due(time.Now()) {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			err := id.Renew(cctx, fc)
			cancel()
			if err != nil && ctx.Err() == nil {
				log.Warn("fleet: node certificate renewal failed; retrying", "expires", id.NotAfter(), "err", err)
				wait = min(interval, RenewRetry)
			} else if err == nil {
				log.Info("fleet: node certificate renewed", "expires", id.NotAfter(), "serial", serialOf(id.current().Leaf))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// Renew issues the calling node (its certificate; not revoked, checked by
// Handler) a certificate for the key in its request, naming its own id, and
// records the new serial.
func (f *Fleet) Renew(ctx context.Context, req *connect.Request[nodev1.RenewRequest]) (*connect.Response[nodev1.RenewResponse], error) {
	peer := NodeFromContext(ctx)
	if peer == "" {
		return nil, fmt.Errorf("renew: a node certificate is required: %w", errdefs.ErrUnauthenticated)
	}
	if _, err := f.Store.GetNode(ctx, peer); err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil, fmt.Errorf("renew: node %s is not a member of this fleet: %w", peer, errdefs.ErrPermissionDenied)
		}
		return nil, err
	}
	certPEM, serial, err := f.CA.IssueNode(req.Msg.CsrDer, peer)
	if err != nil {
		return nil, err
	}
	// The new certificate is accepted only once recorded; the presented
	// one is superseded (store.RenewNodeCert: from the current one, or from
	// the superseded one before its deadline if the answer to the last
	// renewal was lost; never past it).
	presented, _ := ctx.Value(peerSerial{}).(string)
	if err := f.Store.RenewNodeCert(ctx, peer, presented, serial, f.now(), f.grace()); err != nil {
		f.log().Warn("fleet: node certificate renewal refused", "node", peer, "serial", presented, "err", err)
		return nil, err
	}
	f.log().Info("fleet: node certificate renewed", "node", peer, "serial", serial, "superseded", presented, "grace", f.grace())
	return connect.NewResponse(&nodev1.RenewResponse{CertPem: certPEM}), nil
}
