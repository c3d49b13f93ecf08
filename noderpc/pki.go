package noderpc

import (
	"bytes"
	"cmp"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/chalkcompute/chalkcompute/atomicfile"
	"github.com/chalkcompute/chalkcompute/errdefs"
)

// The fleet's PKI. The control plane holds a CA (LoadOrCreateCA, in its
// data dir, 0700). Certificates name who holds them with one URI SAN:
// chalk://control for the control plane, chalk://node/<id> for a node; the
// identity is that URI, never a host name (nodes are reached by address).
// Both ends check the other's URI on every connection (VerifyConnection),
// so a node can reach neither another node's API nor the control plane's
// as anyone but itself.

const (
	controlURI    = "chalk://control"
	nodeURIPrefix = "chalk://node/"
	// certTTL is how long issued certificates are valid; a node renews
	// its own once less than a third of it is left (rotate.go).
	certTTL = 365 * 24 * time.Hour
)

// CA is the fleet's certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	PEM  []byte // Cert, PEM-encoded
	pool *x509.CertPool
	// NodeTTL is how long node certificates it issues last (0: certTTL,
	// a year; shorter only as a test hook).
	NodeTTL time.Duration
}

// LoadOrCreateCA loads the CA from dir (ca.crt, ca.key), creating both the
// first time. dir is made 0700, the key 0600.
func LoadOrCreateCA(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	certPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	if errors.Is(cerr, os.ErrNotExist) && errors.Is(kerr, os.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "chalkcompute fleet CA"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			MaxPathLenZero:        true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		if err != nil {
			return nil, err
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
		certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
			return nil, err
		}
		if err := atomicfile.WriteFile(certPath, certPEM, 0o644); err != nil {
			return nil, err
		}
	} else if cerr != nil || kerr != nil {
		return nil, fmt.Errorf("fleet CA in %s: %w", dir, errors.Join(cerr, kerr))
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("fleet CA in %s: %w", dir, err)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok || !cert.IsCA {
		return nil, fmt.Errorf("fleet CA in %s: not a CA key pair", dir)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, Key: signer, PEM: certPEM, pool: pool}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// Fingerprint is the CA certificate's SHA-256 (hex): a join token carries it
// so that the joining node can check it talks to this control plane.
func (ca *CA) Fingerprint() string { return Fingerprint(ca.Cert) }

// Fingerprint is a certificate's SHA-256, hex.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

func (ca *CA) issue(pub crypto.PublicKey, uri string, hosts []string, ttl time.Duration) ([]byte, *x509.Certificate, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: uri},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	c, err := x509.ParseCertificate(der)
	return der, c, err
}

// ControlCert issues the control plane's certificate (a fresh key; it is
// made at every start and never written).
func (ca *CA) ControlCert(hosts []string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, c, err := ca.issue(key.Public(), controlURI, hosts, certTTL)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.Cert.Raw}, PrivateKey: key, Leaf: c}, nil
}

// IssueNode signs a node's certificate request for nodeID; it returns the
// certificate (PEM) and its serial (hex).
func (ca *CA) IssueNode(csrDER []byte, nodeID string) ([]byte, string, error) {
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, "", fmt.Errorf("certificate request: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, "", fmt.Errorf("certificate request: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	// Only the key is taken from the request: the names are the CA's.
	der, c, err := ca.issue(csr.PublicKey, nodeURIPrefix+nodeID, nil, cmp.Or(ca.NodeTTL, certTTL))
	if err != nil {
		return nil, "", err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), c.SerialNumber.Text(16), nil
}

// NodeIDOf returns the node id a verified certificate names ("" if it is
// not a node's).
func NodeIDOf(c *x509.Certificate) string {
	if len(c.URIs) != 1 {
		return ""
	}
	s := c.URIs[0].String()
	if !strings.HasPrefix(s, nodeURIPrefix) {
		return ""
	}
	return strings.TrimPrefix(s, nodeURIPrefix)
}

func isControl(c *x509.Certificate) bool {
	return len(c.URIs) == 1 && c.URIs[0].String() == controlURI
}

// verifyPeer checks a peer's chain against pool (for usage) and returns its
// leaf. Host names are not checked: identity is the URI.
func verifyPeer(cs tls.ConnectionState, pool *x509.CertPool, usage x509.ExtKeyUsage) (*x509.Certificate, error) {
	if len(cs.PeerCertificates) == 0 {
		return nil, errors.New("no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return nil, err
	}
	return leaf, nil
}

// ControlServerTLS is the control plane's fleet listener: its certificate;
// client certificates are verified when given (Join has none; the handlers
// of every other call require a node's, see NodeFromContext).
func ControlServerTLS(ca *CA, cert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    ca.pool,
		NextProtos:   []string{"h2"},
	}
}

// ControlClientTLS is the control plane calling node nodeID: the node must
// present a certificate of the fleet CA naming nodeID.
func ControlClientTLS(ca *CA, cert tls.Certificate, nodeID string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{cert},
		InsecureSkipVerify: true, // verified below: the chain and the node id, not a host name
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf, err := verifyPeer(cs, ca.pool, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return fmt.Errorf("node %s: %w", nodeID, err)
			}
			if got := NodeIDOf(leaf); got != nodeID {
				return fmt.Errorf("node %s: the peer's certificate names %q", nodeID, got)
			}
			return nil
		},
		NextProtos: []string{"h2"},
	}
}

// NodeIdentity is what a node holds after joining.
type NodeIdentity struct {
	ID   string
	Cert tls.Certificate // as loaded; the one in use is current() (rotate.go)
	CA   *x509.CertPool

	dir      string // where it is kept ("": not saved)
	rotated  atomic.Pointer[tls.Certificate]
	renewals atomic.Uint64
}

// NodeServerTLS is a node serving NodeService: only the control plane's
// certificate is accepted.
func NodeServerTLS(id *NodeIdentity) *tls.Config {
	config := func(cert *tls.Certificate) *tls.Config {
		return &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{*cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    id.CA,
			VerifyConnection: func(cs tls.ConnectionState) error {
				if len(cs.PeerCertificates) == 0 || !isControl(cs.PeerCertificates[0]) {
					return errors.New("node API: only the control plane may call")
				}
				return nil
			},
			NextProtos: []string{"h2"},
		}
	}
	cfg := config(id.current())
	// Each handshake with the certificate in use (a renewal replaces it).
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) { return config(id.current()), nil }
	return cfg
}

// NodeClientTLS is a node calling the control plane's fleet listener.
func NodeClientTLS(id *NodeIdentity) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return id.current(), nil },
		InsecureSkipVerify:   true, // verified below: the chain and the control plane's URI
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf, err := verifyPeer(cs, id.CA, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return fmt.Errorf("control plane: %w", err)
			}
			if !isControl(leaf) {
				return errors.New("control plane: the peer's certificate is not the control plane's")
			}
			return nil
		},
		NextProtos: []string{"h2"},
	}
}

// RegistryClientTLS is a node pulling from the control plane's registry:
// the peer must present the control plane's certificate from the fleet CA
// (whatever address the node dials it at). The node presents its own
// certificate (the listener admits fleet members not removed:
// Fleet.RegistryGate); the registry then asks the pull credential.
func RegistryClientTLS(id *NodeIdentity) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return id.current(), nil },
		InsecureSkipVerify:   true, // verified below: the chain and the control plane's URI
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf, err := verifyPeer(cs, id.CA, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return fmt.Errorf("control plane registry: %w", err)
			}
			if !isControl(leaf) {
				return errors.New("control plane registry: the peer's certificate is not the control plane's")
			}
			return nil
		},
	}
}

// joinTLS is a node joining: it knows the CA only by the fingerprint in its
// join token; the control plane presents its chain (leaf and CA).
func joinTLS(caFingerprint string) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // verified below against the pinned CA
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) < 2 {
				return errors.New("join: the control plane sent no CA certificate")
			}
			ca := cs.PeerCertificates[len(cs.PeerCertificates)-1]
			if Fingerprint(ca) != caFingerprint {
				return errors.New("join: the control plane's CA is not the one the join token names")
			}
			pool := x509.NewCertPool()
			pool.AddCert(ca)
			leaf, err := verifyPeer(cs, pool, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return fmt.Errorf("join: %w", err)
			}
			if !isControl(leaf) {
				return errors.New("join: the peer's certificate is not the control plane's")
			}
			return nil
		},
		NextProtos: []string{"h2"},
	}
}

// SaveNodeIdentity writes a node's key, certificate and CA to dir (0700).
func SaveNodeIdentity(dir, id string, keyPEM, certPEM, caPEM []byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{"node.key", keyPEM, 0o600}, {"node.crt", certPEM, 0o644}, {"ca.crt", caPEM, 0o644}, {"node-id", []byte(id + "\n"), 0o644}} {
		if err := atomicfile.WriteFile(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// LoadNodeIdentity reads what SaveNodeIdentity wrote (os.ErrNotExist: the
// node has not joined).
func LoadNodeIdentity(dir string) (*NodeIdentity, error) {
	if err := finishRenewal(dir); err != nil {
		return nil, err
	}
	idb, err := os.ReadFile(filepath.Join(dir, "node-id"))
	if err != nil {
		return nil, err
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("node identity in %s: no CA certificate", dir)
	}
	id := string(bytes.TrimSpace(idb))
	if leaf, err := x509.ParseCertificate(pair.Certificate[0]); err != nil || NodeIDOf(leaf) != id {
		return nil, fmt.Errorf("node identity in %s: the certificate is not node %q's", dir, id)
	}
	return &NodeIdentity{ID: id, Cert: pair, CA: pool, dir: dir}, nil
}
