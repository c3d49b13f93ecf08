package registry

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Over the network (fleet nodes pulling from the control plane's registry)
// the registry serves HTTPS (Config.TLSCertFile, Config.TLSKeyFile) and
// clients use RemotePullOptions: the pull credential, a transport that
// trusts the given CA and never speaks plain HTTP. The latter matters:
// go-containerregistry treats a registry at a private or loopback address
// as "insecure", races an https and an http ping and falls back to http
// when https fails, which would hand the credential in clear text to
// whoever can break the TLS connection on the path.

// loadServerTLS loads the registry's certificate.
func loadServerTLS(certFile, keyFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, fmt.Errorf("registry TLS: both a certificate and a key file are needed: %w", errdefs.ErrInvalidArgument)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("registry TLS: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// pinnedClientTLS is chalkd's own client configuration for its registry
// served with cert: it accepts exactly that certificate (it dials the
// listener's address, which the certificate need not name).
func pinnedClientTLS(cert tls.Certificate) *tls.Config {
	leaf := cert.Certificate[0]
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by the pin below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 || !bytes.Equal(raw[0], leaf) {
				return errors.New("registry: the server's certificate is not the registry's own")
			}
			return nil
		},
	}
}

// httpsOnly refuses requests that are not https.
type httpsOnly struct{ inner http.RoundTripper }

func (t httpsOnly) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Scheme != "https" {
		if r.Body != nil {
			_ = r.Body.Close()
		}
		return nil, fmt.Errorf("registry: refusing plain %s to %s: only https carries the credential", r.URL.Scheme, r.URL.Host)
	}
	return t.inner.RoundTrip(r)
}

// RemotePullOptions returns go-containerregistry options for pulling from a
// chalk registry over the network with cred (the pull credential): HTTPS
// only, trusting only the CA certificates in caPEM (the system's roots when
// caPEM is empty).
func RemotePullOptions(cred Credential, caPEM []byte) ([]remote.Option, error) {
	if cred.Username == "" || cred.Password == "" {
		return nil, fmt.Errorf("registry: a credential is needed to pull: %w", errdefs.ErrInvalidArgument)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(caPEM) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("registry: no CA certificate in the given PEM: %w", errdefs.ErrInvalidArgument)
		}
		cfg.RootCAs = pool
	}
	return RemotePullOptionsTLS(cred, cfg)
}

// RemotePullOptionsTLS is RemotePullOptions verifying the registry with cfg
// (a fleet node: the fleet CA and the control plane's certificate).
func RemotePullOptionsTLS(cred Credential, cfg *tls.Config) ([]remote.Option, error) {
	opts, _, err := remotePullOptionsTLS(cred, cfg)
	return opts, err
}

func remotePullOptionsTLS(cred Credential, cfg *tls.Config) ([]remote.Option, *http.Transport, error) {
	if cred.Username == "" || cred.Password == "" {
		return nil, nil, fmt.Errorf("registry: a credential is needed to pull: %w", errdefs.ErrInvalidArgument)
	}
	if cfg == nil {
		return nil, nil, fmt.Errorf("registry: a TLS configuration is needed to pull: %w", errdefs.ErrInvalidArgument)
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       cfg.Clone(),
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
	}
	return []remote.Option{remote.WithTransport(httpsOnly{tr}), remote.WithAuth(cred.Authenticator())}, tr, nil
}

var _ http.RoundTripper = httpsOnly{}
