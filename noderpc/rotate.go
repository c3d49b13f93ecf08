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
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/node/v1/nodev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// Node certificate rotation. A node's certificate lasts certTTL; once less
// than a third of it is left, the node makes a new key and asks the control
// plane over the mTLS fleet channel (Renew, with its current certificate,
// which must not be revoked) for a certificate for it; the control plane
// issues one naming the same node id and records its serial. The node keeps
// the new pair (node.key.new and node.crt.new, then renamed over the old:
// a crash at any point leaves a pair that loads, finishRenewal) and
// presents it on every new connection (NodeIdentity.current).

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
	return nil
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

// RenewLoop renews the node's certificate when it is due (checked every
// interval; a failure is logged and retried at the next check) until ctx
// ends.
func RenewLoop(ctx context.Context, log *slog.Logger, id *NodeIdentity, fc nodev1connect.FleetServiceClient, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if id.RenewDue(time.Now()) {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			err := id.Renew(cctx, fc)
			cancel()
			if err != nil && ctx.Err() == nil {
				log.Warn("fleet: node certificate renewal failed; retrying", "expires", id.NotAfter(), "err", err)
			} else if err == nil {
				log.Info("fleet: node certificate renewed", "expires", id.NotAfter())
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
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
	if _, err := f.Store.UpdateNode(ctx, peer, func(n *store.Node) error { n.CertSerial = serial; return nil }); err != nil {
		return nil, err
	}
	f.log().Info("fleet: node certificate renewed", "node", peer, "serial", serial)
	return connect.NewResponse(&nodev1.RenewResponse{CertPem: certPEM}), nil
}
