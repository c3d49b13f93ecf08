package noderpc

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// Tunnels runs the WireGuard devices of a node's tunnel members (the
// daemon's tunnel.Manager on the node). The control plane owns the
// membership and the addresses: it joins a sandbox placed here at an
// address it chose (TunnelJoin) and tells the node each tunnel's members
// on other nodes and its external peers (TunnelSync). Private keys are
// made here and never leave the node.
type Tunnels interface {
	// Join gives sandbox id (holding slot here) interface ifname in
	// tunnel key at addr, and returns the membership: its address (a
	// sandbox in the tunnel already keeps its own), public key and the
	// endpoint (ip:port) its device receives at.
	Join(ctx context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (tunnel.Member, error)
	// Leave takes sandbox id out of every tunnel here.
	Leave(id string)
	// Sync replaces tunnel key's members on other nodes and its external
	// peers, and returns its members here (Endpoint set).
	Sync(key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Member, error)
}

// WithTunnels makes the server run tunnel members with t; Teardown and
// Destroy take an ended sandbox out of its tunnels.
func (s *Server) WithTunnels(t Tunnels) *Server {
	s.tunnels = t
	return s
}

// Bounds of one TunnelSync: a tunnel's /24 has 254 addresses; its external
// peers and their networks are bounded by the API far below these.
const (
	maxTunnelRemotes    = 254
	maxTunnelPeers      = 256
	maxTunnelAllowedIPs = 64
)

var (
	tunnelIfname = regexp.MustCompile(`^wg[0-3]$`)
	tunnelKey    = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}/[a-z0-9-]{1,63}$`)
)

func tunnelSubnet(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is4() || p != p.Masked() || p.Bits() > 30 {
		return netip.Prefix{}, invalid("tunnel subnet %q: want an IPv4 network in CIDR form", s)
	}
	return p, nil
}

func (s *Server) TunnelJoin(ctx context.Context, req *connect.Request[nodev1.TunnelJoinRequest]) (*connect.Response[nodev1.TunnelJoinResponse], error) {
	m := req.Msg
	if s.tunnels == nil {
		return nil, fmt.Errorf("sandbox %q: this node runs no tunnels: %w", m.SandboxId, errdefs.ErrFailedPrecondition)
	}
	if m.SandboxId == "" || m.Slot <= 0 {
		return nil, invalid("tunnel join: sandbox_id and slot are required")
	}
	if !tunnelKey.MatchString(m.Tunnel) {
		return nil, invalid("tunnel join: tunnel %q: want org/name", m.Tunnel)
	}
	if !tunnelIfname.MatchString(m.Interface) {
		return nil, invalid("tunnel join: interface %q: want wg0..wg3", m.Interface)
	}
	subnet, err := tunnelSubnet(m.Subnet)
	if err != nil {
		return nil, err
	}
	addr, err := netip.ParseAddr(m.Address)
	if err != nil || !subnet.Contains(addr) {
		return nil, invalid("tunnel join: address %q: want an address of %s", m.Address, subnet)
	}
	mb, err := s.tunnels.Join(ctx, m.SandboxId, int(m.Slot), m.Tunnel, m.Interface, subnet, addr)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.TunnelJoinResponse{PublicKey: mb.PublicKey.String(), Endpoint: mb.Endpoint, Address: mb.Addr.String()}), nil
}

func (s *Server) TunnelLeave(_ context.Context, req *connect.Request[nodev1.TunnelLeaveRequest]) (*connect.Response[nodev1.TunnelLeaveResponse], error) {
	if s.tunnels != nil {
		s.tunnels.Leave(req.Msg.SandboxId)
	}
	return connect.NewResponse(&nodev1.TunnelLeaveResponse{}), nil
}

func (s *Server) TunnelSync(_ context.Context, req *connect.Request[nodev1.TunnelSyncRequest]) (*connect.Response[nodev1.TunnelSyncResponse], error) {
	m := req.Msg
	if s.tunnels == nil {
		return nil, fmt.Errorf("tunnel %q: this node runs no tunnels: %w", m.Tunnel, errdefs.ErrFailedPrecondition)
	}
	if !tunnelKey.MatchString(m.Tunnel) {
		return nil, invalid("tunnel sync: tunnel %q: want org/name", m.Tunnel)
	}
	subnet, err := tunnelSubnet(m.Subnet)
	if err != nil {
		return nil, err
	}
	if len(m.Remotes) > maxTunnelRemotes || len(m.Peers) > maxTunnelPeers {
		return nil, invalid("tunnel sync: %d remote members and %d peers (at most %d and %d)", len(m.Remotes), len(m.Peers), maxTunnelRemotes, maxTunnelPeers)
	}
	remotes, peers, err := tunnelViewFromProto(m)
	if err != nil {
		return nil, err
	}
	here, err := s.tunnels.Sync(m.Tunnel, subnet, remotes, peers)
	if err != nil {
		return nil, err
	}
	res := &nodev1.TunnelSyncResponse{}
	for _, mb := range here {
		res.Members = append(res.Members, &nodev1.TunnelRemote{SandboxId: mb.SandboxID, Address: mb.Addr.String(), PublicKey: mb.PublicKey.String(), Endpoint: mb.Endpoint})
	}
	return connect.NewResponse(res), nil
}

func tunnelViewFromProto(m *nodev1.TunnelSyncRequest) ([]tunnel.Remote, []tunnel.Peer, error) {
	var remotes []tunnel.Remote
	for _, r := range m.Remotes {
		k, err := tunnel.ParseKey(r.PublicKey)
		if err != nil {
			return nil, nil, fmt.Errorf("tunnel sync: remote member %q: %w", r.SandboxId, err)
		}
		a, err := netip.ParseAddr(r.Address)
		if err != nil {
			return nil, nil, invalid("tunnel sync: remote member %q: address %q", r.SandboxId, r.Address)
		}
		if _, err := netip.ParseAddrPort(r.Endpoint); err != nil {
			return nil, nil, invalid("tunnel sync: remote member %q: endpoint %q: want ip:port", r.SandboxId, r.Endpoint)
		}
		remotes = append(remotes, tunnel.Remote{SandboxID: r.SandboxId, Addr: a, PublicKey: k, Endpoint: r.Endpoint})
	}
	var peers []tunnel.Peer
	for _, p := range m.Peers {
		k, err := tunnel.ParseKey(p.PublicKey)
		if err != nil {
			return nil, nil, fmt.Errorf("tunnel sync: peer: %w", err)
		}
		if len(p.AllowedIps) > maxTunnelAllowedIPs {
			return nil, nil, invalid("tunnel sync: peer %s: %d allowed IPs (at most %d)", p.PublicKey, len(p.AllowedIps), maxTunnelAllowedIPs)
		}
		tp := tunnel.Peer{PublicKey: k, Endpoint: p.Endpoint}
		for _, s := range p.AllowedIps {
			pfx, err := netip.ParsePrefix(s)
			if err != nil || !pfx.Addr().Is4() || pfx.Bits() < 8 {
				return nil, nil, invalid("tunnel sync: peer %s: allowed IP %q", p.PublicKey, s)
			}
			tp.AllowedIPs = append(tp.AllowedIPs, pfx)
		}
		peers = append(peers, tp)
	}
	return remotes, peers, nil
}

// TunnelJoin joins sandbox id to tunnel key on its node (see Tunnels.Join).
func (c *Client) TunnelJoin(ctx context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (tunnel.Member, error) {
	res, err := c.rpc.TunnelJoin(ctx, connect.NewRequest(&nodev1.TunnelJoinRequest{SandboxId: id, Slot: int32(slot), Tunnel: key,
		Interface: ifname, Subnet: subnet.String(), Address: addr.String()}))
	if err != nil {
		return tunnel.Member{}, wire(err)
	}
	k, err := tunnel.ParseKey(res.Msg.PublicKey)
	if err != nil {
		return tunnel.Member{}, fmt.Errorf("node's answer: %w", err)
	}
	if _, err := netip.ParseAddrPort(res.Msg.Endpoint); err != nil {
		return tunnel.Member{}, fmt.Errorf("node's answer: endpoint %q: want ip:port: %w", res.Msg.Endpoint, errdefs.ErrInvalidArgument)
	}
	got, err := netip.ParseAddr(res.Msg.Address)
	if err != nil || !subnet.Contains(got) {
		return tunnel.Member{}, fmt.Errorf("node's answer: address %q is not in %s: %w", res.Msg.Address, subnet, errdefs.ErrInvalidArgument)
	}
	return tunnel.Member{Tunnel: key, SandboxID: id, Interface: ifname, Addr: got, PublicKey: k, Endpoint: res.Msg.Endpoint}, nil
}

// TunnelLeave takes sandbox id out of its tunnels on the node.
func (c *Client) TunnelLeave(ctx context.Context, id string) error {
	_, err := c.rpc.TunnelLeave(ctx, connect.NewRequest(&nodev1.TunnelLeaveRequest{SandboxId: id}))
	return wire(err)
}

// TunnelSync sets tunnel key's view on the node and returns the members it
// runs (see Tunnels.Sync).
func (c *Client) TunnelSync(ctx context.Context, key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Remote, error) {
	m := &nodev1.TunnelSyncRequest{Tunnel: key, Subnet: subnet.String()}
	for _, r := range remotes {
		m.Remotes = append(m.Remotes, &nodev1.TunnelRemote{SandboxId: r.SandboxID, Address: r.Addr.String(), PublicKey: r.PublicKey.String(), Endpoint: r.Endpoint})
	}
	for _, p := range peers {
		tp := &nodev1.TunnelExternalPeer{PublicKey: p.PublicKey.String(), Endpoint: p.Endpoint}
		for _, a := range p.AllowedIPs {
			tp.AllowedIps = append(tp.AllowedIps, a.String())
		}
		m.Peers = append(m.Peers, tp)
	}
	res, err := c.rpc.TunnelSync(ctx, connect.NewRequest(m))
	if err != nil {
		return nil, wire(err)
	}
	here, _, err := tunnelViewFromProto(&nodev1.TunnelSyncRequest{Remotes: res.Msg.Members})
	if err != nil {
		return nil, fmt.Errorf("node's answer: %w", err)
	}
	return here, nil
}

// tunnelNode is a node that runs tunnel members (a *Client).
type tunnelNode interface {
	TunnelJoin(ctx context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (tunnel.Member, error)
	TunnelLeave(ctx context.Context, id string) error
	TunnelSync(ctx context.Context, key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Remote, error)
}

func (r *Router) tunnelNodeOf(id string) (tunnelNode, string, error) {
	m, err := r.on(id)
	if err != nil {
		return nil, "", err
	}
	tn, ok := m.client.(tunnelNode)
	if !ok {
		return nil, "", fmt.Errorf("sandbox %q: node %s runs no tunnels: %w", id, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	return tn, m.rec.ID, nil
}

// TunnelJoin joins sandbox id to tunnel key on the node it is placed on,
// and returns that node's id with the membership.
func (r *Router) TunnelJoin(ctx context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (string, tunnel.Member, error) {
	tn, nodeID, err := r.tunnelNodeOf(id)
	if err != nil {
		return "", tunnel.Member{}, err
	}
	mb, err := tn.TunnelJoin(ctx, id, slot, key, ifname, subnet, addr)
	return nodeID, mb, err
}

// TunnelLeave takes sandbox id out of its tunnels on its node.
func (r *Router) TunnelLeave(ctx context.Context, id string) error {
	tn, _, err := r.tunnelNodeOf(id)
	if err != nil {
		return err
	}
	return tn.TunnelLeave(ctx, id)
}

// TunnelSync sets tunnel key's view on node nodeID and returns the members
// the node runs.
func (r *Router) TunnelSync(ctx context.Context, nodeID, key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Remote, error) {
	r.mu.Lock()
	m := r.members[nodeID]
	r.mu.Unlock()
	if m == nil || !m.healthy {
		return nil, fmt.Errorf("node %s: %w", nodeID, errdefs.ErrUnavailable)
	}
	tn, ok := m.client.(tunnelNode)
	if !ok {
		return nil, fmt.Errorf("node %s runs no tunnels: %w", nodeID, errdefs.ErrFailedPrecondition)
	}
	return tn.TunnelSync(ctx, key, subnet, remotes, peers)
}
