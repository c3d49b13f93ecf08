package store

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// TestTunnelMembers: the fleet's tunnel membership on each database: an
// address is handed out once per tunnel (also to concurrent writers, as two
// replicas would be), a record is replaced and removed, lists are per
// tunnel or whole.
func TestTunnelMembers(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		a := &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "a", Slot: 1, Addr: "100.96.0.1"}
		if err := s.AddTunnelMember(ctx, a); err != nil {
			t.Fatal(err)
		}
		// Same address, same tunnel: refused; another tunnel or org: fine.
		if err := s.AddTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "b", Addr: "100.96.0.1"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("a second member at .1: %v, want already exists", err)
		}
		if err := s.AddTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "u", SandboxID: "b", Addr: "100.96.0.1"}); err != nil {
			t.Fatalf("the address in another tunnel: %v", err)
		}
		if err := s.AddTunnelMember(ctx, &TunnelMember{OrgID: "p", Tunnel: "t", SandboxID: "c", Addr: "100.96.0.1"}); err != nil {
			t.Fatalf("the address in another org's tunnel: %v", err)
		}
		// The sandbox twice: refused.
		if err := s.AddTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "a", Addr: "100.96.0.9"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("a twice: %v, want already exists", err)
		}
		// Concurrent writers of one address: exactly one wins.
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = s.AddTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "r" + string(rune('0'+i)), Addr: "100.96.0.2"})
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, errdefs.ErrAlreadyExists):
				t.Fatalf("a concurrent add: %v", err)
			}
		}
		if won != 1 {
			t.Fatalf("%d concurrent adds of one address won, want 1", won)
		}
		// Replace: its key and node; moving onto a taken address is refused
		// and changes nothing.
		a.Node, a.PublicKey, a.Endpoint, a.Port = "n1", "KEY", "10.0.0.1:51820", 51820
		if err := s.PutTunnelMember(ctx, a); err != nil {
			t.Fatal(err)
		}
		moved := *a
		moved.Addr = "100.96.0.2"
		if err := s.PutTunnelMember(ctx, &moved); !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("onto a taken address: %v, want already exists", err)
		}
		if err := s.PutTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "nobody", Addr: "100.96.0.7"}); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("replace a non-member: %v, want not found", err)
		}
		ms, err := s.ListTunnelMembers(ctx, "o", "t")
		if err != nil || len(ms) != 2 || *ms[0] != *a || ms[1].Addr != "100.96.0.2" {
			t.Fatalf("members of o/t: %+v %v", ms, err)
		}
		if all, err := s.ListTunnelMembers(ctx, "", ""); err != nil || len(all) != 4 {
			t.Fatalf("every member: %d %v, want 4", len(all), err)
		}
		if ok, err := s.DeleteTunnelMember(ctx, "o", "t", "a"); !ok || err != nil {
			t.Fatalf("delete a: %v %v", ok, err)
		}
		if ok, err := s.DeleteTunnelMember(ctx, "o", "t", "a"); ok || err != nil {
			t.Fatalf("delete a again: %v %v, want false", ok, err)
		}
		// Its address is free again.
		if err := s.AddTunnelMember(ctx, &TunnelMember{OrgID: "o", Tunnel: "t", SandboxID: "d", Addr: "100.96.0.1"}); err != nil {
			t.Fatalf("a freed address: %v", err)
		}
	})
}
