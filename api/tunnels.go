package api

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// TunnelBackend runs the WireGuard side of tunnels on the node.
type TunnelBackend interface {
	// MaxTunnels is how many tunnel subnets there are.
	MaxTunnels() int
	// Subnet is the IPv4 subnet of the tunnel with index idx.
	Subnet(idx int) netip.Prefix
	// ValidatePeer checks an external peer against the tunnel (key format,
	// AllowedIPs that do not claim member addresses, endpoint syntax).
	ValidatePeer(t *store.Tunnel, p store.TunnelPeer) error
	// SetPeers pushes the tunnel's external peers to its running members.
	SetPeers(ctx context.Context, t *store.Tunnel) error
	// Members lists the tunnel's running members.
	Members(t *store.Tunnel) []*v1.TunnelMember
	// PeerConfig is the wg-quick file external peer p needs.
	PeerConfig(t *store.Tunnel, p store.TunnelPeer) string
}

// Bounds of a tunnel's external peers: every peer and allowed IP is
// written to every member's device (and its routes) at each change, and
// the peers are checked pairwise; without them one Apply could carry a
// million.
const (
	MaxTunnelPeers    = 256
	MaxPeerAllowedIPs = 64
)

// MaxTunnelsPerSandbox bounds a sandbox's tunnels (interfaces wg0…wg3).
const MaxTunnelsPerSandbox = 4

// dnsLabel is a name that is one DNS label: tunnel and MCP server names (they
// appear in hostnames and URLs).
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

func validTunnelName(name string) error {
	if !dnsLabel.MatchString(name) {
		return invalid("tunnel name %q: must be a DNS label (a-z, 0-9 and '-', at most 63 characters, no leading or trailing '-')", name)
	}
	return nil
}

type tunnelService struct{ s *Server }

var _ computev1connect.TunnelServiceHandler = (*tunnelService)(nil)

func (s *Server) tunnels() (TunnelBackend, error) {
	if s.cfg.Tunnels == nil {
		return nil, fmt.Errorf("WireGuard tunnels are %w: %w", errNoBackend, errdefs.ErrFailedPrecondition)
	}
	return s.cfg.Tunnels, nil
}

// tunnelsFor authenticates the caller (with who: user or admin) and returns the
// backend, for the service's handlers.
func (s *Server) tunnelsFor(ctx context.Context, who func(context.Context) (*Principal, error)) (*Principal, TunnelBackend, error) {
	u, err := who(ctx)
	if err != nil {
		return nil, nil, err
	}
	b, err := s.tunnels()
	if err != nil {
		return nil, nil, err
	}
	return u, b, nil
}

// ensureTunnels creates the named tunnels that do not exist yet (a tunnel is
// created on first use) and checks the names.
func (s *Server) ensureTunnels(ctx context.Context, orgID string, names []string) error {
	if len(names) == 0 {
		return nil
	}
	tb, err := s.tunnels()
	if err != nil {
		return fmt.Errorf("tunnels: %w", err)
	}
	if len(names) > MaxTunnelsPerSandbox {
		return invalid("tunnels: %d given, a sandbox may be in at most %d", len(names), MaxTunnelsPerSandbox)
	}
	for i, n := range names {
		if err := validTunnelName(n); err != nil {
			return err
		}
		if slices.Contains(names[:i], n) {
			return invalid("tunnels: %q given twice", n)
		}
	}
	for _, n := range names {
		if _, _, err := s.store.EnsureTunnelLimit(ctx, orgID, n, tb.MaxTunnels(), s.cfg.OrgMaxTunnels); err != nil {
			return err
		}
	}
	return nil
}

func (s *Server) tunnelToProto(tb TunnelBackend, t *store.Tunnel) *v1.Tunnel {
	out := &v1.Tunnel{Name: t.Name, Subnet: tb.Subnet(t.Index).String(), Members: tb.Members(t), CreatedAt: ts(t.CreatedAt)}
	for _, p := range t.Peers {
		out.Peers = append(out.Peers, &v1.TunnelPeer{PublicKey: p.PublicKey, AllowedIps: p.AllowedIPs, Endpoint: p.Endpoint, Config: tb.PeerConfig(t, p)})
	}
	return out
}

func peerFromProto(m *v1.TunnelPeer) store.TunnelPeer {
	if m == nil {
		return store.TunnelPeer{}
	}
	ips := make([]string, 0, len(m.AllowedIps))
	for _, a := range m.AllowedIps {
		ips = append(ips, strings.TrimSpace(a))
	}
	return store.TunnelPeer{PublicKey: strings.TrimSpace(m.PublicKey), AllowedIPs: ips, Endpoint: strings.TrimSpace(m.Endpoint)}
}

// setPeers validates peers, stores them on t and pushes them to the members.
func (s *Server) setPeers(ctx context.Context, tb TunnelBackend, t *store.Tunnel, peers []store.TunnelPeer) error {
	if len(peers) > MaxTunnelPeers {
		return fmt.Errorf("tunnel %s: %d external peers, at most %d (api.MaxTunnelPeers): %w", t.Name, len(peers), MaxTunnelPeers, errdefs.ErrResourceExhausted)
	}
	for i, p := range peers {
		if len(p.AllowedIPs) > MaxPeerAllowedIPs {
			return invalid("tunnel %s: peer %s has %d allowed IPs, at most %d (api.MaxPeerAllowedIPs)", t.Name, p.PublicKey, len(p.AllowedIPs), MaxPeerAllowedIPs)
		}
		if err := tb.ValidatePeer(t, p); err != nil {
			return err
		}
		for _, q := range peers[:i] {
			if q.PublicKey == p.PublicKey {
				return invalid("tunnel %s: peer %s given twice", t.Name, p.PublicKey)
			}
		}
	}
	t.Peers = peers
	if err := s.store.PutTunnel(ctx, t); err != nil {
		return err
	}
	return tb.SetPeers(ctx, t)
}

func (h *tunnelService) Apply(ctx context.Context, req *connect.Request[v1.Tunnel]) (*connect.Response[v1.Tunnel], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	name := strings.TrimSpace(req.Msg.Name)
	if err := validTunnelName(name); err != nil {
		return nil, err
	}
	peers := make([]store.TunnelPeer, 0, len(req.Msg.Peers))
	for _, m := range req.Msg.Peers {
		peers = append(peers, peerFromProto(m))
	}
	t, _, err := h.s.store.EnsureTunnelLimit(ctx, u.OrgID, name, tb.MaxTunnels(), h.s.cfg.OrgMaxTunnels)
	if err != nil {
		return nil, err
	}
	if err := h.s.setPeers(ctx, tb, t, peers); err != nil {
		return nil, err
	}
	return connect.NewResponse(h.s.tunnelToProto(tb, t)), nil
}

func (h *tunnelService) Get(ctx context.Context, req *connect.Request[v1.TunnelName]) (*connect.Response[v1.Tunnel], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	t, err := h.s.store.GetTunnel(ctx, u.OrgID, req.Msg.Name)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(h.s.tunnelToProto(tb, t)), nil
}

func (h *tunnelService) List(ctx context.Context, _ *connect.Request[v1.ListTunnelsRequest]) (*connect.Response[v1.ListTunnelsResponse], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	ts, err := h.s.store.ListTunnels(ctx, u.OrgID)
	if err != nil {
		return nil, err
	}
	out := &v1.ListTunnelsResponse{}
	for _, t := range ts {
		out.Tunnels = append(out.Tunnels, h.s.tunnelToProto(tb, t))
	}
	return connect.NewResponse(out), nil
}

func (h *tunnelService) Delete(ctx context.Context, req *connect.Request[v1.TunnelName]) (*connect.Response[v1.DeleteTunnelResponse], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	t, err := h.s.store.GetTunnel(ctx, u.OrgID, req.Msg.Name)
	if err != nil {
		return nil, err
	}
	if ms := tb.Members(t); len(ms) > 0 {
		return nil, fmt.Errorf("tunnel %q: %d running sandboxes are in it (first %s): %w", t.Name, len(ms), ms[0].SandboxId, errdefs.ErrFailedPrecondition)
	}
	if err := h.s.store.DeleteTunnel(ctx, u.OrgID, t.Name); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.DeleteTunnelResponse{}), nil
}

func (h *tunnelService) AddPeer(ctx context.Context, req *connect.Request[v1.AddTunnelPeerRequest]) (*connect.Response[v1.TunnelPeer], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	if err := validTunnelName(req.Msg.Tunnel); err != nil {
		return nil, err
	}
	t, _, err := h.s.store.EnsureTunnelLimit(ctx, u.OrgID, req.Msg.Tunnel, tb.MaxTunnels(), h.s.cfg.OrgMaxTunnels)
	if err != nil {
		return nil, err
	}
	p := peerFromProto(req.Msg.Peer)
	peers := slices.DeleteFunc(slices.Clone(t.Peers), func(q store.TunnelPeer) bool { return q.PublicKey == p.PublicKey })
	if err := h.s.setPeers(ctx, tb, t, append(peers, p)); err != nil {
		return nil, err
	}
	return connect.NewResponse(&v1.TunnelPeer{PublicKey: p.PublicKey, AllowedIps: p.AllowedIPs, Endpoint: p.Endpoint, Config: tb.PeerConfig(t, p)}), nil
}

func (h *tunnelService) RemovePeer(ctx context.Context, req *connect.Request[v1.RemoveTunnelPeerRequest]) (*connect.Response[v1.Tunnel], error) {
	u, tb, err := h.s.tunnelsFor(ctx, user)
	if err != nil {
		return nil, err
	}
	t, err := h.s.store.GetTunnel(ctx, u.OrgID, req.Msg.Tunnel)
	if err != nil {
		return nil, err
	}
	key := strings.TrimSpace(req.Msg.PublicKey)
	peers := slices.DeleteFunc(slices.Clone(t.Peers), func(q store.TunnelPeer) bool { return q.PublicKey == key })
	if len(peers) == len(t.Peers) {
		return nil, fmt.Errorf("tunnel %q has no peer %s: %w", t.Name, key, errdefs.ErrNotFound)
	}
	if err := h.s.setPeers(ctx, tb, t, peers); err != nil {
		return nil, err
	}
	return connect.NewResponse(h.s.tunnelToProto(tb, t)), nil
}
