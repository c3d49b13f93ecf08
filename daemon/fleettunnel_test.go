package daemon

import (
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// TestFleetTunnelViews: what the control plane sends each node is exactly
// the members placed on the other nodes (never a node's own, never a
// member of another tunnel), and only nodes holding a member get a view;
// a new member's address is the lowest one no member (on any node) and
// no external peer has.
func TestFleetTunnelViews(t *testing.T) {
	base, err := newTunnels(nil, nil, nil, DefaultTunnelSubnets, "192.0.2.1")
	if err != nil {
		t.Fatal(err)
	}
	f := newFleetTunnels(base, nil, nil, nil)
	subnet := base.Subnet(0)
	mk := func(k, id, node, addr, ep string) {
		priv, _ := tunnel.NewPrivateKey()
		if f.members[k] == nil {
			f.members[k] = map[string]*fleetMember{}
		}
		f.members[k][id] = &fleetMember{node: node, m: tunnel.Member{Tunnel: k, SandboxID: id, Addr: netip.MustParseAddr(addr), PublicKey: priv.PublicKey(), Endpoint: ep}}
	}
	mk("o/mesh", "a", "n1", "100.96.0.1", "10.251.1.2:4000")
	mk("o/mesh", "m", "n1", "100.96.0.3", "10.251.1.2:4001")
	mk("o/mesh", "b", "n2", "100.96.0.2", "10.251.2.2:4000")
	mk("o/other", "c", "n3", "100.96.1.1", "10.251.3.2:4000")

	ids := func(rs []tunnel.Remote) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.SandboxID+"@"+r.Endpoint)
		}
		return out
	}
	v := f.views("o/mesh")
	if len(v) != 2 {
		t.Fatalf("views for %d nodes, want n1 and n2 only: %v", len(v), v)
	}
	if got := ids(v["n1"]); !slices.Equal(got, []string{"b@10.251.2.2:4000"}) {
		t.Errorf("n1's view: %v, want b only", got)
	}
	if got := ids(v["n2"]); !slices.Equal(got, []string{"a@10.251.1.2:4000", "m@10.251.1.2:4001"}) {
		t.Errorf("n2's view: %v, want a and m, by address", got)
	}
	if v["n1"][0].PublicKey != f.members["o/mesh"]["b"].m.PublicKey || v["n1"][0].Addr != netip.MustParseAddr("100.96.0.2") {
		t.Errorf("n1's view of b: %+v", v["n1"][0])
	}
	// A node whose only member left gets an empty view, not a stale one.
	delete(f.members["o/mesh"], "b")
	if v := f.views("o/mesh"); len(v) != 1 || len(v["n1"]) != 0 {
		t.Errorf("after b left: %v, want n1 with no remote", v)
	}

	peers := []store.TunnelPeer{{PublicKey: "k", AllowedIPs: []string{"100.96.0.2/32", "10.9.0.0/16"}}}
	if a, err := f.freeAddr("o/mesh", subnet, peers); err != nil || a != netip.MustParseAddr("100.96.0.4") {
		t.Errorf("free address: %v %v, want 100.96.0.4 (.1 and .3 members, .2 a peer's)", a, err)
	}
	if a, err := f.freeAddr("o/new", subnet, nil); err != nil || a != netip.MustParseAddr("100.96.0.1") {
		t.Errorf("free address in an empty tunnel: %v %v", a, err)
	}
	for i := 1; i < 255; i++ {
		mk("o/full", string(rune('a'+i%26))+string(rune('0'+i/26)), "n1", netip.AddrFrom4([4]byte{100, 96, 0, byte(i)}).String(), "10.251.1.2:1")
	}
	if _, err := f.freeAddr("o/full", subnet, nil); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("a full tunnel: %v, want ResourceExhausted", err)
	}
}
