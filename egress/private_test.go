//go:build linux

package egress

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestPrivateRanges is the attack of issue #14 in the fake internet: a
// sandbox, whatever its policy, does not reach the node's private networks
// or a cloud's metadata services unless a CIDR entry inside them opens
// them; an allowed name resolving there opens nothing.
func TestPrivateRanges(t *testing.T) {
	f := newFakeNet(t)
	f.dns.set(t, `
lan.test. 300 IN A 10.98.0.10
lan-cname.test. 300 IN CNAME lan.test.
public.test. 300 IN A 198.51.100.12
`)
	m := f.startManager(t, Config{UpstreamTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	open, learn, names, broad, opened := f.addSandbox(t), f.addSandbox(t), f.addSandbox(t), f.addSandbox(t), f.addSandbox(t)
	for _, x := range []struct {
		s *sandbox
		r *Rules
	}{
		{open, mustCompile(t)},
		{learn, LearnRules()},
		{names, mustCompile(t, Policy{Name: "names", AllowedHostnames: []string{"lan.test", "lan-cname.test", "public.test"}})},
		{broad, mustCompile(t, Policy{Name: "broad", AllowedHostnames: []string{"0.0.0.0/0", "::/0"}})},
		{opened, mustCompile(t, Policy{Name: "lan", AllowAll: true, AllowedHostnames: []string{"10.98.0.0/16", "100.100.100.200", "fd00:99::/64"}})},
	} {
		if err := m.Apply(ctx, x.s.sb, x.r); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Remove(ctx, x.s.sb.ID) })
	}
	private := []string{"10.98.0.10", "100.64.1.10", "169.254.7.10", "100.100.100.200", "168.63.129.16", "172.16.5.10", "192.168.5.10", "fd00:99::10"}
	public := []string{"198.51.100.19", "203.0.113.200", "2001:db8:3::10"}
	const deny = 400 * time.Millisecond
	check := func(t *testing.T, s *sandbox, addr string, allowed bool) {
		t.Helper()
		timeout := deny
		if allowed {
			timeout = 3 * time.Second
		}
		dst := net.JoinHostPort(addr, "80")
		got, err := s.dial("tcp", dst, timeout)
		if allowed && (err != nil || got == "") {
			t.Errorf("%s: %q, %v; want it to connect", dst, got, err)
		}
		if !allowed && !isTimeout(err) {
			t.Errorf("%s: %q, %v; want a timeout", dst, got, err)
		}
	}
	for _, sc := range []struct {
		name string
		s    *sandbox
		open map[string]bool // private addresses the policy opens
	}{
		{"learn mode", learn, nil},
		{"no policy", open, nil},
		{"0.0.0.0/0 and ::/0", broad, nil},
		{"allow-all opening 10.98.0.0/16, 100.100.100.200, fd00:99::/64", opened, map[string]bool{"10.98.0.10": true, "100.100.100.200": true, "fd00:99::10": true}},
	} {
		t.Run(sc.name, func(t *testing.T) {
			for _, a := range public {
				check(t, sc.s, a, true)
			}
			for _, a := range private {
				check(t, sc.s, a, sc.open[a])
			}
			check(t, sc.s, "169.254.169.254", true) // its metadata endpoint (DNATed)
		})
	}
	t.Run("allowed name resolving to a private address", func(t *testing.T) {
		for _, name := range []string{"lan.test.", "lan-cname.test."} {
			addrs := names.lookup(t, name, dns.TypeA)
			if len(addrs) != 1 || addrs[0] != blackhole4 {
				t.Errorf("%s resolves to %v, want the blackhole", name, addrs)
			}
		}
		check(t, names, "10.98.0.10", false)
		addrs := names.lookup(t, "public.test.", dns.TypeA)
		if len(addrs) != 1 || addrs[0].String() != "198.51.100.12" {
			t.Fatalf("public.test = %v", addrs)
		}
		check(t, names, "198.51.100.12", true)
	})
	t.Run("no policy: a private answer passes but does not connect", func(t *testing.T) {
		addrs := open.lookup(t, "lan.test.", dns.TypeA)
		if len(addrs) != 1 || addrs[0].String() != "10.98.0.10" {
			t.Fatalf("lan.test = %v", addrs)
		}
		check(t, open, "10.98.0.10", false)
	})
	t.Run("drops are logged for unrestricted sandboxes too", func(t *testing.T) {
		n, err := m.Dropped(ctx, open.sb.ID)
		if err != nil || n == 0 {
			t.Errorf("Dropped = %d, %v; want > 0", n, err)
		}
	})
	t.Run("policy change closes and opens", func(t *testing.T) {
		if err := m.Apply(ctx, open.sb, mustCompile(t, Policy{Name: "lan2", AllowAll: true, AllowedHostnames: []string{"172.16.5.0/24"}})); err != nil {
			t.Fatal(err)
		}
		check(t, open, "172.16.5.10", true)
		check(t, open, "192.168.5.10", false)
		if err := m.Apply(ctx, open.sb, mustCompile(t)); err != nil {
			t.Fatal(err)
		}
		check(t, open, "172.16.5.10", false)
	})
}
