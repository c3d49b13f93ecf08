package daemon_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// The cloud endpoints the SDKs call, all served by one stand-in in the fake
// internet with a certificate from a test CA.
var cloudHosts = []string{
	"sts.amazonaws.com", "sts.us-east-1.amazonaws.com", "sts.eu-west-2.amazonaws.com",
	"sts.googleapis.com", "iamcredentials.googleapis.com",
}

const cloudAddr = "198.51.100.60"

// testCA makes a CA and a server certificate for hosts signed by it; it
// returns the certificate and the CA in PEM.
func testCA(t *testing.T, hosts []string) (tls.Certificate, []byte) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "chalk federation test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: hosts[0]}, DNSNames: hosts,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
}

// cloudStandIn answers the calls AWS's and Google's SDKs make for web
// identity federation, verifying the sandbox's token as AWS STS and Google
// STS do: signature against chalkd's JWKS (discovery with go-oidc), audience,
// expiry and subject.
type cloudStandIn struct {
	t        *testing.T
	provider *oidc.Provider
	gcpAud   string

	mu      sync.Mutex
	keys    map[string]string // AWS access key id -> assumed role ARN
	calls   []string          // "host action" in order
	refusal []string          // why requests were refused
}

func (s *cloudStandIn) refuse(w http.ResponseWriter, code int, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	s.mu.Lock()
	s.refusal = append(s.refusal, msg)
	s.mu.Unlock()
	http.Error(w, msg, code)
}

func (s *cloudStandIn) verify(ctx context.Context, aud, token string) (*oidc.IDToken, error) {
	return s.provider.Verifier(&oidc.Config{ClientID: aud}).Verify(ctx, token)
}

func (s *cloudStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host, _, _ := strings.Cut(r.Host, ":")
	if err := r.ParseForm(); err != nil {
		s.refuse(w, 400, "form: %v", err)
		return
	}
	s.mu.Lock()
	s.calls = append(s.calls, host+" "+r.Form.Get("Action")+r.URL.Path)
	s.mu.Unlock()
	switch {
	case strings.HasPrefix(host, "sts.") && strings.HasSuffix(host, ".amazonaws.com") || host == "sts.amazonaws.com":
		s.aws(w, r)
	case host == "sts.googleapis.com" && r.URL.Path == "/v1/token":
		s.gcpSTS(w, r)
	case host == "iamcredentials.googleapis.com":
		s.gcpImpersonate(w, r)
	default:
		s.refuse(w, 404, "no such endpoint %s%s", host, r.URL.Path)
	}
}

func (s *cloudStandIn) aws(w http.ResponseWriter, r *http.Request) {
	switch r.Form.Get("Action") {
	case "AssumeRoleWithWebIdentity":
		idt, err := s.verify(r.Context(), "sts.amazonaws.com", r.Form.Get("WebIdentityToken"))
		if err != nil {
			s.refuse(w, 400, "InvalidIdentityToken: %v", err)
			return
		}
		session := r.Form.Get("RoleSessionName")
		if idt.Subject != "chalk:org:default:sbx:"+session {
			s.refuse(w, 403, "AccessDenied: sub %q for session %q", idt.Subject, session)
			return
		}
		role := r.Form.Get("RoleArn")
		account, name, _ := strings.Cut(strings.TrimPrefix(role, "arn:aws:iam::"), ":role/")
		key := "ASIA" + strings.ToUpper(session)
		s.mu.Lock()
		s.keys[key] = "arn:aws:sts::" + account + ":assumed-role/" + name + "/" + session
		s.mu.Unlock()
		w.Header().Set("Content-Type", "text/xml")
		fmt.Fprintf(w, `<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>%s</AccessKeyId><SecretAccessKey>secret</SecretAccessKey>
<SessionToken>session</SessionToken><Expiration>%s</Expiration></Credentials>
<SubjectFromWebIdentityToken>%s</SubjectFromWebIdentityToken>
<AssumedRoleUser><Arn>%s</Arn><AssumedRoleId>AROA:%s</AssumedRoleId></AssumedRoleUser>
<Audience>sts.amazonaws.com</Audience></AssumeRoleWithWebIdentityResult>
<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>`,
			key, time.Now().Add(time.Hour).UTC().Format(time.RFC3339), idt.Subject, s.keys[key], session)
	case "GetCallerIdentity":
		// Signed (SigV4) with the assumed role's key: the stand-in checks
		// the key id, which only AssumeRoleWithWebIdentity handed out.
		auth := r.Header.Get("Authorization")
		_, cred, _ := strings.Cut(auth, "Credential=")
		key, _, _ := strings.Cut(cred, "/")
		s.mu.Lock()
		arn, ok := s.keys[key]
		s.mu.Unlock()
		if !strings.HasPrefix(auth, "AWS4-HMAC-SHA256 ") || !ok {
			s.refuse(w, 403, "InvalidClientTokenId: %q", auth)
			return
		}
		w.Header().Set("Content-Type", "text/xml")
		fmt.Fprintf(w, `<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<GetCallerIdentityResult><Arn>%s</Arn><UserId>AROA:x</UserId><Account>123456789012</Account></GetCallerIdentityResult>
<ResponseMetadata><RequestId>2</RequestId></ResponseMetadata></GetCallerIdentityResponse>`, arn)
	default:
		s.refuse(w, 400, "unexpected AWS action %q", r.Form.Get("Action"))
	}
}

func (s *cloudStandIn) gcpSTS(w http.ResponseWriter, r *http.Request) {
	if r.Form.Get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange" ||
		r.Form.Get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt" || r.Form.Get("audience") != s.gcpAud {
		s.refuse(w, 400, "invalid_request: %v", r.Form)
		return
	}
	idt, err := s.verify(r.Context(), s.gcpAud, r.Form.Get("subject_token"))
	if err != nil {
		s.refuse(w, 400, "invalid_grant: %v", err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"access_token": "federated:" + idt.Subject, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
		"token_type": "Bearer", "expires_in": 3600,
	})
}

func (s *cloudStandIn) gcpImpersonate(w http.ResponseWriter, r *http.Request) {
	const prefix = "/v1/projects/-/serviceAccounts/"
	sa, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, prefix), ":generateAccessToken")
	bearer := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !strings.HasPrefix(r.URL.Path, prefix) || !ok || !strings.HasPrefix(bearer, "federated:chalk:org:") {
		s.refuse(w, 403, "PERMISSION_DENIED: %s with %q", r.URL.Path, bearer)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"accessToken": "sa:" + sa + ":" + strings.TrimPrefix(bearer, "federated:"),
		"expireTime":  time.Now().Add(time.Hour).UTC().Format(time.RFC3339),
	})
}

// TestCloudFederation: a sandbox created with only the documented options
// (an AWS role, optionally a region; a GCP provider, optionally a service
// account) gets credentials from aws-sdk-go-v2's and Google's default
// credential chains, run inside it, against STS stand-ins in the fake
// internet that verify the token's signature, audience and subject. Nothing
// is configured in the sandbox but what chalkd sets (the test CA aside,
// which stands in for the public CAs).
func TestCloudFederation(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	cert, caPEM := testCA(t, cloudHosts)
	const provider = "projects/123456/locations/global/workloadIdentityPools/chalk-pool/providers/chalk-oidc"
	st := &cloudStandIn{t: t, gcpAud: "//iam.googleapis.com/" + provider, keys: map[string]string{}}
	inet.ServeTLS(cloudAddr, st, cert)
	for _, h := range cloudHosts {
		inet.SetRecord(h, cloudAddr)
	}
	n := chalktest.StartWith(t, inet)
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", n.Socket)
	}}}
	var err error
	st.provider, err = oidc.NewProvider(oidc.ClientContext(ctx, hc), "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	probe := testdataBin(t, "fedprobe")
	run := func(t *testing.T, sb *chalkcompute.Sandbox, cloud string) map[string]string {
		t.Helper()
		b, err := os.ReadFile(probe)
		if err != nil {
			t.Fatal(err)
		}
		if err := sb.WriteFile(ctx, "/bin/fedprobe", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := sb.WriteFile(ctx, "/etc/test-ca.pem", caPEM, 0o644); err != nil {
			t.Fatal(err)
		}
		res, err := sb.Exec(ctx, []string{"fedprobe", cloud}, chalkcompute.ExecEnv(map[string]string{"SSL_CERT_FILE": "/etc/test-ca.pem"}))
		if err != nil || res.Code != 0 {
			st.mu.Lock()
			defer st.mu.Unlock()
			t.Fatalf("fedprobe %s: %v (exit %d)\n%s\nstand-in calls %q refusals %q", cloud, err, exitCode(res), errText(res), st.calls, st.refusal)
		}
		var out map[string]string
		if err := json.Unmarshal(res.Stdout, &out); err != nil {
			t.Fatalf("fedprobe %s output %q: %v", cloud, res.Stdout, err)
		}
		return out
	}
	const role = "arn:aws:iam::123456789012:role/chalk-sandbox"

	t.Run("aws role only", func(t *testing.T) {
		sb := create(t, c, chalkcompute.WithAWSRole(role))
		got := run(t, sb, "aws")
		want := map[string]string{"region": "us-east-1", "access_key_id": "ASIA" + strings.ToUpper(sb.ID()),
			"source": got["source"], "arn": "arn:aws:sts::123456789012:assumed-role/chalk-sandbox/" + sb.ID()}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("aws-sdk-go-v2 default chain got %v, want %v", got, want)
		}
	})
	t.Run("aws role and region", func(t *testing.T) {
		sb := create(t, c, chalkcompute.WithAWSRole(role), chalkcompute.WithAWSRegion("eu-west-2"))
		env := mustExec(t, sb, "sh", "-c", "echo $AWS_REGION $AWS_DEFAULT_REGION")
		if env != "eu-west-2 eu-west-2\n" {
			t.Fatalf("region env %q", env)
		}
		if got := run(t, sb, "aws"); got["region"] != "eu-west-2" || got["arn"] == "" {
			t.Fatalf("aws-sdk-go-v2 default chain got %v", got)
		}
		st.mu.Lock()
		defer st.mu.Unlock()
		if !strings.Contains(strings.Join(st.calls, "\n"), "sts.eu-west-2.amazonaws.com AssumeRoleWithWebIdentity") {
			t.Fatalf("the SDK did not use the region's STS endpoint: %q", st.calls)
		}
	})
	t.Run("gcp provider", func(t *testing.T) {
		sb := create(t, c, chalkcompute.WithGCPWorkloadProvider(provider))
		if got := run(t, sb, "gcp"); got["access_token"] != "federated:chalk:org:default:sbx:"+sb.ID() {
			t.Fatalf("google default credentials got %v", got)
		}
	})
	t.Run("gcp service account impersonation", func(t *testing.T) {
		const sa = "reader@my-project.iam.gserviceaccount.com"
		sb := create(t, c, chalkcompute.WithGCPWorkloadProvider(provider), chalkcompute.WithGCPServiceAccount(sa))
		if got := run(t, sb, "gcp"); got["access_token"] != "sa:"+sa+":chalk:org:default:sbx:"+sb.ID() {
			t.Fatalf("google default credentials (impersonating) got %v", got)
		}
	})
	t.Run("bad options refused at create", func(t *testing.T) {
		for name, opts := range map[string][]chalkcompute.CreateOption{
			"region without role":    {chalkcompute.WithAWSRegion("eu-west-2")},
			"bad region":             {chalkcompute.WithAWSRole(role), chalkcompute.WithAWSRegion("eu-west-2\nAWS_ACCESS_KEY_ID=x")},
			"sa without provider":    {chalkcompute.WithGCPServiceAccount("reader@my-project.iam.gserviceaccount.com")},
			"sa not a service email": {chalkcompute.WithGCPWorkloadProvider(provider), chalkcompute.WithGCPServiceAccount("alice@example.com")},
		} {
			sb, err := c.Create(ctx, chalkcompute.Base("busybox"), opts...)
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("%s: create = %v, %v; want invalid argument", name, sb, err)
			}
		}
	})
	st.mu.Lock()
	defer st.mu.Unlock()
	if len(st.refusal) != 0 {
		t.Fatalf("the stand-ins refused requests: %q", st.refusal)
	}
}

func exitCode(res *chalkcompute.ExecResult) int {
	if res == nil {
		return -1
	}
	return res.Code
}

func errText(res *chalkcompute.ExecResult) string {
	if res == nil {
		return ""
	}
	return string(res.Stderr)
}
