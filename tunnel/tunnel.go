// Package tunnel gives sandboxes WireGuard interfaces joining them into named
// tunnels, and bridges tunnels to external WireGuard peers.
//
// Each (sandbox, tunnel) membership is one WireGuard device run by
// wireguard-go inside chalkd: its TUN interface is created inside the
// sandbox's network namespace (a thread of chalkd enters the namespace only
// to open it), its UDP socket is opened in the node's namespace, and its
// private key is generated here, handed to the device through its in-memory
// configuration interface (never a file, never an environment variable) and
// never leaves this process. The sandbox sees only the interface, with its
// address and a route for the tunnel's subnet; without CAP_NET_ADMIN it can
// neither read nor change the device. Tunnel traffic therefore never takes
// the sandbox's veth (and its egress rules): it leaves the namespace through
// the TUN (or its veth into the tunnel's router, between members on this
// node), and the node only as WireGuard UDP.
//
// Every peer's AllowedIPs is exactly its member address (/32), so the
// cryptokey routing of the receiving device drops packets whose source
// address is not the sending member's own: members cannot spoof one another.
// Peer lists are updated synchronously when a member joins or leaves.
//
// In a fleet, each node's Manager holds the members placed on it; the
// control plane tells it the members on other nodes (SetView), and each
// member here peers with those directly at their node's UDP endpoint, under
// the same AllowedIPs rule.
//
// Packets between members on this node do not take WireGuard at all: they
// stay in the kernel, through a router namespace per tunnel (router.go),
// or, where that cannot be made, go TUN to TUN inside this process
// (local.go, steer.go), under the same rule either way (the source must be
// the sender's own address). WireGuard carries the traffic to external
// peers and to members on other nodes.
package tunnel

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/crypto/curve25519"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// MTU of tunnel interfaces (WireGuard's default over a 1500-byte path).
const MTU = 1420

// Key is a Curve25519 key as WireGuard uses it.
type Key [32]byte

// String is the key in base64, as wg(8) and wg-quick write it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

func (k Key) hex() string { return hex.EncodeToString(k[:]) }

// ParseKey reads a base64 WireGuard key.
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("WireGuard key %q: want 32 bytes in base64: %w", s, errdefs.ErrInvalidArgument)
	}
	copy(k[:], b)
	return k, nil
}

// NewPrivateKey returns a fresh, clamped Curve25519 private key.
func NewPrivateKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return k, err
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// PublicKey derives the public key of a private key.
func (k Key) PublicKey() Key {
	var pub Key
	p, _ := curve25519.X25519(k[:], curve25519.Basepoint)
	copy(pub[:], p)
	return pub
}

// Peer is an external WireGuard peer of a tunnel.
type Peer struct {
	PublicKey  Key
	AllowedIPs []netip.Prefix
	Endpoint   string // host:port; empty for peers that connect in
}

// Member is a sandbox's place in a tunnel.
type Member struct {
	Tunnel    string // the tunnel's key (org-scoped name)
	SandboxID string
	Interface string // inside the sandbox
	Addr      netip.Addr
	PublicKey Key
	Port      int // the device's UDP port on the node
	// Endpoint is where a member on another node receives (its node's
	// host:port); "" for a member on this node.
	Endpoint string
}

// Remote is a member of a tunnel placed on another node (fleet mode): each
// member here peers with it directly at its node's endpoint, with
// AllowedIPs exactly its address, so WireGuard's cryptokey routing on
// either side admits only packets whose source is the sending member's own.
type Remote struct {
	SandboxID string
	Addr      netip.Addr
	PublicKey Key
	Endpoint  string // host:port of its device's UDP socket
}

// Manager runs the WireGuard devices of this node.
type Manager struct {
	log *slog.Logger

	kernel error // why the kernel's WireGuard is not used (ProbeKernel)
	stats  counters

	mu      sync.Mutex
	members map[string]map[string]*member // tunnel key -> sandbox id -> member
	subnets map[string]netip.Prefix       // tunnel key -> subnet
	peers   map[string][]Peer             // tunnel key -> external peers
	remotes map[string][]Remote           // tunnel key -> members on other nodes
	routers map[string]*router            // tunnel key -> its router here (router.go)

	// rmu guards routers for Stats, which must not wait for mu: a join
	// holds mu through its netlink work (seconds at worst), and /metrics
	// reads Stats. The map changes with both held; a router leaves it
	// (its counts folded into stats) before it is closed.
	rmu sync.Mutex
}

// kernelLocalPath: members on this node are joined through a router
// namespace (router.go); tests of the TUN-to-TUN path, which carries the
// packets where the router could not be made, turn it off.
var kernelLocalPath = true

type member struct {
	Member
	netnsPath string
	priv      Key
	dev       *device.Device
	tun       *localTUN
	bind      conn.Bind
	// peerCfg is each peer's configuration as last given to dev (UAPI
	// lines after its public_key), so a sync touches only what changed.
	peerCfg map[Key]string
}

// NewManager returns a Manager with no devices. It probes for the kernel's
// WireGuard (ProbeKernel) and logs which data path its devices take.
func NewManager(log *slog.Logger) *Manager {
	return newManager(log, ProbeKernel)
}

func newManager(log *slog.Logger, probe func() error) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{log: log, members: map[string]map[string]*member{}, subnets: map[string]netip.Prefix{}, peers: map[string][]Peer{}, remotes: map[string][]Remote{}, routers: map[string]*router{}}
	if err := probe(); err != nil {
		m.kernel = err
	} else {
		// Kernel devices are not driven yet: that path cannot be
		// tested on the machines this is built on (no module), and
		// members on one node are joined TUN to TUN (localTUN), which
		// a kernel device, read by nobody in userspace, could not be.
		m.kernel = errors.New("the kernel has WireGuard, but chalkd does not drive kernel devices yet")
	}
	log.Info("tunnel data path", "path", m.DataPath(), "kernel_wireguard", m.kernel.Error())
	return m
}

// DataPath names what carries the devices' traffic: "wireguard-go"
// (userspace, with the kernel's TUN offloads) — KernelWireGuard says why not
// the kernel's.
func (m *Manager) DataPath() string { return "wireguard-go" }

// KernelWireGuard is why the kernel's WireGuard is not used.
func (m *Manager) KernelWireGuard() error { return m.kernel }

// Stats are the Manager's packet counters since it started.
type Stats struct {
	// Local counts packets between members on this node (forwarded by a
	// tunnel's router, or carried TUN to TUN inside this process where the
	// router could not be made), and LocalBytes their IP bytes.
	Local, LocalBytes uint64
	// LocalGSO counts those of them larger than the MTU: TCP segments
	// forwarded whole, as the sender's kernel made them.
	LocalGSO uint64
	// Spoofed counts packets a member sent to another member with a
	// source address not its own, dropped (by the router's source check
	// or the TUN path's).
	Spoofed uint64
}

type counters struct{ local, localBytes, localGSO, spoofed atomic.Uint64 }

// Stats returns the packet counters: the TUN path's and the routers'
// (those of routers gone are kept).
func (m *Manager) Stats() Stats {
	m.rmu.Lock()
	defer m.rmu.Unlock()
	s := Stats{Local: m.stats.local.Load(), LocalBytes: m.stats.localBytes.Load(), LocalGSO: m.stats.localGSO.Load(), Spoofed: m.stats.spoofed.Load()}
	for key, r := range m.routers {
		rc, err := r.counts()
		if err != nil {
			m.log.Warn("tunnel router counters", "tunnel", key, "err", err)
			continue
		}
		s.Local += rc.packets
		s.LocalBytes += rc.bytes
		s.LocalGSO += rc.gso
		s.Spoofed += rc.spoofed
	}
	return s
}

// Join gives sandbox id (whose network namespace is at netnsPath) an
// interface ifname in tunnel key with subnet, at the lowest free address, and
// adds it to every other member's peers. Joining twice is an AlreadyExists.
func (m *Manager) Join(key, id, netnsPath, ifname string, subnet netip.Prefix) (Member, error) {
	return m.JoinAt(key, id, netnsPath, ifname, subnet, netip.Addr{})
}

// JoinAt is Join at address addr (chosen by the control plane of a fleet,
// which sees the members on every node); an invalid addr is the lowest
// free one. An address outside the subnet, its network or broadcast
// address, or one a member or peer has, is refused.
func (m *Manager) JoinAt(key, id, netnsPath, ifname string, subnet netip.Prefix, addr netip.Addr) (Member, error) {
	if !subnet.Addr().Is4() || subnet.Bits() > 30 || subnet != subnet.Masked() {
		return Member{}, fmt.Errorf("tunnel %s: subnet %s: want an IPv4 network of at least 4 addresses: %w", key, subnet, errdefs.ErrInvalidArgument)
	}
	priv, err := NewPrivateKey()
	if err != nil {
		return Member{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.subnets[key]; ok && old != subnet {
		return Member{}, fmt.Errorf("tunnel %s: subnet %s, but its members use %s: %w", key, subnet, old, errdefs.ErrFailedPrecondition)
	}
	if _, ok := m.members[key][id]; ok {
		return Member{}, fmt.Errorf("sandbox %s is already in tunnel %s: %w", id, key, errdefs.ErrAlreadyExists)
	}
	if !addr.IsValid() {
		if addr, err = m.freeAddr(key, subnet); err != nil {
			return Member{}, err
		}
	} else if err := m.usableAddr(key, subnet, addr); err != nil {
		return Member{}, err
	}
	mb := &member{Member: Member{Tunnel: key, SandboxID: id, Interface: ifname, Addr: addr, PublicKey: priv.PublicKey()}, netnsPath: netnsPath, priv: priv}
	if err := mb.up(netnsPath, subnet, m.routesLocked(key), &m.stats); err != nil {
		clear(mb.priv[:])
		return Member{}, fmt.Errorf("sandbox %s tunnel %s: %w", id, key, err)
	}
	if m.members[key] == nil {
		m.members[key] = map[string]*member{}
	}
	m.members[key][id] = mb
	m.subnets[key] = subnet
	if err := m.syncLocked(key); err != nil {
		m.removeLocked(key, id)
		return Member{}, err
	}
	m.attachLocked(key, id, mb)
	m.log.Debug("tunnel member up", "tunnel", key, "sandbox", id, "if", ifname, "addr", addr, "port", mb.Port)
	return mb.Member, nil
}

// Leave takes sandbox id out of every tunnel: its devices are closed (the
// interfaces vanish with them), its keys zeroed and the remaining members'
// peer lists updated.
func (m *Manager) Leave(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for key, ms := range m.members {
		if _, ok := ms[id]; ok {
			var routed netip.Addr // its address, if the others route it through the router
			if r := m.routers[key]; r != nil && r.ports[id] != nil {
				routed = r.ports[id].addr
			}
			m.removeLocked(key, id)
			if err := m.syncLocked(key); err != nil {
				m.log.Warn("tunnel peers after a member left", "tunnel", key, "err", err)
			}
			if r := m.routers[key]; r != nil && routed.IsValid() {
				for _, err := range r.left(routed, m.members[key]) {
					m.log.Warn("tunnel kernel path routes after a member left", "tunnel", key, "err", err)
				}
			}
		}
	}
}

func (m *Manager) removeLocked(key, id string) {
	mb := m.members[key][id]
	if mb == nil {
		return
	}
	if r := m.routers[key]; r != nil {
		r.remove(id)
		if len(r.ports) == 0 {
			m.dropRouterLocked(key, r)
		}
	}
	mb.dev.Close()
	mb.tun.closeQueue()
	clear(mb.priv[:])
	delete(m.members[key], id)
	if len(m.members[key]) == 0 {
		delete(m.members, key)
		delete(m.subnets, key)
		delete(m.remotes, key)
	}
}

// attachLocked gives member id of key a port on the tunnel's router (made
// if it is the first), its routes to every other local member with a port
// and theirs to it (linear in the members: router.joined).
// Should that fail, the member's packets to the others, and theirs to it,
// take the TUN-to-TUN path (local.go), which makes the same source check.
func (m *Manager) attachLocked(key, id string, mb *member) {
	if !kernelLocalPath {
		return
	}
	r := m.routers[key]
	if r == nil {
		var err error
		if r, err = newRouter(); err != nil {
			m.log.Warn("tunnel kernel path: members here take the TUN path", "tunnel", key, "err", err)
			return
		}
		m.rmu.Lock()
		m.routers[key] = r
		m.rmu.Unlock()
	}
	if err := r.add(id, mb); err != nil {
		m.log.Warn("tunnel kernel path: the member takes the TUN path", "tunnel", key, "sandbox", id, "err", err)
		if len(r.ports) == 0 {
			m.dropRouterLocked(key, r)
		}
		return
	}
	for _, err := range r.joined(id, m.members[key]) {
		m.log.Warn("tunnel kernel path routes", "tunnel", key, "err", err)
	}
}

// dropRouterLocked removes key's router r (no ports left) from the map,
// its counters folded into the Manager's (which only grow), and closes it.
func (m *Manager) dropRouterLocked(key string, r *router) {
	m.rmu.Lock()
	if rc, err := r.counts(); err == nil {
		m.stats.add(rc)
	}
	delete(m.routers, key)
	m.rmu.Unlock()
	r.close()
}

// SetPeers replaces the external peers of tunnel key on every member.
func (m *Manager) SetPeers(key string, peers []Peer) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(peers) == 0 {
		delete(m.peers, key)
	} else {
		m.peers[key] = slices.Clone(peers)
	}
	for _, mb := range m.members[key] {
		if err := mb.routes(m.routesLocked(key)); err != nil {
			return err
		}
	}
	return m.syncLocked(key)
}

// SetView replaces, for tunnel key (with subnet, which must be its local
// members'), the members placed on other nodes and the external peers:
// every member here peers with each of them (remote members at their
// endpoint, AllowedIPs their address). A remote with a local member's
// address or an endpoint that is not ip:port is refused, and the previous
// view is kept. A view equal to the current one changes nothing (the
// devices keep their sessions), and one for a tunnel with no member here is
// not kept.
func (m *Manager) SetView(key string, subnet netip.Prefix, remotes []Remote, peers []Peer) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	old, ok := m.subnets[key]
	if !ok {
		// No member here (it left meanwhile): nothing peers with them.
		delete(m.remotes, key)
		return nil
	}
	if old != subnet {
		return fmt.Errorf("tunnel %s: subnet %s, but its members here use %s: %w", key, subnet, old, errdefs.ErrFailedPrecondition)
	}
	seen := map[netip.Addr]bool{}
	for _, mb := range m.members[key] {
		seen[mb.Addr] = true
	}
	for _, r := range remotes {
		if !subnet.Contains(r.Addr) || r.Addr == subnet.Addr() || r.Addr == ipprefix.Last(subnet) {
			return fmt.Errorf("tunnel %s: remote member %s: address %s is not a host of %s: %w", key, r.SandboxID, r.Addr, subnet, errdefs.ErrInvalidArgument)
		}
		if seen[r.Addr] {
			return fmt.Errorf("tunnel %s: remote member %s: address %s is taken: %w", key, r.SandboxID, r.Addr, errdefs.ErrAlreadyExists)
		}
		seen[r.Addr] = true
		if _, err := netip.ParseAddrPort(r.Endpoint); err != nil {
			return fmt.Errorf("tunnel %s: remote member %s: endpoint %q: want ip:port: %w", key, r.SandboxID, r.Endpoint, errdefs.ErrInvalidArgument)
		}
	}
	samePeers := slices.EqualFunc(m.peers[key], peers, func(a, b Peer) bool {
		return a.PublicKey == b.PublicKey && a.Endpoint == b.Endpoint && slices.Equal(a.AllowedIPs, b.AllowedIPs)
	})
	if samePeers && slices.Equal(m.remotes[key], remotes) {
		return nil
	}
	if len(remotes) == 0 {
		delete(m.remotes, key)
	} else {
		m.remotes[key] = slices.Clone(remotes)
	}
	if !samePeers {
		if len(peers) == 0 {
			delete(m.peers, key)
		} else {
			m.peers[key] = slices.Clone(peers)
		}
		for _, mb := range m.members[key] {
			if err := mb.routes(m.routesLocked(key)); err != nil {
				return err
			}
		}
	}
	return m.syncLocked(key)
}

// All lists the members of tunnel key on this node and on others (those
// with an Endpoint), by address.
func (m *Manager) All(key string) []Member {
	out := m.Members(key)
	m.mu.Lock()
	for _, r := range m.remotes[key] {
		out = append(out, Member{Tunnel: key, SandboxID: r.SandboxID, Addr: r.Addr, PublicKey: r.PublicKey, Endpoint: r.Endpoint})
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Member) int { return a.Addr.Compare(b.Addr) })
	return out
}

// Subnet is the subnet of tunnel key, if a member is here.
func (m *Manager) Subnet(key string) (netip.Prefix, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.subnets[key]
	return p, ok
}

// Members lists the members of tunnel key on this node, by address.
func (m *Manager) Members(key string) []Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Member
	for _, mb := range m.members[key] {
		out = append(out, mb.Member)
	}
	slices.SortFunc(out, func(a, b Member) int { return a.Addr.Compare(b.Addr) })
	return out
}

// Of lists the memberships of sandbox id.
func (m *Manager) Of(id string) []Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Member
	for _, ms := range m.members {
		if mb, ok := ms[id]; ok {
			out = append(out, mb.Member)
		}
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Interface, b.Interface) })
	return out
}

// Devices is the number of WireGuard devices running.
func (m *Manager) Devices() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, ms := range m.members {
		n += len(ms)
	}
	return n
}

// Close closes every device.
func (m *Manager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for key, ms := range m.members {
		for id := range ms {
			m.removeLocked(key, id)
		}
	}
}

// usedLocked are the addresses of key's members (here and remote) and
// its peers' single addresses.
func (m *Manager) usedLocked(key string) map[netip.Addr]bool {
	used := map[netip.Addr]bool{}
	for _, mb := range m.members[key] {
		used[mb.Addr] = true
	}
	for _, r := range m.remotes[key] {
		used[r.Addr] = true
	}
	for _, p := range m.peers[key] {
		for _, pfx := range p.AllowedIPs {
			if pfx.IsSingleIP() {
				used[pfx.Addr()] = true
			}
		}
	}
	return used
}

// usableAddr says whether addr may be given to a new member of key.
func (m *Manager) usableAddr(key string, subnet netip.Prefix, addr netip.Addr) error {
	if !addr.Is4() || !subnet.Contains(addr) || addr == subnet.Addr() || addr == ipprefix.Last(subnet) {
		return fmt.Errorf("tunnel %s: address %s is not a host of %s: %w", key, addr, subnet, errdefs.ErrInvalidArgument)
	}
	if m.usedLocked(key)[addr] {
		return fmt.Errorf("tunnel %s: address %s is taken: %w", key, addr, errdefs.ErrAlreadyExists)
	}
	return nil
}

// freeAddr is the lowest host address of subnet no member of key has.
func (m *Manager) freeAddr(key string, subnet netip.Prefix) (netip.Addr, error) {
	used := m.usedLocked(key)
	last := ipprefix.Last(subnet)
	for a := subnet.Addr().Next(); a.IsValid() && a.Less(last); a = a.Next() {
		if !used[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("tunnel %s: no free address in %s: %w", key, subnet, errdefs.ErrResourceExhausted)
}

// routesLocked are the prefixes beyond the subnet that the tunnel's
// interfaces route: the external peers' AllowedIPs.
func (m *Manager) routesLocked(key string) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range m.peers[key] {
		out = append(out, p.AllowedIPs...)
	}
	return out
}

// syncLocked gives every member of key its peers: the other members (each
// exactly its /32, at its node endpoint) and the external peers. A peer
// whose configuration is unchanged is not touched (it keeps its session and
// its AllowedIPs stay in place); one no longer wanted is removed.
//
// No device initiates a handshake to a member (here or on another node)
// before it has a packet for it: no persistent keepalive toward members.
// WireGuard has no tie-break for two initiations that cross — each side
// takes the other's, answers, and refuses the answer to its own — so a
// keepalive sent by each end as the control plane gives both nodes their
// views at once stalled the pair until a retry after REKEY_TIMEOUT (5 s),
// which could cross again. Fleet endpoints are reachable node sockets
// (ip:port), so nothing needs a keepalive to hold a mapping open; while
// traffic flows WireGuard's passive keepalive keeps the session. External
// peers with an endpoint keep theirs (they may be behind NAT).
func (m *Manager) syncLocked(key string) error {
	var errs []error
	for id, mb := range m.members[key] {
		want := map[Key]string{}
		for oid, o := range m.members[key] {
			if oid != id {
				want[o.PublicKey] = fmt.Sprintf("endpoint=127.0.0.1:%d\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=%s/32\n", o.Port, o.Addr)
			}
		}
		for _, r := range m.remotes[key] {
			want[r.PublicKey] = fmt.Sprintf("endpoint=%s\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=%s/32\n", r.Endpoint, r.Addr)
		}
		for _, p := range m.peers[key] {
			var b strings.Builder
			if p.Endpoint != "" {
				fmt.Fprintf(&b, "endpoint=%s\npersistent_keepalive_interval=25\n", p.Endpoint)
			} else {
				b.WriteString("persistent_keepalive_interval=0\n")
			}
			b.WriteString("replace_allowed_ips=true\n")
			for _, a := range p.AllowedIPs {
				fmt.Fprintf(&b, "allowed_ip=%s\n", a)
			}
			want[p.PublicKey] = b.String()
		}
		var b strings.Builder
		if mb.peerCfg == nil {
			// A new device, or one whose last update failed midway.
			b.WriteString("replace_peers=true\n")
		}
		for k := range mb.peerCfg {
			if _, ok := want[k]; !ok {
				fmt.Fprintf(&b, "public_key=%s\nremove=true\n", k.hex())
			}
		}
		for k, cfg := range want {
			if have, ok := mb.peerCfg[k]; !ok || have != cfg {
				fmt.Fprintf(&b, "public_key=%s\n%s", k.hex(), cfg)
			}
		}
		if b.Len() > 0 {
			if err := mb.dev.IpcSet(b.String()); err != nil {
				errs = append(errs, fmt.Errorf("tunnel %s: peers of %s: %w", key, id, err))
				want = nil // unknown state: all of them again next time
			}
			mb.peerCfg = want
		}
		local := map[netip.Addr]*localTUN{}
		for oid, o := range m.members[key] {
			if oid != id {
				local[o.Addr] = o.tun
			}
		}
		if err := mb.tun.setLocal(local); err != nil {
			m.log.Warn("tunnel steering", "tunnel", key, "sandbox", id, "err", err)
		}
	}
	return errors.Join(errs...)
}

// up creates the member's device: TUN in the sandbox's namespace, address
// and routes there, UDP on the node.
func (mb *member) up(netnsPath string, subnet netip.Prefix, extra []netip.Prefix, stats *counters) (err error) {
	tdev, raw, err := createTUNIn(netnsPath, mb.Interface)
	if err != nil {
		return err
	}
	mb.tun = newLocalTUN(tdev, raw, mb.Addr, stats)
	mb.bind = conn.NewDefaultBind()
	mb.dev = device.NewDevice(mb.tun, mb.bind, device.NewLogger(device.LogLevelSilent, ""))
	defer func() {
		if err != nil {
			mb.dev.Close()
			mb.tun.closeQueue()
		}
	}()
	if err := mb.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", mb.priv.hex())); err != nil {
		return fmt.Errorf("configure device: %w", err)
	}
	if err := mb.dev.Up(); err != nil {
		return fmt.Errorf("device up: %w", err)
	}
	if mb.Port, err = listenPort(mb.dev); err != nil {
		return err
	}
	return mb.withLink(netnsPath, func(h *netlink.Handle, l netlink.Link) error {
		if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipprefix.IPNet(netip.PrefixFrom(mb.Addr, subnet.Bits()))}); err != nil {
			return fmt.Errorf("address %s on %s: %w", mb.Addr, mb.Interface, err)
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("%s up: %w", mb.Interface, err)
		}
		return mb.routesWith(h, l, extra)
	})
}

// routes sets the routes of the external peers' prefixes on the interface.
func (mb *member) routes(extra []netip.Prefix) error {
	return mb.withLink(mb.netnsPath, func(h *netlink.Handle, l netlink.Link) error { return mb.routesWith(h, l, extra) })
}

// withLink calls fn with a netlink handle in the sandbox's namespace at
// netnsPath and the member's interface there.
func (mb *member) withLink(netnsPath string, fn func(*netlink.Handle, netlink.Link) error) error {
	h, ns, err := handleAt(netnsPath)
	if err != nil {
		return err
	}
	defer ns.Close()
	defer h.Close()
	l, err := h.LinkByName(mb.Interface)
	if err != nil {
		return fmt.Errorf("tunnel interface %s: %w", mb.Interface, err)
	}
	return fn(h, l)
}

// routesWith makes the interface's routes to external peers' networks
// exactly extra (the subnet's own route, which the kernel made with the
// address, stays).
func (mb *member) routesWith(h *netlink.Handle, l netlink.Link, extra []netip.Prefix) error {
	want := map[netip.Prefix]bool{}
	for _, p := range extra {
		want[p] = true
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipprefix.IPNet(p)}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("route %s via %s: %w", p, mb.Interface, err)
		}
	}
	have, err := h.RouteList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("routes of %s: %w", mb.Interface, err)
	}
	for _, r := range have {
		if r.Dst == nil || r.Protocol == unix.RTPROT_KERNEL {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		a, _ := netip.AddrFromSlice(r.Dst.IP.To4())
		if p := netip.PrefixFrom(a, ones); !want[p] {
			if err := h.RouteDel(&r); err != nil {
				return fmt.Errorf("route %s via %s: %w", p, mb.Interface, err)
			}
		}
	}
	return nil
}

func listenPort(d *device.Device) (int, error) {
	s, err := d.IpcGet()
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "listen_port="); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, errors.New("device reports no listen port")
}

// createTUNIn creates a TUN interface called name inside the namespace at
// netnsPath: wireguard-go's device (virtio-net headers, TSO/USO) and the
// local forwarder's queue, if it can have one (createTUNQueues).
func createTUNIn(netnsPath, name string) (tun.Device, *os.File, error) {
	var (
		dev tun.Device
		raw *os.File
	)
	err := inNetns(netnsPath, func() (err error) {
		if dev, raw, err = createTUNQueues(name); err != nil {
			return fmt.Errorf("create TUN %s: %w", name, err)
		}
		return nil
	}, func() {
		dev.Close()
		if raw != nil {
			raw.Close()
		}
	})
	return dev, raw, err
}

// inNetns runs fn on one locked thread inside the namespace at netnsPath,
// which returns to the node's namespace before it is released. If it cannot
// return, undo (if fn succeeded) undoes fn's work, and the thread stays
// locked so the runtime discards it with its goroutine.
func inNetns(netnsPath string, fn func() error, undo func()) error {
	target, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return fmt.Errorf("sandbox netns %s: %w", netnsPath, err)
	}
	defer target.Close()
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			ch <- fmt.Errorf("enter sandbox netns: %w", err)
			return
		}
		err = fn()
		if serr := netns.Set(orig); serr != nil {
			if err == nil && undo != nil {
				undo()
			}
			ch <- fmt.Errorf("return to node netns: %w", serr)
			return
		}
		runtime.UnlockOSThread()
		ch <- err
	}()
	return <-ch
}

// handleAt is a netlink handle in the namespace at path.
func handleAt(path string) (*netlink.Handle, netns.NsHandle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, 0, fmt.Errorf("sandbox netns %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, 0, fmt.Errorf("netlink in %s: %w", path, err)
	}
	return h, ns, nil
}
