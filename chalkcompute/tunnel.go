package chalkcompute

import (
	"context"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// TunnelPeer is an external WireGuard peer of a tunnel. Config (returned by
// the server) is the wg-quick file the peer's side needs.
type TunnelPeer struct {
	PublicKey  string   // base64
	AllowedIPs []string // the peer's own addresses, routed to it from the sandboxes
	Endpoint   string   // host:port; empty for peers that connect in
	Config     string
}

// TunnelMember is a running sandbox in a tunnel.
type TunnelMember struct {
	SandboxID, Address, PublicKey, Endpoint, Interface string
}

// Tunnel is a named WireGuard tunnel. Sandboxes created WithTunnels(name)
// join it (it is created on first use) and reach each other on their tunnel
// addresses, on any port.
type Tunnel struct {
	Name    string
	Subnet  string
	Peers   []TunnelPeer
	Members []TunnelMember
}

// WithTunnels puts the sandbox into the named tunnels (interfaces wg0, wg1, …
// in this order); a tunnel that does not exist yet is created.
func WithTunnels(names ...string) CreateOption {
	return func(o *createOptions) { o.req.Tunnels = append(o.req.Tunnels, names...) }
}

func (p TunnelPeer) proto() *v1.TunnelPeer {
	return &v1.TunnelPeer{PublicKey: p.PublicKey, AllowedIps: append([]string(nil), p.AllowedIPs...), Endpoint: p.Endpoint}
}

func peerFrom(m *v1.TunnelPeer) TunnelPeer {
	return TunnelPeer{PublicKey: m.PublicKey, AllowedIPs: m.AllowedIps, Endpoint: m.Endpoint, Config: m.Config}
}

func tunnelFrom(m *v1.Tunnel) Tunnel {
	t := Tunnel{Name: m.Name, Subnet: m.Subnet}
	for _, p := range m.Peers {
		t.Peers = append(t.Peers, peerFrom(p))
	}
	for _, mb := range m.Members {
		t.Members = append(t.Members, TunnelMember{SandboxID: mb.SandboxId, Address: mb.Address, PublicKey: mb.PublicKey, Endpoint: mb.Endpoint, Interface: mb.Interface})
	}
	return t
}

// ApplyTunnel creates the tunnel if needed and sets its external peers to
// exactly peers.
func (c *Client) ApplyTunnel(ctx context.Context, name string, peers ...TunnelPeer) (Tunnel, error) {
	req := &v1.Tunnel{Name: name}
	for _, p := range peers {
		req.Peers = append(req.Peers, p.proto())
	}
	resp, err := c.tunnels.Apply(ctx, connect.NewRequest(req))
	if err != nil {
		return Tunnel{}, err
	}
	return tunnelFrom(resp.Msg), nil
}

// Tunnel returns a tunnel with its members and peers.
func (c *Client) Tunnel(ctx context.Context, name string) (Tunnel, error) {
	resp, err := c.tunnels.Get(ctx, connect.NewRequest(&v1.TunnelName{Name: name}))
	if err != nil {
		return Tunnel{}, err
	}
	return tunnelFrom(resp.Msg), nil
}

// Tunnels lists the org's tunnels.
func (c *Client) Tunnels(ctx context.Context) ([]Tunnel, error) {
	resp, err := c.tunnels.List(ctx, connect.NewRequest(&v1.ListTunnelsRequest{}))
	if err != nil {
		return nil, err
	}
	var out []Tunnel
	for _, t := range resp.Msg.Tunnels {
		out = append(out, tunnelFrom(t))
	}
	return out, nil
}

// DeleteTunnel removes a tunnel no running sandbox is in.
func (c *Client) DeleteTunnel(ctx context.Context, name string) error {
	_, err := c.tunnels.Delete(ctx, connect.NewRequest(&v1.TunnelName{Name: name}))
	return err
}

// AddTunnelPeer bridges the tunnel (created if needed) to an external
// WireGuard peer and returns it with its wg-quick config.
func (c *Client) AddTunnelPeer(ctx context.Context, tunnel string, p TunnelPeer) (TunnelPeer, error) {
	resp, err := c.tunnels.AddPeer(ctx, connect.NewRequest(&v1.AddTunnelPeerRequest{Tunnel: tunnel, Peer: p.proto()}))
	if err != nil {
		return TunnelPeer{}, err
	}
	return peerFrom(resp.Msg), nil
}

// RemoveTunnelPeer cuts an external peer off.
func (c *Client) RemoveTunnelPeer(ctx context.Context, tunnel, publicKey string) error {
	_, err := c.tunnels.RemovePeer(ctx, connect.NewRequest(&v1.RemoveTunnelPeerRequest{Tunnel: tunnel, PublicKey: publicKey}))
	return err
}
