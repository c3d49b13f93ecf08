package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/chalkcompute/chalkcompute/api"
	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
	"github.com/chalkcompute/chalkcompute/metadata"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// DefaultTunnelSubnets is carved into one /24 per tunnel (CGNAT space, which
// sandboxes' own networks and the usual on-prem ranges do not use).
const DefaultTunnelSubnets = "100.96.0.0/12"

// DefaultOrgMaxTunnels is --org-max-tunnels' default: 64 of the default
// subnets' 4,096 tunnels per org.
const DefaultOrgMaxTunnels = 64

// orgMaxTunnels is api.Config.OrgMaxTunnels for Config.OrgMaxTunnels n.
func orgMaxTunnels(n int) int {
	switch {
	case n == 0:
		return DefaultOrgMaxTunnels
	case n < 0:
		return 0
	}
	return n
}

// The tunnels' packet counters, for /metrics.
var tunnelManagers = sync.Map{} // *tunnel.Manager -> struct{}: the live ones

func tunnelStat(f func(tunnel.Stats) uint64) func() float64 {
	return func() float64 {
		var n uint64
		tunnelManagers.Range(func(k, _ any) bool {
			n += f(k.(*tunnel.Manager).Stats())
			return true
		})
		return float64(n)
	}
}

func init() {
	prometheus.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "chalk_tunnel_local_packets_total",
			Help: "Packets between tunnel members on this node, forwarded by the tunnel's router namespace in the kernel (or, where it could not be made, TUN to TUN inside chalkd) instead of through WireGuard."},
			tunnelStat(func(s tunnel.Stats) uint64 { return s.Local })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "chalk_tunnel_local_segments_total",
			Help: "Of the local tunnel packets, TCP segments larger than the MTU forwarded whole (through the router, or the TUN's steered queue)."},
			tunnelStat(func(s tunnel.Stats) uint64 { return s.LocalGSO })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "chalk_tunnel_spoofed_packets_total",
			Help: "Packets a tunnel member sent to another member with a source address not its own, dropped (by the router's reverse-path filter or the TUN path's check)."},
			tunnelStat(func(s tunnel.Stats) uint64 { return s.Spoofed })))
}

// tunnels joins sandboxes to their tunnels (tunnel.Manager) and answers the
// API's questions about them.
type tunnels struct {
	m        *tunnel.Manager
	agent    *node.Agent
	st       *store.Store
	base     netip.Prefix // carved into /24s
	endpoint string       // the node's address as external peers reach it
}

var _ api.TunnelBackend = (*tunnels)(nil)

func newTunnels(m *tunnel.Manager, agent *node.Agent, st *store.Store, subnets, endpoint string) (*tunnels, error) {
	base, err := netip.ParsePrefix(subnets)
	if err != nil || !base.Addr().Is4() || base.Bits() > 24 || base != base.Masked() {
		return nil, fmt.Errorf("tunnel subnets %q: want an IPv4 network of /24 or larger: %w", subnets, errdefs.ErrInvalidArgument)
	}
	if endpoint == "" {
		endpoint = defaultEndpointHost()
	}
	return &tunnels{m: m, agent: agent, st: st, base: base, endpoint: endpoint}, nil
}

// defaultEndpointHost is the node's source address toward the outside (a
// UDP "connect" sends nothing), for the wg-quick files of external peers.
func defaultEndpointHost() string {
	c, err := net.Dial("udp4", "198.51.100.1:51820")
	if err != nil {
		return "NODE_ADDRESS"
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).IP.String()
}

func key(orgID, name string) string { return orgID + "/" + name }

func (b *tunnels) MaxTunnels() int { return 1 << (24 - b.base.Bits()) }

func (b *tunnels) Subnet(idx int) netip.Prefix {
	a := b.base.Addr().As4()
	v := (uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])) + uint32(idx)<<8
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 24)
}

func (b *tunnels) ValidatePeer(t *store.Tunnel, p store.TunnelPeer) error {
	return b.validatePeer(t, p, b.m.Members(key(t.OrgID, t.Name)))
}

// validatePeer checks external peer p of tunnel t against t's members.
func (b *tunnels) validatePeer(t *store.Tunnel, p store.TunnelPeer, members []tunnel.Member) error {
	if _, err := tunnel.ParseKey(p.PublicKey); err != nil {
		return fmt.Errorf("tunnel %s peer: %w", t.Name, err)
	}
	if len(p.AllowedIPs) == 0 {
		return fmt.Errorf("tunnel %s peer %s: allowed_ips is empty: %w", t.Name, p.PublicKey, errdefs.ErrInvalidArgument)
	}
	subnet := b.Subnet(t.Index)
	for _, s := range p.AllowedIPs {
		pfx, err := netip.ParsePrefix(s)
		if err != nil || pfx != pfx.Masked() {
			return fmt.Errorf("tunnel %s peer %s: allowed IP %q: want a network in CIDR form (e.g. 10.1.0.0/24 or 100.96.0.200/32): %w", t.Name, p.PublicKey, s, errdefs.ErrInvalidArgument)
		}
		if !pfx.Addr().Is4() {
			return fmt.Errorf("tunnel %s peer %s: allowed IP %s: tunnels are IPv4: %w", t.Name, p.PublicKey, s, errdefs.ErrInvalidArgument)
		}
		if pfx.Bits() < 8 || pfx.Overlaps(netip.MustParsePrefix("169.254.0.0/16")) || pfx.Overlaps(netip.MustParsePrefix("127.0.0.0/8")) {
			return fmt.Errorf("tunnel %s peer %s: allowed IP %s: default routes, loopback and link-local (metadata) ranges may not go through a tunnel: %w", t.Name, p.PublicKey, s, errdefs.ErrInvalidArgument)
		}
		if pfx.Overlaps(subnet) && (!pfx.IsSingleIP() || pfx.Addr() == subnet.Addr() || pfx.Addr() == ipprefix.Last(subnet)) {
			return fmt.Errorf("tunnel %s peer %s: allowed IP %s overlaps the tunnel's subnet %s: inside it a peer gets one address (/32): %w", t.Name, p.PublicKey, s, subnet, errdefs.ErrInvalidArgument)
		}
		for _, m := range members {
			if pfx.Contains(m.Addr) {
				return fmt.Errorf("tunnel %s peer %s: allowed IP %s is sandbox %s's address: %w", t.Name, p.PublicKey, s, m.SandboxID, errdefs.ErrInvalidArgument)
			}
		}
	}
	if p.Endpoint != "" {
		if _, port, err := net.SplitHostPort(p.Endpoint); err != nil || port == "" {
			return fmt.Errorf("tunnel %s peer %s: endpoint %q: want host:port: %w", t.Name, p.PublicKey, p.Endpoint, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

func toPeers(t *store.Tunnel) ([]tunnel.Peer, error) {
	var out []tunnel.Peer
	for _, p := range t.Peers {
		k, err := tunnel.ParseKey(p.PublicKey)
		if err != nil {
			return nil, err
		}
		tp := tunnel.Peer{PublicKey: k, Endpoint: p.Endpoint}
		for _, s := range p.AllowedIPs {
			pfx, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, err
			}
			tp.AllowedIPs = append(tp.AllowedIPs, pfx)
		}
		out = append(out, tp)
	}
	return out, nil
}

func (b *tunnels) SetPeers(_ context.Context, t *store.Tunnel) error {
	ps, err := toPeers(t)
	if err != nil {
		return err
	}
	return b.m.SetPeers(key(t.OrgID, t.Name), ps)
}

func (b *tunnels) Members(t *store.Tunnel) []*v1.TunnelMember {
	return b.membersToProto(b.m.Members(key(t.OrgID, t.Name)))
}

func (b *tunnels) membersToProto(ms []tunnel.Member) []*v1.TunnelMember {
	var out []*v1.TunnelMember
	for _, m := range ms {
		out = append(out, &v1.TunnelMember{SandboxId: m.SandboxID, Address: m.Addr.String(), PublicKey: m.PublicKey.String(),
			Endpoint: b.endpointOf(m), Interface: m.Interface})
	}
	return out
}

// endpointOf is where member m's device receives: its node's endpoint
// (fleet) or this node's.
func (b *tunnels) endpointOf(m tunnel.Member) string {
	if m.Endpoint != "" {
		return m.Endpoint
	}
	return net.JoinHostPort(b.endpoint, strconv.Itoa(m.Port))
}

func (b *tunnels) PeerConfig(t *store.Tunnel, p store.TunnelPeer) string {
	return b.peerConfig(t, p, b.m.Members(key(t.OrgID, t.Name)))
}

// peerConfig is the wg-quick file of external peer p of tunnel t, whose
// members are members.
func (b *tunnels) peerConfig(t *store.Tunnel, p store.TunnelPeer, members []tunnel.Member) string {
	var w strings.Builder
	fmt.Fprintf(&w, "# wg-quick config of external peer %s of chalkcompute tunnel %s (subnet %s).\n", p.PublicKey, t.Name, b.Subnet(t.Index))
	w.WriteString("# PrivateKey is this peer's own key: chalkd never sees it.\n[Interface]\nPrivateKey = <the private key of " + p.PublicKey + ">\n")
	subnet := b.Subnet(t.Index)
	for _, s := range p.AllowedIPs {
		if pfx, err := netip.ParsePrefix(s); err == nil && pfx.IsSingleIP() && subnet.Contains(pfx.Addr()) {
			fmt.Fprintf(&w, "Address = %s\n", pfx)
		}
	}
	if _, port, err := net.SplitHostPort(p.Endpoint); err == nil {
		fmt.Fprintf(&w, "ListenPort = %s\n", port)
	}
	for _, m := range members {
		fmt.Fprintf(&w, "\n# sandbox %s\n[Peer]\nPublicKey = %s\nAllowedIPs = %s/32\nEndpoint = %s\nPersistentKeepalive = 25\n",
			m.SandboxID, m.PublicKey, m.Addr, b.endpointOf(m))
	}
	return w.String()
}

// join puts a running sandbox into its tunnels (interfaces wg0, wg1, … in
// the order given at create).
func (b *tunnels) join(ctx context.Context, sb *store.Sandbox, netnsPath string) error {
	for i, name := range sb.Tunnels {
		t, err := b.st.GetTunnel(ctx, sb.OrgID, name)
		if err != nil {
			b.m.Leave(sb.ID)
			return fmt.Errorf("sandbox %s tunnel %s: %w", sb.ID, name, err)
		}
		k := key(sb.OrgID, name)
		if _, err := b.m.Join(k, sb.ID, netnsPath, "wg"+strconv.Itoa(i), b.Subnet(t.Index)); err != nil {
			b.m.Leave(sb.ID)
			return err
		}
		if len(t.Peers) > 0 {
			if err := b.SetPeers(ctx, t); err != nil {
				b.m.Leave(sb.ID)
				return err
			}
		}
	}
	return nil
}

// started is the Started hook.
func (b *tunnels) started(ctx context.Context, sb *store.Sandbox, st node.Started) error {
	if len(sb.Tunnels) == 0 || st.Net == nil {
		return nil
	}
	return b.join(ctx, sb, st.Net.NetnsPath)
}

// resume rejoins a sandbox found running at start: its devices were in the
// previous chalkd process and ended with it (new keys, peers updated).
func (b *tunnels) resume(ctx context.Context, sb *store.Sandbox) error {
	if len(sb.Tunnels) == 0 {
		return nil
	}
	n := b.agent.Net(sb.ID, sb.Slot)
	if n == nil {
		return fmt.Errorf("sandbox %s: no network to rejoin its tunnels in", sb.ID)
	}
	return b.join(ctx, sb, n.NetnsPath)
}

// metadataTunnels answers GET /v1/tunnels inside a sandbox: its tunnels,
// its address in each and every member's (on every node of a fleet). It
// reads only the Manager, so a fleet node serves it too.
func (b *tunnels) metadataTunnels(w http.ResponseWriter, r *http.Request) {
	caller, ok := metadata.CallerFrom(r.Context())
	if !ok {
		http.Error(w, "unknown caller", http.StatusForbidden)
		return
	}
	type member struct {
		SandboxID string `json:"sandbox_id"`
		Address   string `json:"address"`
		Name      string `json:"name"`
	}
	type entry struct {
		Tunnel    string   `json:"tunnel"`
		Interface string   `json:"interface"`
		Address   string   `json:"address"`
		Subnet    string   `json:"subnet"`
		Members   []member `json:"members"`
	}
	out := []entry{}
	for _, m := range b.m.Of(caller.ID) {
		_, name, _ := strings.Cut(m.Tunnel, "/")
		e := entry{Tunnel: name, Interface: m.Interface, Address: m.Addr.String(), Members: []member{}}
		if subnet, ok := b.m.Subnet(m.Tunnel); ok {
			e.Subnet = subnet.String()
		}
		// All: in a fleet, the members on other nodes too.
		for _, o := range b.m.All(m.Tunnel) {
			e.Members = append(e.Members, member{SandboxID: o.SandboxID, Address: o.Addr.String(), Name: o.SandboxID + "." + name + ".tunnel.internal"})
		}
		out = append(out, e)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"tunnels": out})
}

// tunnelZone is the DNS zone of tunnel members: <sandbox-id>.<tunnel>.tunnel.internal.
const tunnelZone = ".tunnel.internal."

// resolveName is the DNS proxy's Local hook: it answers names in
// tunnelZone, and only to members of that tunnel (NXDOMAIN to anyone else,
// so a sandbox learns nothing about tunnels it is not in). On a fleet node
// it knows the members on other nodes from the control plane (SetRemote).
func (b *tunnels) resolveName(sandboxID, qname string) ([]netip.Addr, bool) {
	q := strings.ToLower(dns.Fqdn(qname))
	rest, ok := strings.CutSuffix(q, tunnelZone)
	if !ok {
		return nil, q == tunnelZone[1:]
	}
	id, name, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(name, ".") {
		return nil, true
	}
	for _, m := range b.m.Of(sandboxID) {
		if _, tn, _ := strings.Cut(m.Tunnel, "/"); tn != name {
			continue
		}
		for _, o := range b.m.All(m.Tunnel) {
			if o.SandboxID == id {
				return []netip.Addr{o.Addr}, true
			}
		}
	}
	return nil, true
}
