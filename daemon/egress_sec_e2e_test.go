package daemon_test

import (
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestEgressPrivateRangesEndToEnd (issue #14): through chalkd, a sandbox
// with no policy reaches the fake internet but not private or cloud-metadata
// addresses beyond the node, nor the node's own uplink address; a policy's
// CIDR entry inside a private range opens exactly that; an allowed name
// resolving into a private range opens nothing.
func TestEgressPrivateRangesEndToEnd(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	inet.Host("public.test", "198.51.100.10", "public")
	inet.Host("lan.test", "10.66.0.10", "lan")
	inet.Host("", "172.16.9.10", "lan2")
	inet.Host("", "100.100.100.200", "cloud-metadata")
	n := chalktest.StartWith(t, inet)
	n.Listen("203.0.113.2:9997") // the node's uplink address (chalktest's fake internet)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)

	check := func(t *testing.T, sb *chalkcompute.Sandbox, want map[string]string) {
		t.Helper()
		for url, body := range want {
			if got := fetch(t, sb, url); got != body {
				t.Errorf("%s: got %q, want %q", url, got, body)
			}
		}
	}
	t.Run("no policy", func(t *testing.T) {
		open := create(t, c)
		check(t, open, map[string]string{
			"http://public.test/":      "public",
			"http://198.51.100.10/":    "public",
			"http://10.66.0.10/":       "",
			"http://lan.test/":         "",
			"http://172.16.9.10/":      "",
			"http://100.100.100.200/":  "",
			"http://203.0.113.2:9997/": "",
		})
		res, err := open.Exec(ctx, []string{"sh", "-c", "timeout 3 nc 203.0.113.2 9997 </dev/null"})
		if err != nil {
			t.Fatal(err)
		}
		if res.Code == 0 || strings.Contains(string(res.Stdout), "node-service") {
			t.Errorf("the node's uplink address is reachable (exit %d, %q)", res.Code, res.Stdout)
		}
		if out := mustExec(t, open, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, open.ID()) {
			t.Errorf("metadata: %q", out)
		}
	})
	t.Run("a CIDR entry opens its range", func(t *testing.T) {
		sb := create(t, c, chalkcompute.WithNetworkPolicies(chalkcompute.NetworkPolicy{
			Name: "lan", AllowAll: chalkcompute.Bool(true), AllowedHostnames: []string{"10.66.0.0/16"},
		}))
		check(t, sb, map[string]string{
			"http://public.test/":     "public",
			"http://10.66.0.10/":      "lan",
			"http://lan.test/":        "lan",
			"http://172.16.9.10/":     "",
			"http://100.100.100.200/": "",
		})
	})
	t.Run("an allowed name does not open a private range", func(t *testing.T) {
		sb := create(t, c, chalkcompute.WithNetworkPolicies(chalkcompute.NetworkPolicy{
			Name: "names", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{"lan.test", "public.test", "0.0.0.0/0"},
		}))
		check(t, sb, map[string]string{
			"http://public.test/": "public",
			"http://lan.test/":    "",
			"http://10.66.0.10/":  "",
		})
	})
}
