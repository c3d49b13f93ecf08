package daemon_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// fetch fetches url from inside the sandbox with a short timeout and returns
// the body, or "" if the connection failed (dropped traffic times out).
// (Debian's static busybox wget crashes with -T, hence timeout(1).)
func fetch(t *testing.T, sb *chalkcompute.Sandbox, url string) string {
	t.Helper()
	res, err := sb.Exec(ctxT(t, 30*time.Second), []string{"timeout", "3", "wget", "-q", "-O-", url})
	if err != nil {
		t.Fatalf("wget %s: %v", url, err)
	}
	if res.Code != 0 {
		return ""
	}
	return string(res.Stdout)
}

// TestNetworkPolicyEndToEnd: the seed's NetworkPolicy through the SDK against
// chalkd whose only uplink is a fake internet made of namespaces.
func TestNetworkPolicyEndToEnd(t *testing.T) {
	inet := chalktest.NewFakeInternet(t)
	inet.Host("api.allowed.test", "198.51.100.10", "allowed")
	inet.Host("www.wild.test", "198.51.100.11", "wild")
	inet.Host("evil.test", "198.51.100.66", "evil")
	inet.Host("", "203.0.113.80", "cidr")
	n := chalktest.StartWith(t, inet)
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)

	// No policy: unrestricted egress, DNS through the proxy.
	open := create(t, c)
	if got := fetch(t, open, "http://evil.test/"); got != "evil" {
		res, _ := open.Exec(ctx, []string{"sh", "-c", "cat /etc/resolv.conf; nslookup evil.test 2>&1; wget -T 2 -O- http://198.51.100.66/ 2>&1; ip route 2>&1"})
		t.Fatalf("unrestricted sandbox: %q\n%s%s", got, res.Stdout, res.Stderr)
	}

	policy := chalkcompute.NetworkPolicy{
		Name:             "ai-agent-production",
		AllowAll:         chalkcompute.Bool(false),
		AllowedHostnames: []string{"api.allowed.test", "*.wild.test", "203.0.113.80/32"},
		Description:      "test policy",
	}
	sb := create(t, c, chalkcompute.WithNetworkPolicies(policy))
	if len(sb.Info.NetworkPolicies) != 1 || sb.Info.NetworkPolicies[0] != policy.Name {
		t.Fatalf("policies on the sandbox: %v", sb.Info.NetworkPolicies)
	}
	for _, tc := range []struct{ url, want string }{
		{"http://api.allowed.test/", "allowed"},
		{"http://www.wild.test/", "wild"},
		{"http://203.0.113.80/", "cidr"},
		{"http://evil.test/", ""},     // name not allowed: resolves to a blackhole, times out
		{"http://198.51.100.66/", ""}, // direct IP not allowed
		{"http://wild.test/", ""},     // the wildcard does not cover the apex
	} {
		if got := fetch(t, sb, tc.url); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.url, got, tc.want)
		}
	}
	// The metadata service stays reachable under the policy.
	if out := mustExec(t, sb, "wget", "-q", "-O-", "--header", "Metadata-Flavor: chalk", "http://169.254.169.254/v1/identity"); !strings.Contains(out, sb.ID()) {
		t.Fatalf("metadata under policy: %q", out)
	}
	// The drop is visible to the operator.
	drops, err := sb.EgressLog(ctx)
	if err != nil {
		t.Fatal(err)
	}
	saw := false
	for _, d := range drops {
		saw = saw || strings.Contains(d.Dst, "198.51.100.66") || d.Name == "evil.test"
	}
	if !saw {
		t.Errorf("egress log does not show the blocked destination: %v", drops)
	}
	// CLI shows it too, as JSON.
	if out, stderr, code := n.CLI("compute", "sandbox", "egress-log", sb.ID(), "-o", "json"); code != 0 || !strings.Contains(out, "198.51.100.66") && !strings.Contains(out, "evil.test") {
		t.Errorf("cli egress-log: %d %q %q", code, out, stderr)
	}
	// A live update applies to the running sandbox.
	policy.AllowedHostnames = append(policy.AllowedHostnames, "evil.test")
	if _, err := c.UpdatePolicy(ctx, policy); err != nil {
		t.Fatal(err)
	}
	if got := fetch(t, sb, "http://evil.test/"); got != "evil" {
		t.Fatalf("after policy update: %q", got)
	}
	// Bad entries are refused, naming the entry.
	for _, bad := range []string{"api.*.test", "", "10.0.0.0/33"} {
		_, err := c.CreatePolicy(ctx, chalkcompute.NetworkPolicy{Name: "bad", AllowAll: chalkcompute.Bool(false), AllowedHostnames: []string{bad}})
		if !errors.Is(err, errdefs.ErrInvalidArgument) || (bad != "" && !strings.Contains(err.Error(), bad)) {
			t.Errorf("entry %q: %v", bad, err)
		}
	}
	// A policy in use cannot be deleted.
	if err := c.DeletePolicy(ctx, policy.Name); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete in-use policy: %v", err)
	}
}
