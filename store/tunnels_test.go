package store

import (
	"context"
	"errors"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func TestTunnels(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		a, created, err := s.EnsureTunnel(ctx, "o1", "mesh", 3)
		if err != nil || !created || a.Index != 0 {
			t.Fatalf("first tunnel: %+v %v %v", a, created, err)
		}
		if again, created, err := s.EnsureTunnel(ctx, "o1", "mesh", 3); err != nil || created || again.Index != 0 {
			t.Fatalf("second ensure: %+v %v %v", again, created, err)
		}
		tb, _, _ := s.EnsureTunnel(ctx, "o2", "mesh", 3) // same name, other org: another tunnel
		c, _, _ := s.EnsureTunnel(ctx, "o1", "other", 3)
		if tb.Index != 1 || c.Index != 2 {
			t.Fatalf("indexes %d %d, want 1 2", tb.Index, c.Index)
		}
		if _, _, err := s.EnsureTunnel(ctx, "o1", "fourth", 3); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("past the last subnet: %v", err)
		}
		// A freed index is reused.
		if err := s.DeleteTunnel(ctx, "o2", "mesh"); err != nil {
			t.Fatal(err)
		}
		if d, _, err := s.EnsureTunnel(ctx, "o1", "fourth", 3); err != nil || d.Index != 1 {
			t.Fatalf("reuse: %+v %v", d, err)
		}
		a.Peers = []TunnelPeer{{PublicKey: "k", AllowedIPs: []string{"10.9.0.0/24"}, Endpoint: "h:1"}}
		if err := s.PutTunnel(ctx, a); err != nil {
			t.Fatal(err)
		}
		got, err := s.GetTunnel(ctx, "o1", "mesh")
		if err != nil || len(got.Peers) != 1 || got.Peers[0].AllowedIPs[0] != "10.9.0.0/24" {
			t.Fatalf("get: %+v %v", got, err)
		}
		if ls, err := s.ListTunnels(ctx, "o1"); err != nil || len(ls) != 3 || ls[0].Name != "fourth" {
			t.Fatalf("list: %v %v", ls, err)
		}
		if _, err := s.GetTunnel(ctx, "o2", "mesh"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("deleted: %v", err)
		}
		if err := s.PutTunnel(ctx, &Tunnel{OrgID: "o2", Name: "mesh"}); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("put missing: %v", err)
		}
	})
}

// TestTunnelsPerOrg: the tunnel subnets are shared by every org, so an org
// gets at most perOrg of them and another org still gets its own; an
// existing tunnel is still returned at the limit.
func TestTunnelsPerOrg(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		for _, n := range []string{"t1", "t2"} {
			if _, _, err := s.EnsureTunnelLimit(ctx, "greedy", n, 8, 2); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := s.EnsureTunnelLimit(ctx, "greedy", "t3", 8, 2); !errors.Is(err, errdefs.ErrResourceExhausted) {
			t.Fatalf("an org's third tunnel over a limit of 2: %v", err)
		}
		if tun, created, err := s.EnsureTunnelLimit(ctx, "greedy", "t1", 8, 2); err != nil || created || tun.Index != 0 {
			t.Fatalf("an existing tunnel at the limit: %+v %v %v", tun, created, err)
		}
		if tun, created, err := s.EnsureTunnelLimit(ctx, "other", "t1", 8, 2); err != nil || !created || tun.Index != 2 {
			t.Fatalf("another org's tunnel: %+v %v %v", tun, created, err)
		}
		if err := s.DeleteTunnel(ctx, "greedy", "t2"); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.EnsureTunnelLimit(ctx, "greedy", "t3", 8, 2); err != nil {
			t.Fatalf("after a deletion: %v", err)
		}
	})
}
