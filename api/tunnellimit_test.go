package api

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"testing"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// fewTunnels is a TunnelBackend of max subnets and no members.
type fewTunnels struct{ max int }

func (f fewTunnels) MaxTunnels() int { return f.max }
func (f fewTunnels) Subnet(idx int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 96, byte(idx), 0}), 24)
}
func (fewTunnels) ValidatePeer(*store.Tunnel, store.TunnelPeer) error { return nil }
func (fewTunnels) SetPeers(context.Context, *store.Tunnel) error      { return nil }
func (fewTunnels) Members(*store.Tunnel) []*v1.TunnelMember           { return nil }
func (fewTunnels) PeerConfig(*store.Tunnel, store.TunnelPeer) string  { return "" }

// TestOrgMaxTunnels: tunnel subnets are shared by every org, so one org's
// member making tunnels (Apply, a create's tunnels) stops at
// OrgMaxTunnels, and another org still gets one. Without the limit org a
// took all 8 subnets and org b's tunnel was resource_exhausted.
func TestOrgMaxTunnels(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{Tunnels: fewTunnels{max: 8}, OrgMaxTunnels: 3})
	tunnels := func(user string) computev1connect.TunnelServiceClient {
		return computev1connect.NewTunnelServiceClient(http.DefaultClient, tn.url, connect.WithInterceptors(bearer(tn.keys[user])))
	}
	mia := tunnels("mia")
	for i := range 3 {
		if _, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: fmt.Sprintf("t%d", i)})); err != nil {
			t.Fatal(err)
		}
	}
	for i := 3; i < 8; i++ {
		_, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: fmt.Sprintf("t%d", i)}))
		wantCode(t, "org a's tunnel over the limit", err, connect.CodeResourceExhausted)
	}
	_, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", Tunnels: []string{"t9"}}))
	wantCode(t, "org a's create naming a new tunnel over the limit", err, connect.CodeResourceExhausted)
	if _, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "t1"})); err != nil {
		t.Fatalf("org a applies an existing tunnel at the limit: %v", err)
	}
	if _, err := tunnels("bob").Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "mesh"})); err != nil {
		t.Fatalf("org b's first tunnel: %v", err)
	}
}

// TestTunnelPeerBounds: a tunnel takes at most MaxTunnelPeers external
// peers (Apply and AddPeer) and a peer at most MaxPeerAllowedIPs networks
// (each is written to every member's device, the peers are checked
// pairwise, quadratic in their number).
func TestTunnelPeerBounds(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{Tunnels: fewTunnels{max: 8}})
	mia := computev1connect.NewTunnelServiceClient(http.DefaultClient, tn.url, connect.WithInterceptors(bearer(tn.keys["mia"])))
	peer := func(i int, ips int) *v1.TunnelPeer {
		p := &v1.TunnelPeer{PublicKey: fmt.Sprintf("key-%d", i)}
		for j := range ips {
			p.AllowedIps = append(p.AllowedIps, fmt.Sprintf("10.%d.%d.0/24", j/256, j%256))
		}
		return p
	}
	var peers []*v1.TunnelPeer
	for i := range MaxTunnelPeers + 1 {
		peers = append(peers, peer(i, 1))
	}
	_, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "mesh", Peers: peers}))
	wantCode(t, "Apply of one peer over the bound", err, connect.CodeResourceExhausted)
	if _, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "mesh", Peers: peers[:MaxTunnelPeers]})); err != nil {
		t.Fatalf("Apply of the bound: %v", err)
	}
	_, err = mia.AddPeer(ctx, connect.NewRequest(&v1.AddTunnelPeerRequest{Tunnel: "mesh", Peer: peers[MaxTunnelPeers]}))
	wantCode(t, "AddPeer past the bound", err, connect.CodeResourceExhausted)
	_, err = mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "other", Peers: []*v1.TunnelPeer{peer(0, MaxPeerAllowedIPs+1)}}))
	wantCode(t, "a peer with one allowed IP over the bound", err, connect.CodeInvalidArgument)
	if _, err := mia.Apply(ctx, connect.NewRequest(&v1.Tunnel{Name: "other", Peers: []*v1.TunnelPeer{peer(0, MaxPeerAllowedIPs)}})); err != nil {
		t.Fatalf("a peer with the bound's allowed IPs: %v", err)
	}
}
