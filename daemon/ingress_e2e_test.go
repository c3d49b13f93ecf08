package daemon_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

const (
	ingressDomain = "sbx.test"
	ingressAddr   = "127.0.0.1:7449" // chalkd's default, inside the node's netns
)

// ingressClients talks to a node's ingress from inside its network
// namespace, trusting its self-signed certificate: h2 negotiates HTTP/2,
// h1 stays on HTTP/1.1 (WebSocket upgrades). Every connection goes to the
// ingress listener whatever the URL's host (no DNS for the test domain).
type ingressClients struct {
	h2, h1 *http.Client
	roots  *x509.CertPool
}

func newIngressClients(t testing.TB, n *chalktest.Node) *ingressClients {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(n.Dir, "ingress-tls", "cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	dial := dialIn(n.Netns)
	toIngress := func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dial(ctx, network, ingressAddr)
	}
	h2 := &http.Transport{DialContext: toIngress, ForceAttemptHTTP2: true, TLSClientConfig: &tls.Config{RootCAs: roots}}
	h1 := &http.Transport{DialContext: toIngress, TLSClientConfig: &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}}}
	t.Cleanup(func() { h2.CloseIdleConnections(); h1.CloseIdleConnections() })
	return &ingressClients{h2: &http.Client{Transport: h2, CheckRedirect: noRedirect}, h1: &http.Client{Transport: h1, CheckRedirect: noRedirect}, roots: roots}
}

func noRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// get fetches u with the HTTP/2 client and optional bearer; it returns the
// status, protocol major version and body.
func (ic *ingressClients) get(t testing.TB, u, bearer string, hdr ...string) (int, int, string) {
	t.Helper()
	code, proto, body, err := ic.try(u, bearer, hdr...)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return code, proto, body
}

// try is get returning the transport error instead of failing the test.
func (ic *ingressClients) try(u, bearer string, hdr ...string) (int, int, string, error) {
	req, _ := http.NewRequest("GET", u, nil)
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := ic.h2.Do(req.WithContext(ctx))
	if err != nil {
		return 0, 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.ProtoMajor, string(b), nil
}

func (ic *ingressClients) ws(ctx context.Context, u, bearer string) (*websocket.Conn, error) {
	h := http.Header{}
	if bearer != "" {
		h.Set("Authorization", "Bearer "+bearer)
	}
	c, resp, err := websocket.Dial(ctx, strings.Replace(u, "https://", "wss://", 1), &websocket.DialOptions{HTTPClient: ic.h1, HTTPHeader: h})
	if err != nil && resp != nil {
		err = fmt.Errorf("%w (status %d)", err, resp.StatusCode)
	}
	return c, err
}

// startIngressd copies testdata/ingressd into sb and runs it on port,
// returning once it listens.
func startIngressd(t testing.TB, sb *chalkcompute.Sandbox, port int) {
	t.Helper()
	bin, err := os.ReadFile(testdataBin(t, "ingressd"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := sb.WriteFile(ctx, "/bin/ingressd", bin, 0o755); err != nil {
		t.Fatal(err)
	}
	w := &outputWatch{}
	if _, err := sb.Start(ctx, []string{"/bin/ingressd", fmt.Sprint(port)}, chalkcompute.Stdout(w), chalkcompute.Stderr(w)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.until("listening"):
	case <-time.After(30 * time.Second):
		t.Fatalf("ingressd did not start: %q", w.String())
	}
}

// wsEcho sends msg on c and expects it back.
func wsEcho(ctx context.Context, c *websocket.Conn, msg string) error {
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		return err
	}
	_, b, err := c.Read(ctx)
	if err != nil {
		return err
	}
	if string(b) != msg {
		return fmt.Errorf("echo %q, want %q", b, msg)
	}
	return nil
}

// TestIngress: exposed sandbox ports through chalkd's ingress listener
// (TLS with a self-signed certificate, host and path routing) with real
// clients: busybox httpd and testdata/ingressd inside sandboxes, Go's
// HTTP/2 client, coder/websocket.
func TestIngress(t *testing.T) {
	n := chalktest.Start(t, "--ingress-domain", ingressDomain, "--ingress-tls-self-signed",
		"--ingress-max-per-route", "8", "--ingress-max-conns-per-client", "24")
	c := n.Client()
	ctx := ctxT(t, 5*time.Minute)
	ic := newIngressClients(t, n)
	admin := n.Token()

	sb := create(t, c)
	startIngressd(t, sb, 8080)
	mustExec(t, sb, "sh", "-c", "mkdir -p /www && echo 'busybox httpd here' > /www/index.html && httpd -p 8081 -h /www")

	priv, err := sb.Expose(ctx, 8080)
	if err != nil {
		t.Fatal(err)
	}
	wantURL := fmt.Sprintf("https://8080-%s.%s:7449/", sb.ID(), ingressDomain)
	if priv.Url != wantURL || priv.PathUrl != fmt.Sprintf("https://%s:7449/s/%s/8080/", ingressDomain, sb.ID()) || priv.Public || priv.Token == "" {
		t.Fatalf("expose: %+v, want url %s", priv, wantURL)
	}
	pub, err := sb.Expose(ctx, 8081, chalkcompute.Public())
	if err != nil {
		t.Fatal(err)
	}

	t.Run("private_refused_without_credentials", func(t *testing.T) {
		for _, u := range []string{priv.Url, priv.PathUrl} {
			if code, _, _ := ic.get(t, u, ""); code != http.StatusUnauthorized {
				t.Fatalf("%s without a token: %d, want 401", u, code)
			}
		}
		if code, _, _ := ic.get(t, priv.Url, "chalk_notakey"); code != http.StatusUnauthorized {
			t.Fatalf("bad key: %d", code)
		}
		// A token of this sandbox for another port opens nothing here.
		other, err := sb.Expose(ctx, 9999)
		if err != nil {
			t.Fatal(err)
		}
		if code, _, _ := ic.get(t, priv.Url+"?chalk_token="+other.Token, ""); code != http.StatusUnauthorized {
			t.Fatalf("token of port 9999 on 8080: %d", code)
		}
		if err := sb.Unexpose(ctx, 9999); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("api_key_over_http2_host_and_path_routing", func(t *testing.T) {
		code, proto, body := ic.get(t, priv.Url+"echo?x=1", admin)
		if code != 200 || proto != 2 {
			t.Fatalf("host route: %d HTTP/%d %q", code, proto, body)
		}
		var seen struct {
			URI    string
			Host   string
			Header http.Header
		}
		if err := json.Unmarshal([]byte(body), &seen); err != nil {
			t.Fatal(err)
		}
		if seen.URI != "/echo?x=1" || seen.Header.Get("Authorization") != "" || seen.Header.Get("X-Forwarded-Proto") != "https" {
			t.Fatalf("the sandbox saw %+v (the key must be stripped)", seen)
		}
		code, _, body = ic.get(t, priv.PathUrl+"echo", admin)
		if code != 200 || !strings.Contains(body, `"uri":"/echo"`) {
			t.Fatalf("path route: %d %q", code, body)
		}
	})

	t.Run("signed_url_and_cookie", func(t *testing.T) {
		req, _ := http.NewRequest("GET", priv.SignedUrl, nil)
		resp, err := ic.h2.Do(req.WithContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), "hello") {
			t.Fatalf("signed URL: %d %q", resp.StatusCode, body)
		}
		var cookie *http.Cookie
		for _, ck := range resp.Cookies() {
			if ck.Name == "chalk_ingress" {
				cookie = ck
			}
		}
		if cookie == nil || !cookie.HttpOnly || !cookie.Secure {
			t.Fatalf("cookie: %+v", resp.Cookies())
		}
		code, _, body2 := ic.get(t, priv.Url+"echo?a=b", "", "Cookie", "chalk_ingress="+cookie.Value+"; app=1")
		if code != 200 || strings.Contains(body2, cookie.Value) || !strings.Contains(body2, "app=1") || !strings.Contains(body2, `"uri":"/echo?a=b"`) {
			t.Fatalf("cookie only: %d %q (token must not reach the sandbox, other cookies must)", code, body2)
		}
		code, _, body2 = ic.get(t, priv.Url+"echo?chalk_token="+priv.Token+"&a=b", "")
		if code != 200 || strings.Contains(body2, priv.Token) {
			t.Fatalf("token in query: %d %q", code, body2)
		}
	})

	t.Run("signed_url_expires", func(t *testing.T) {
		short, err := sb.Expose(ctx, 8080, chalkcompute.WithTokenTTL(2*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if code, _, _ := ic.get(t, short.SignedUrl, ""); code != 200 {
			t.Fatalf("fresh short token: %d", code)
		}
		exp, err := time.Parse(time.RFC3339, short.TokenExpiresAt)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Until(exp) + 50*time.Millisecond) // the token's lifetime, not synchronisation
		if code, _, _ := ic.get(t, short.SignedUrl, ""); code != http.StatusUnauthorized {
			t.Fatalf("expired token: %d, want 401", code)
		}
	})

	t.Run("public", func(t *testing.T) {
		code, _, body := ic.get(t, pub.Url, "")
		if code != 200 || body != "busybox httpd here\n" {
			t.Fatalf("public busybox httpd: %d %q", code, body)
		}
		if code, _, body := ic.get(t, pub.PathUrl+"index.html", ""); code != 200 || body != "busybox httpd here\n" {
			t.Fatalf("public path route: %d %q", code, body)
		}
	})

	t.Run("another_orgs_key_refused", func(t *testing.T) {
		org, err := c.CreateOrg(ctx, "other", "olga")
		if err != nil {
			t.Fatal(err)
		}
		if code, _, _ := ic.get(t, priv.Url, org.AdminKey.Secret); code != http.StatusForbidden {
			t.Fatalf("other org's key: %d, want 403", code)
		}
		oc, err := chalkcompute.NewClient(chalkcompute.WithURL("unix://"+n.Socket), chalkcompute.WithToken(org.AdminKey.Secret))
		if err != nil {
			t.Fatal(err)
		}
		// (Expose itself as another org: TestCrossOrgMatrix.)
		if _, err := oc.Sandbox(ctx, sb.ID()); err == nil || !strings.Contains(err.Error(), "not found") {
			t.Fatalf("other org sees our sandbox: %v", err)
		}
	})

	t.Run("server_sent_events_stream", func(t *testing.T) {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(sctx, "GET", priv.Url+"sse", nil)
		req.Header.Set("Authorization", "Bearer "+admin)
		resp, err := ic.h2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		r := bufio.NewReader(resp.Body)
		for i := 1; i <= 3; i++ {
			// The server writes event i and waits for a release: the event
			// arrives only if nothing on the way buffers it.
			line, err := r.ReadString('\n')
			if err != nil || line != fmt.Sprintf("data: event %d\n", i) {
				t.Fatalf("event %d: %q %v", i, line, err)
			}
			_, _ = r.ReadString('\n')
			if code, _, _ := ic.get(t, priv.Url+"release", admin); code != 200 {
				t.Fatalf("release: %d", code)
			}
		}
	})

	t.Run("websocket", func(t *testing.T) {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if _, err := ic.ws(wctx, priv.Url+"ws", ""); err == nil {
			t.Fatal("private WebSocket without credentials opened")
		}
		ws, err := ic.ws(wctx, priv.Url+"ws", admin)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		for i := range 3 {
			if err := wsEcho(wctx, ws, fmt.Sprintf("ping %d", i)); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("slow_sandbox_server_cannot_exhaust_chalkd", func(t *testing.T) {
		// 8 requests the sandbox never answers fill the route; the 9th is
		// refused at once, other routes and the API are served meanwhile.
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		started := make(chan error, 8)
		for range 8 {
			go func() {
				for {
					req, _ := http.NewRequestWithContext(sctx, "GET", priv.Url+"slow", nil)
					req.Header.Set("Authorization", "Bearer "+admin)
					resp, err := ic.h1.Do(req)
					if err == nil {
						resp.Body.Close()
						if resp.StatusCode == http.StatusServiceUnavailable {
							continue // a slot still held by an earlier stream, or the probe
						}
						err = fmt.Errorf("slow answered %d", resp.StatusCode)
					}
					started <- err
					return
				}
			}()
		}
		// Wait until the route is full: a request is refused with 503.
		var code int
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
			if code, _, _ = ic.get(t, priv.Url, admin); code == http.StatusServiceUnavailable {
				break
			}
		}
		if code != http.StatusServiceUnavailable {
			select {
			case err := <-started:
				t.Fatalf("9th request to a full route: %d, want 503; a slow request ended: %v", code, err)
			default:
			}
			t.Fatalf("9th request to a full route: %d, want 503", code)
		}
		if code, _, _ := ic.get(t, pub.Url, ""); code != 200 {
			t.Fatalf("another route while one is full: %d", code)
		}
		if _, err := sb.Exposures(ctx); err != nil {
			t.Fatalf("API while a route is full: %v", err)
		}
		cancel()
		for range 8 {
			if err := <-started; !errors.Is(err, context.Canceled) {
				t.Fatalf("slow request: %v", err)
			}
		}
		// Per-client connection cap: held connections up to it, the next
		// one is closed at accept.
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		dial := dialIn(n.Netns)
		refused := false
		for range 60 {
			conn, err := dial(ctx, "tcp", ingressAddr)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, conn)
			_ = conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := conn.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
				refused = true
				break
			}
		}
		if !refused || len(held) > 24+3 {
			t.Fatalf("per-client cap 24: refused=%v after %d connections", refused, len(held))
		}
		for _, c := range held {
			c.Close()
		}
		held = nil
		ic.h2.Transport.(*http.Transport).CloseIdleConnections()
		// The listener counts a client's connections down as it sees them
		// close: until then a new one may still be closed at accept (EOF).
		var lastErr error
		for deadline := time.Now().Add(10 * time.Second); ; {
			if code, _, _, lastErr = ic.try(pub.Url, ""); code == 200 || time.Now().After(deadline) {
				break
			}
		}
		if code != 200 {
			t.Fatalf("after releasing connections: %d %v", code, lastErr)
		}
	})

	t.Run("cli", func(t *testing.T) {
		out, stderr, code := n.CLI("compute", "sandbox", "expose", sb.ID(), "8082", "--public", "-o", "json")
		var x struct {
			URL     string `json:"url"`
			PathURL string `json:"path_url"`
			Public  bool   `json:"public"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &x) != nil || !x.Public || x.URL != fmt.Sprintf("https://8082-%s.%s:7449/", sb.ID(), ingressDomain) {
			t.Fatalf("cli expose: %d %q %q", code, out, stderr)
		}
		// Nothing listens on 8082: the ingress answers 502 at once.
		if code, _, _ := ic.get(t, x.URL, ""); code != http.StatusBadGateway {
			t.Fatalf("exposed port with no server: %d, want 502", code)
		}
		out, _, code = n.CLI("compute", "sandbox", "exposures", sb.ID())
		if code != 0 || !strings.Contains(out, "8082") || !strings.Contains(out, "public") || !strings.Contains(out, "private") {
			t.Fatalf("cli exposures: %q", out)
		}
		if out, stderr, code := n.CLI("compute", "sandbox", "unexpose", sb.ID(), "8082"); code != 0 {
			t.Fatalf("cli unexpose: %q %q", out, stderr)
		}
		if code, _, _ := ic.get(t, x.URL, ""); code != http.StatusNotFound {
			t.Fatalf("after cli unexpose: %d", code)
		}
	})

	t.Run("node_users_reach_sandboxes_only_through_the_ingress", func(t *testing.T) {
		// An unprivileged user on the node: the sandbox's address is closed
		// to it (sandboxnet's output chain), the public route open; root
		// (chalkd) reaches the sandbox directly.
		probe := func(uid, url string) string {
			argv := []string{"nsenter", "--net=/run/netns/" + n.Netns, "--"}
			if uid != "0" {
				argv = append(argv, "setpriv", "--reuid="+uid, "--regid="+uid, "--clear-groups")
			}
			argv = append(argv, "/usr/bin/python3", "-c", `import ssl, sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2, context=ssl._create_unverified_context()).status)
except Exception as e:
    print("error", type(e).__name__)`, url)
			out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
			if err != nil {
				t.Fatalf("%v: %v %s", argv, err, out)
			}
			return strings.TrimSpace(string(out))
		}
		direct := "http://" + net.JoinHostPort(sb.Info.Ip, "8081") + "/"
		viaIngress := fmt.Sprintf("https://127.0.0.1:7449/s/%s/8081/", sb.ID())
		if got := probe("65534", direct); got == "200" {
			t.Fatalf("uid 65534 on the node reached the sandbox directly: %s", got)
		}
		if got := probe("0", direct); got != "200" {
			t.Fatalf("root on the node to the sandbox: %s", got)
		}
		if got := probe("65534", viaIngress); got != "200" {
			t.Fatalf("uid 65534 through the ingress: %s", got)
		}
	})

	t.Run("unexpose_cuts_open_websocket", func(t *testing.T) {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		ws, err := ic.ws(wctx, priv.Url+"ws", admin)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		if err := wsEcho(wctx, ws, "before"); err != nil {
			t.Fatal(err)
		}
		if err := sb.Unexpose(ctx, 8080); err != nil {
			t.Fatal(err)
		}
		if err := wsEcho(wctx, ws, "after"); err == nil || wctx.Err() != nil {
			t.Fatalf("WebSocket after unexpose: %v (ctx %v)", err, wctx.Err())
		}
		if code, _, _ := ic.get(t, priv.Url, admin); code != http.StatusNotFound {
			t.Fatalf("unexposed route: %d, want 404", code)
		}
		list, err := sb.Exposures(ctx)
		if err != nil || len(list) != 1 || list[0].Port != 8081 {
			t.Fatalf("exposures after unexpose: %v %v", list, err)
		}
	})

	t.Run("survives_restart_then_terminate_cuts", func(t *testing.T) {
		e, err := sb.Expose(ctx, 8080)
		if err != nil {
			t.Fatal(err)
		}
		n.Kill()
		n.Restart()
		ic2 := newIngressClients(t, n)
		if code, _, _ := ic2.get(t, e.SignedUrl, ""); code != 200 {
			t.Fatalf("signed URL after restart: %d", code)
		}
		if code, _, _ := ic2.get(t, pub.Url, ""); code != 200 {
			t.Fatalf("public route after restart: %d", code)
		}
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		ws, err := ic2.ws(wctx, e.Url+"ws", n.Token())
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		if err := wsEcho(wctx, ws, "before"); err != nil {
			t.Fatal(err)
		}
		if _, err := sb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
		if err := wsEcho(wctx, ws, "after"); err == nil || wctx.Err() != nil {
			t.Fatalf("WebSocket after terminate: %v", err)
		}
		for _, u := range []string{e.SignedUrl, pub.Url} {
			if code, _, _ := ic2.get(t, u, ""); code != http.StatusNotFound {
				t.Fatalf("%s after terminate: %d, want 404", u, code)
			}
		}
	})
}

// BenchmarkIngress compares a sandbox's HTTP server reached through the
// ingress (plain HTTP, a public path route) with the same server reached
// directly at the sandbox's address, in the same run: request latency
// (GET /) and throughput (GET of 4 MiB), one keep-alive client each.
// go test ./daemon -run '^$' -bench Ingress
func BenchmarkIngress(b *testing.B) {
	n := chalktest.Start(b)
	c := n.Client()
	sb, err := c.Create(context.Background(), chalkcompute.Base("busybox"))
	if err != nil {
		b.Fatal(err)
	}
	startIngressd(b, sb, 8080)
	x, err := sb.Expose(context.Background(), 8080, chalkcompute.Public())
	if err != nil {
		b.Fatal(err)
	}
	tr := &http.Transport{DialContext: dialIn(n.Netns)}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	bases := map[string]string{"direct": "http://" + net.JoinHostPort(sb.Info.Ip, "8080") + "/", "ingress": x.PathUrl}
	fetch := func(b *testing.B, u string) int64 {
		resp, err := hc.Get(u)
		if err != nil {
			b.Fatal(err)
		}
		k, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("GET %s: %d %v", u, resp.StatusCode, err)
		}
		return k
	}
	for _, path := range []string{"", "bytes?n=4194304"} {
		for _, via := range []string{"direct", "ingress"} {
			name := via + "/latency"
			if path != "" {
				name = via + "/throughput_4MiB"
			}
			b.Run(name, func(b *testing.B) {
				u := bases[via] + path
				fetch(b, u) // connect outside the timing
				b.ResetTimer()
				var total int64
				for b.Loop() {
					total += fetch(b, u)
				}
				if path != "" {
					b.SetBytes(total / int64(b.N))
				}
			})
		}
	}
}
