package daemon

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"testing"
)

// TestIngressSetup: the signing key is made once (0600) and kept; a given
// certificate serves HTTPS with URLs from the domain and the listener's port.
func TestIngressSetup(t *testing.T) {
	dir := t.TempDir()
	k1, err := loadOrMakeKey(filepath.Join(dir, "ingress.key"))
	if err != nil {
		t.Fatal(err)
	}
	k2, err := loadOrMakeKey(filepath.Join(dir, "ingress.key"))
	if err != nil || !bytes.Equal(k1, k2) || len(k1) != 32 {
		t.Fatalf("key not kept: %x %x %v", k1, k2, err)
	}
	if st, err := os.Stat(filepath.Join(dir, "ingress.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st.Mode(), err)
	}
	// A certificate "given" by the operator (made here by selfSigned).
	if _, err := selfSigned(filepath.Join(dir, "given"), "apps.example.test"); err != nil {
		t.Fatal(err)
	}
	cfg := &Config{DataDir: dir, Ingress: IngressConfig{
		Listen: "127.0.0.1:0", Domain: "apps.example.test",
		TLSCert: filepath.Join(dir, "given", "cert.pem"), TLSKey: filepath.Join(dir, "given", "key.pem"),
	}}
	if err := cfg.defaults(); err != nil {
		t.Fatal(err)
	}
	n, err := newIngress(cfg, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.close()
	if n.tls == nil || len(n.tls.Certificates) != 1 {
		t.Fatal("given certificate not loaded")
	}
	host, path := n.URLs("sb-00ff", 8080)
	_, port, _ := net.SplitHostPort(n.ln.Addr().String())
	if host != "https://8080-sb-00ff.apps.example.test:"+port+"/" || path != "https://apps.example.test:"+port+"/s/sb-00ff/8080/" {
		t.Fatalf("URLs %q %q", host, path)
	}
	cfg.Ingress.TLSKey = filepath.Join(dir, "missing.pem")
	if _, err := newIngress(cfg, nil, nil, nil); err == nil {
		t.Fatal("a missing key file was accepted")
	}
}
