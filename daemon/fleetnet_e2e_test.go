package daemon_test

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetEgress: egress rules hold on a node as in the all-in-one
// daemon. The node's uplink is a fake internet with a LAN host (10.66.x)
// and a cloud-metadata address; the node also reaches the control plane's
// address on a private link (10.251.1.1, beside its fleet listener). A sandbox placed on
// the node, with no policy, reaches the public host through the node's DNS
// proxy and none of the private ones; with policies (sent by the control
// plane to the node) names are allowed and denied, a CIDR entry opens its
// private range, a policy update reaches the node, and all of it holds
// across a restart of the node process.
func TestFleetEgress(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	inet.Host("public.test", "198.51.100.10", "public")
	inet.Host("other.test", "198.51.100.11", "other")
	inet.Host("lan.test", "10.66.0.10", "lan")
	inet.Host("", "100.100.100.200", "cloud-metadata")
	// The node restarts below: a node timeout well above its restart, so
	// its sandboxes are not lost meanwhile.
	control := chalktest.StartControl(t, "--node-timeout", "2m")
	n1 := chalktest.StartFleetNodeWith(t, control, 1, inet)
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)
	// A service on the control plane's private address on the node's link
	// (beside its fleet listener): the node reaches it, its sandboxes must not.
	private := net.JoinHostPort(chalktest.ControlAddr(1), "9997")
	control.Listen(private)

	onNode := func(sb *chalkcompute.Sandbox) {
		t.Helper()
		if _, err := os.Stat(filepath.Join(n1.Dir, "sandboxes", sb.ID())); err != nil {
			t.Fatalf("sandbox %s is not on the node: %v", sb.ID(), err)
		}
	}
	check := func(t *testing.T, sb *chalkcompute.Sandbox, want map[string]string) {
		t.Helper()
		for url, body := range want {
			if got := fetch(t, sb, url); got != body {
				t.Errorf("%s: got %q, want %q", url, got, body)
			}
		}
	}
	// reaches reports whether the sandbox gets the answer of the service on
	// addr (a TCP server that writes "node-service" and closes).
	reaches := func(t *testing.T, sb *chalkcompute.Sandbox, addr string) bool {
		t.Helper()
		host, port, _ := net.SplitHostPort(addr)
		res, err := sb.Exec(ctx, []string{"sh", "-c", "timeout 3 nc " + host + " " + port + " </dev/null"})
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(res.Stdout), "node-service")
	}

	// Wait until the node serves (create fails with no node).
	open := createOnFleet(t, c)
	onNode(open)

	t.Run("no policy", func(t *testing.T) {
		check(t, open, map[string]string{
			"http://public.test/":     "public",
			"http://198.51.100.10/":   "public",
			"http://10.66.0.10/":      "",
			"http://lan.test/":        "",
			"http://100.100.100.200/": "",
		})
		if reaches(t, open, private) {
			t.Errorf("a sandbox on the node reaches the control plane's private address %s", private)
		}
		// It resolves through the node's DNS proxy (at its gateway), not
		// the node's resolvers.
		if out := mustExec(t, open, "cat", "/etc/resolv.conf"); !strings.Contains(out, "nameserver "+gateway(open.Info.Ip)) {
			t.Errorf("resolv.conf of a node sandbox: %q (want its gateway %s)", out, gateway(open.Info.Ip))
		}
	})

	t.Run("policies", func(t *testing.T) {
		names := chalkcompute.NetworkPolicy{Name: "names", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"public.test"}}
		sb := create(t, c, chalkcompute.WithNetworkPolicies(names))
		onNode(sb)
		check(t, sb, map[string]string{
			"http://public.test/":   "public",
			"http://other.test/":    "", // not allowed: resolves to the blackhole
			"http://198.51.100.11/": "",
			"http://lan.test/":      "",
		})
		// The node's egress log reaches the SDK through the control plane.
		drops, err := sb.EgressLog(ctx)
		if err != nil {
			t.Fatal(err)
		}
		saw := false
		for _, d := range drops {
			saw = saw || strings.Contains(d.Dst, "198.51.100.11") || d.Name == "other.test"
		}
		if !saw {
			t.Errorf("egress log of a node sandbox does not show the blocked destination: %v", drops)
		}
		lan := create(t, c, chalkcompute.WithNetworkPolicies(chalkcompute.NetworkPolicy{
			Name: "lan", AllowAll: chalkcompute.Bool(true), AllowedHostnames: []string{"10.66.0.0/16"},
		}))
		onNode(lan)
		check(t, lan, map[string]string{
			"http://other.test/":      "other",
			"http://10.66.0.10/":      "lan",
			"http://100.100.100.200/": "",
		})
		if reaches(t, lan, private) {
			t.Errorf("a CIDR entry for 10.66.0.0/16 opened %s", private)
		}
		// A policy update reaches the node's rules.
		names.AllowedHostnames = []string{"other.test"}
		if _, err := c.UpdatePolicy(ctx, names); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for fetch(t, sb, "http://other.test/") != "other" {
			if time.Now().After(deadline) {
				t.Fatal("the policy update did not reach the node")
			}
			time.Sleep(200 * time.Millisecond) // polling the sandbox's egress
		}
		if got := fetch(t, sb, "http://198.51.100.10/"); got != "" {
			t.Errorf("after the update public.test's address is still allowed: %q", got)
		}

		// The node process restarts (kill -9): its running sandboxes keep
		// their rules, and its new DNS proxy knows them again (it applied
		// their kept policies at start).
		n1.Kill()
		n1.Restart()
		deadline = time.Now().Add(30 * time.Second)
		for {
			_, err := sb.Exec(ctxT(t, 10*time.Second), []string{"true"})
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("exec after the node restarted: %v", err)
			}
			time.Sleep(200 * time.Millisecond) // polling the control plane until the node answers again
		}
		check(t, sb, map[string]string{
			"http://other.test/":  "other",
			"http://public.test/": "",
			"http://lan.test/":    "",
		})
		check(t, open, map[string]string{
			"http://public.test/": "public",
			"http://10.66.0.10/":  "",
		})
		if reaches(t, open, private) {
			t.Errorf("after the node restarted a sandbox reaches %s", private)
		}
		// Before the control plane restores the node (it never lost it):
		// policy updates and the metadata service still find the sandboxes.
		names.AllowedHostnames = []string{"public.test"}
		if _, err := c.UpdatePolicy(ctx, names); err != nil {
			t.Fatal(err)
		}
		deadline = time.Now().Add(20 * time.Second)
		for fetch(t, sb, "http://public.test/") != "public" {
			if time.Now().After(deadline) {
				t.Fatal("a policy update after the node restarted did not reach it")
			}
			time.Sleep(200 * time.Millisecond) // polling the sandbox's egress
		}
		if tok := fetchToken(t, sb, "https://vault.example.test"); strings.Count(tok, ".") != 2 {
			t.Errorf("token after the node restarted: %q", tok)
		}
	})
}

// TestFleetIdentity: a sandbox on a node gets workload tokens from the
// node's metadata service, minted by the control plane's issuer (one for
// the fleet) and verified by go-oidc against the control plane's discovery
// and JWKS, with the sandbox's own claims. (That a node gets nothing for
// another node's sandbox: noderpc.TestWorkloadOnlyForItsSandboxes.)
func TestFleetIdentity(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNode(t, control, 1)
	c := control.Client()
	ctx := ctxT(t, 2*time.Minute)
	a := createOnFleet(t, c)
	b := create(t, c)
	for _, sb := range []*chalkcompute.Sandbox{a, b} {
		if _, err := os.Stat(filepath.Join(n1.Dir, "sandboxes", sb.ID())); err != nil {
			t.Fatalf("sandbox %s is not on the node: %v", sb.ID(), err)
		}
	}
	tokA := fetchToken(t, a, "https://vault.example.test")
	tokB := fetchToken(t, b, "https://vault.example.test")
	if tokA == tokB {
		t.Fatal("two sandboxes got the same token")
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", control.Socket)
	}}}
	octx := oidc.ClientContext(ctx, hc)
	provider, err := oidc.NewProvider(octx, "http://127.0.0.1:7447")
	if err != nil {
		t.Fatalf("discovery: %v", err)
	}
	verifier := provider.Verifier(&oidc.Config{ClientID: "https://vault.example.test"})
	for _, tc := range []struct {
		sb  *chalkcompute.Sandbox
		tok string
	}{{a, tokA}, {b, tokB}} {
		idt, err := verifier.Verify(octx, tc.tok)
		if err != nil {
			t.Fatalf("go-oidc verify: %v", err)
		}
		var claims map[string]any
		if err := idt.Claims(&claims); err != nil {
			t.Fatal(err)
		}
		if idt.Subject != "chalk:org:default:sbx:"+tc.sb.ID() || claims["sandbox_id"] != tc.sb.ID() || claims["image_digest"] != tc.sb.Info.ImageDigest || claims["created_by"] == "" || claims["network_policy"] == "" {
			t.Fatalf("claims of %s: sub=%s %v", tc.sb.ID(), idt.Subject, claims)
		}
	}
	if _, err := provider.Verifier(&oidc.Config{ClientID: "other"}).Verify(octx, tokA); err == nil {
		t.Fatal("wrong audience accepted")
	}
	if out := mustExec(t, a, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, a.ID()) || !strings.Contains(out, "http://127.0.0.1:7447") {
		t.Errorf("identity on the node: %q", out)
	}
	// Without the header the node's metadata service refuses.
	if res, err := a.Exec(ctx, []string{"wget", "-q", "-O-", "http://169.254.169.254/v1/identity/token?audience=x"}); err != nil || res.Code == 0 {
		t.Fatalf("token without Metadata-Flavor: %v %+v", err, res)
	}
}
