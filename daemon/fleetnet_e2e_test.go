package daemon_test

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
// private range, and a policy update reaches the node.
func TestFleetEgress(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	inet.Host("public.test", "198.51.100.10", "public")
	inet.Host("other.test", "198.51.100.11", "other")
	inet.Host("lan.test", "10.66.0.10", "lan")
	inet.Host("", "100.100.100.200", "cloud-metadata")
	control := chalktest.StartControl(t)
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
	var open *chalkcompute.Sandbox
	deadline := time.Now().Add(30 * time.Second)
	for {
		sb, err := c.Create(ctxT(t, time.Minute), chalkcompute.Base("busybox"))
		if err == nil {
			open = sb
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("create on the fleet: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // polling the control plane for the node's first heartbeat
	}
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
	})
}
