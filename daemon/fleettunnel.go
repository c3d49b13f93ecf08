package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
	"github.com/chalkcompute/chalkcompute/internal/periodic"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
	"github.com/chalkcompute/chalkcompute/tunnel"
)

// Tunnels in fleet mode. The control plane owns each tunnel's membership
// and addresses (fleetTunnels, kept in the store); every node runs the WireGuard devices of
// the members placed on it (its own tunnel.Manager, nodeTunnels), with
// keys made on the node. Members on different nodes peer directly: each
// member's device has every member on another node as a peer with
// AllowedIPs exactly that member's /32, at that node's endpoint (ip:port
// of the device's UDP socket), so WireGuard carries the traffic between
// nodes and its cryptokey routing drops a packet whose source is not the
// sending member's own. On every join and leave (and change of the
// external peers) the control plane sends every node holding a member
// its view (noderpc TunnelSync: the members on other nodes and the
// external peers) before the API call returns.

// The membership is kept in the store (table tunnel_members), so every
// control-plane replica sees the same: a join or leave through any replica
// writes it and then pushes the affected nodes their views, computed from
// the store as it is then. An address is reserved by inserting its row (the
// store refuses an address that is taken in that tunnel: two replicas never
// hand out the same one) before the node makes the device. The repair runs
// on the leader only (with one control plane: there), and it is what makes
// concurrent changes through different replicas converge: a node sent a
// view that missed the other replica's change gets the full one within
// RepairInterval.

// fleetMember is a tunnel member as the control plane knows it.
type fleetMember struct {
	node string
	slot int           // its slot on its node (a rejoin names it)
	m    tunnel.Member // Endpoint: its node's ip:port
}

// joined reports whether the member's device exists (a row without a key
// is an address reserved by a join in flight).
func (fm *fleetMember) joined() bool { return fm.m.PublicKey != (tunnel.Key{}) }

// memberOf is the member a store row records.
func memberOf(r *store.TunnelMember) (*fleetMember, error) {
	addr, err := netip.ParseAddr(r.Addr)
	if err != nil {
		return nil, fmt.Errorf("tunnel %s member %s: address %q: %w", r.Tunnel, r.SandboxID, r.Addr, err)
	}
	var pk tunnel.Key
	if r.PublicKey != "" {
		if pk, err = tunnel.ParseKey(r.PublicKey); err != nil {
			return nil, fmt.Errorf("tunnel %s member %s: public key: %w", r.Tunnel, r.SandboxID, err)
		}
	}
	return &fleetMember{node: r.Node, slot: r.Slot, m: tunnel.Member{
		Tunnel: key(r.OrgID, r.Tunnel), SandboxID: r.SandboxID, Interface: r.Interface,
		Addr: addr, PublicKey: pk, Port: r.Port, Endpoint: r.Endpoint,
	}}, nil
}

// rowOf is fm's store row (fm a member of org's tunnel name).
func rowOf(org, name, id string, fm *fleetMember) *store.TunnelMember {
	r := &store.TunnelMember{OrgID: org, Tunnel: name, SandboxID: id, Node: fm.node, Slot: fm.slot,
		Addr: fm.m.Addr.String(), Interface: fm.m.Interface, Port: fm.m.Port, Endpoint: fm.m.Endpoint}
	if fm.joined() {
		r.PublicKey = fm.m.PublicKey.String()
	}
	return r
}

// tunnelRouter reaches the nodes' tunnel devices (a *noderpc.Router).
type tunnelRouter interface {
	TunnelJoin(ctx context.Context, id string, slot int, key, ifname string, subnet netip.Prefix, addr netip.Addr) (string, tunnel.Member, error)
	TunnelLeave(ctx context.Context, id string) error
	TunnelSync(ctx context.Context, nodeID, key string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Remote, error)
}

var _ tunnelRouter = (*noderpc.Router)(nil)

// fleetTunnels is the control plane's api.TunnelBackend.
type fleetTunnels struct {
	*tunnels // MaxTunnels, Subnet, peer validation and configs
	router   tunnelRouter
	st       *store.Store
	log      *slog.Logger
	// leading reports whether this replica holds the leader lease (nil:
	// no replicas, it leads): only the leader repairs.
	leading func() bool

	// mu serialises this process's membership changes and the pushes that
	// follow (replicas serialise through the store and the repair).
	mu sync.Mutex
	// members are the store's rows as this process last read them, by
	// tunnel key and sandbox id (load reads a tunnel's again).
	members map[string]map[string]*fleetMember
	// pending are running sandboxes found at this control plane's start
	// whose node did not answer their rejoin yet (the repair retries).
	pending map[string]*store.Sandbox
}

func newFleetTunnels(base *tunnels, router tunnelRouter, st *store.Store, log *slog.Logger) *fleetTunnels {
	return &fleetTunnels{tunnels: base, router: router, st: st, log: log, members: map[string]map[string]*fleetMember{}, pending: map[string]*store.Sandbox{}}
}

// load reads org's tunnel name's members from the store (mu held).
func (f *fleetTunnels) load(ctx context.Context, org, name string) error {
	rows, err := f.st.ListTunnelMembers(ctx, org, name)
	if err != nil {
		return fmt.Errorf("tunnel %s: its members: %w", name, err)
	}
	ms := map[string]*fleetMember{}
	for _, r := range rows {
		fm, err := memberOf(r)
		if err != nil {
			f.log.Warn("fleet: a tunnel member's record cannot be read (skipped)", "err", err)
			continue
		}
		ms[r.SandboxID] = fm
	}
	if k := key(org, name); len(ms) == 0 {
		delete(f.members, k)
	} else {
		f.members[k] = ms
	}
	return nil
}

// list is tunnel key's joined members by address (mu held).
func (f *fleetTunnels) list(k string) []tunnel.Member {
	var out []tunnel.Member
	for _, fm := range f.members[k] {
		if fm.joined() {
			out = append(out, fm.m)
		}
	}
	slices.SortFunc(out, func(a, b tunnel.Member) int { return a.Addr.Compare(b.Addr) })
	return out
}

func (f *fleetTunnels) snapshot(t *store.Tunnel) []tunnel.Member {
	f.mu.Lock()
	defer f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.load(ctx, t.OrgID, t.Name); err != nil {
		f.log.Warn("fleet: tunnel members (as last read)", "tunnel", t.Name, "err", err)
	}
	return f.list(key(t.OrgID, t.Name))
}

func (f *fleetTunnels) ValidatePeer(t *store.Tunnel, p store.TunnelPeer) error {
	return f.validatePeer(t, p, f.snapshot(t))
}

func (f *fleetTunnels) Members(t *store.Tunnel) []*v1.TunnelMember {
	return f.membersToProto(f.snapshot(t))
}

func (f *fleetTunnels) PeerConfig(t *store.Tunnel, p store.TunnelPeer) string {
	return f.peerConfig(t, p, f.snapshot(t))
}

func (f *fleetTunnels) SetPeers(ctx context.Context, t *store.Tunnel) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err := f.push(ctx, t)
	return err
}

// freeAddr is the lowest host address of subnet that no member of k
// (reserved addresses too) and no external peer (its single addresses)
// has (mu held).
func (f *fleetTunnels) freeAddr(k string, subnet netip.Prefix, peers []store.TunnelPeer) (netip.Addr, error) {
	used := map[netip.Addr]bool{}
	for _, fm := range f.members[k] {
		used[fm.m.Addr] = true
	}
	for _, p := range peers {
		for _, s := range p.AllowedIPs {
			if pfx, err := netip.ParsePrefix(s); err == nil && pfx.IsSingleIP() {
				used[pfx.Addr()] = true
			}
		}
	}
	last := ipprefix.Last(subnet)
	for a := subnet.Addr().Next(); a.IsValid() && a.Less(last); a = a.Next() {
		if !used[a] {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("tunnel %s: no free address in %s: %w", k, subnet, errdefs.ErrResourceExhausted)
}

// views are what push sends each node holding a joined member of tunnel
// k: the joined members on the other nodes (mu held).
func (f *fleetTunnels) views(k string) map[string][]tunnel.Remote {
	out := map[string][]tunnel.Remote{}
	for _, fm := range f.members[k] {
		if _, ok := out[fm.node]; !ok && fm.joined() {
			out[fm.node] = []tunnel.Remote{}
		}
	}
	for n := range out {
		for _, fm := range f.members[k] {
			if fm.node != n && fm.joined() {
				out[n] = append(out[n], tunnel.Remote{SandboxID: fm.m.SandboxID, Addr: fm.m.Addr, PublicKey: fm.m.PublicKey, Endpoint: fm.m.Endpoint})
			}
		}
		slices.SortFunc(out[n], func(a, b tunnel.Remote) int { return a.Addr.Compare(b.Addr) })
	}
	return out
}

// push reads tunnel t's members from the store and sends its view to
// every node holding one of them (mu held); it returns, by node, the
// members each runs. A node that cannot be reached is reported (and absent
// from the map); the others are configured.
func (f *fleetTunnels) push(ctx context.Context, t *store.Tunnel) (map[string][]tunnel.Remote, error) {
	peers, err := toPeers(t)
	if err != nil {
		return nil, err
	}
	if err := f.load(ctx, t.OrgID, t.Name); err != nil {
		return nil, err
	}
	k := key(t.OrgID, t.Name)
	subnet := f.Subnet(t.Index)
	runs := map[string][]tunnel.Remote{}
	var errs []error
	for n, remotes := range f.views(k) {
		here, err := f.router.TunnelSync(ctx, n, k, subnet, remotes, peers)
		if err != nil {
			errs = append(errs, fmt.Errorf("tunnel %s on node %s: %w", t.Name, n, err))
			continue
		}
		runs[n] = here
	}
	return runs, errors.Join(errs...)
}

// RepairInterval is how often the control plane (the leader, with
// replicas) checks that every node runs the tunnel members placed on it,
// with the view it was sent.
const RepairInterval = 2 * time.Second

// run repairs the tunnels every RepairInterval while this replica leads,
// until ctx ends.
func (f *fleetTunnels) run(ctx context.Context) {
	periodic.WhileLeading(ctx, RepairInterval, f.leading, func() { f.repair(ctx) })
}

// repair sends every tunnel's view again (a node that missed a push gets
// it; an unchanged view changes nothing there) and joins again, at their
// addresses, the members a node no longer runs: a node process that
// restarted lost its devices (they lived in it), while its sandboxes run
// on. Their new keys and endpoints then go to the other nodes. Rows of
// sandboxes that ended (their leave did not reach the store: a replica
// stopped in between) are removed.
func (f *fleetTunnels) repair(ctx context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, sb := range f.pending {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := f.join(cctx, sb); err == nil {
			delete(f.pending, id)
			f.log.Info("fleet: tunnel members rejoined", "sandbox", id)
		}
		cancel()
	}
	rows, err := f.st.ListTunnelMembers(ctx, "", "")
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn("fleet: tunnel repair", "err", err)
		}
		return
	}
	type named struct{ org, name string }
	var todo []named
	seen := map[string]bool{}
	for _, r := range rows {
		if f.gone(ctx, r.SandboxID) {
			if _, err := f.st.DeleteTunnelMember(ctx, r.OrgID, r.Tunnel, r.SandboxID); err == nil {
				f.log.Info("fleet: tunnel member of an ended sandbox removed", "tunnel", key(r.OrgID, r.Tunnel), "sandbox", r.SandboxID)
			}
		}
		if k := key(r.OrgID, r.Tunnel); !seen[k] {
			seen[k] = true
			todo = append(todo, named{r.OrgID, r.Tunnel})
		}
	}
	for k := range f.members {
		if !seen[k] {
			delete(f.members, k)
		}
	}
	for _, n := range todo {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := f.repairTunnel(cctx, n.org, n.name); err != nil && ctx.Err() == nil {
			f.log.Warn("fleet: tunnel repair", "tunnel", key(n.org, n.name), "err", err)
		}
		cancel()
	}
}

// gone reports whether sandbox id is gone or has ended (not whether the
// store could not say).
func (f *fleetTunnels) gone(ctx context.Context, id string) bool {
	sb, err := f.st.GetSandbox(ctx, id)
	if errdefs.Is(err, errdefs.ErrNotFound) {
		return true
	}
	return err == nil && (sb.State == store.StateStopped || sb.State == store.StateFailed)
}

// repairTunnel repairs tunnel org/name (mu held).
func (f *fleetTunnels) repairTunnel(ctx context.Context, org, name string) error {
	t, err := f.st.GetTunnel(ctx, org, name)
	if err != nil {
		return err
	}
	k := key(org, name)
	runs, err := f.push(ctx, t)
	changed := false
	for id, fm := range f.members[k] {
		if !fm.joined() {
			continue // its join is under way
		}
		here, ok := runs[fm.node]
		if !ok {
			continue // not reachable now
		}
		i := slices.IndexFunc(here, func(r tunnel.Remote) bool { return r.SandboxID == id })
		if i >= 0 && here[i].Addr == fm.m.Addr && here[i].PublicKey == fm.m.PublicKey && here[i].Endpoint == fm.m.Endpoint {
			continue
		}
		_, mb, jerr := f.router.TunnelJoin(ctx, id, fm.slot, k, fm.m.Interface, f.Subnet(t.Index), fm.m.Addr)
		if jerr != nil {
			err = errors.Join(err, fmt.Errorf("sandbox %s: join again on node %s: %w", id, fm.node, jerr))
			continue
		}
		if mb.Addr != fm.m.Addr {
			err = errors.Join(err, fmt.Errorf("sandbox %s: node %s has it at %s, not %s: %w", id, fm.node, mb.Addr, fm.m.Addr, errdefs.ErrFailedPrecondition))
			continue
		}
		again := &fleetMember{node: fm.node, slot: fm.slot, m: mb}
		if perr := f.st.PutTunnelMember(ctx, rowOf(org, name, id, again)); perr != nil {
			// It left meanwhile (through another replica): its node
			// takes the device down when it ends there.
			err = errors.Join(err, fmt.Errorf("sandbox %s: record its new key: %w", id, perr))
			continue
		}
		f.log.Info("fleet: tunnel member joined again on its node", "tunnel", k, "sandbox", id, "node", fm.node, "address", mb.Addr)
		fm.m = mb
		changed = true
	}
	if changed {
		_, perr := f.push(ctx, t)
		err = errors.Join(err, perr)
	}
	return err
}

// started is the Started hook: the sandbox joins its tunnels on its node,
// at addresses chosen here, and every node with a member of those tunnels
// learns it before create returns.
func (f *fleetTunnels) started(ctx context.Context, sb *store.Sandbox, _ node.Started) error {
	if len(sb.Tunnels) == 0 {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.join(ctx, sb); err != nil {
		f.leave(context.WithoutCancel(ctx), sb)
		return err
	}
	return nil
}

// reserve records sb as a member of org's tunnel name at the lowest free
// address, which no other member (placed through any replica) has: the
// store refuses an address taken meanwhile, and the next is tried (mu
// held).
func (f *fleetTunnels) reserve(ctx context.Context, sb *store.Sandbox, name, ifname string, subnet netip.Prefix, peers []store.TunnelPeer) (*fleetMember, error) {
	k := key(sb.OrgID, name)
	for range 32 {
		addr, err := f.freeAddr(k, subnet, peers)
		if err != nil {
			return nil, err
		}
		fm := &fleetMember{slot: sb.Slot, m: tunnel.Member{Tunnel: k, SandboxID: sb.ID, Interface: ifname, Addr: addr}}
		err = f.st.AddTunnelMember(ctx, rowOf(sb.OrgID, name, sb.ID, fm))
		if err == nil {
			if f.members[k] == nil {
				f.members[k] = map[string]*fleetMember{}
			}
			f.members[k][sb.ID] = fm
			return fm, nil
		}
		if !errdefs.Is(err, errdefs.ErrAlreadyExists) {
			return nil, fmt.Errorf("sandbox %s tunnel %s: %w", sb.ID, name, err)
		}
		// Another replica took the address: read the members again.
		if err := f.load(ctx, sb.OrgID, name); err != nil {
			return nil, err
		}
		if _, ok := f.members[k][sb.ID]; ok {
			return nil, fmt.Errorf("sandbox %s tunnel %s: it is joining through another control-plane replica: %w", sb.ID, name, errdefs.ErrAlreadyExists)
		}
	}
	return nil, fmt.Errorf("sandbox %s tunnel %s: every address tried was taken meanwhile: %w", sb.ID, name, errdefs.ErrUnavailable)
}

// join joins sb to its tunnels (mu held). A sandbox the store has in a
// tunnel already (a restarted control plane rejoins the sandboxes it finds
// running) joins at its recorded address; an address its node reports for
// it (in the tunnel there already) is taken as it is, unless another
// member has it.
func (f *fleetTunnels) join(ctx context.Context, sb *store.Sandbox) error {
	for i, name := range sb.Tunnels {
		t, err := f.st.GetTunnel(ctx, sb.OrgID, name)
		if err != nil {
			return fmt.Errorf("sandbox %s tunnel %s: %w", sb.ID, name, err)
		}
		k, subnet, ifname := key(sb.OrgID, name), f.Subnet(t.Index), "wg"+strconv.Itoa(i)
		if err := f.load(ctx, sb.OrgID, name); err != nil {
			return err
		}
		fm, fresh := f.members[k][sb.ID], false
		if fm == nil {
			if fm, err = f.reserve(ctx, sb, name, ifname, subnet, t.Peers); err != nil {
				return err
			}
			fresh = true
		}
		nodeID, mb, err := f.router.TunnelJoin(ctx, sb.ID, sb.Slot, k, ifname, subnet, fm.m.Addr)
		if err != nil {
			if fresh {
				// The address is free again (it never was its).
				if _, derr := f.st.DeleteTunnelMember(context.WithoutCancel(ctx), sb.OrgID, name, sb.ID); derr == nil {
					delete(f.members[k], sb.ID)
				}
			}
			return fmt.Errorf("sandbox %s tunnel %s: %w", sb.ID, name, err)
		}
		joined := &fleetMember{node: nodeID, slot: sb.Slot, m: mb}
		if err := f.st.PutTunnelMember(ctx, rowOf(sb.OrgID, name, sb.ID, joined)); err != nil {
			if errdefs.Is(err, errdefs.ErrAlreadyExists) {
				return fmt.Errorf("sandbox %s tunnel %s: its node has it at %s, another member's address: %w", sb.ID, name, mb.Addr, errdefs.ErrAlreadyExists)
			}
			return fmt.Errorf("sandbox %s tunnel %s: %w", sb.ID, name, err)
		}
		f.members[k][sb.ID] = joined
		// The sandbox's own node must take the view; another node that
		// does not answer now (lost, restarting) gets it from the repair.
		runs, err := f.push(ctx, t)
		if _, ok := runs[nodeID]; !ok {
			if err == nil {
				err = fmt.Errorf("tunnel %s: node %s was sent no view", name, nodeID)
			}
			return err
		}
		if err != nil {
			f.log.Warn("fleet: tunnel view not taken by every node (the repair sends it again)", "tunnel", name, "sandbox", sb.ID, "err", err)
		}
	}
	return nil
}

// ended is the sandbox's Ended hook: it leaves its tunnels (on its node,
// if that answers) and the other nodes forget it.
func (f *fleetTunnels) ended(ctx context.Context, sb *store.Sandbox) {
	if len(sb.Tunnels) == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.leave(ctx, sb)
}

// leave takes sb out of its tunnels, in the store and on the nodes (mu
// held).
func (f *fleetTunnels) leave(ctx context.Context, sb *store.Sandbox) {
	delete(f.pending, sb.ID)
	var in []string
	for _, name := range sb.Tunnels {
		k := key(sb.OrgID, name)
		_, was := f.members[k][sb.ID]
		ok, err := f.st.DeleteTunnelMember(ctx, sb.OrgID, name, sb.ID)
		if err != nil {
			// The leader's repair removes the row once it sees the
			// sandbox ended.
			f.log.Warn("fleet: tunnel member's record (the repair removes it)", "tunnel", name, "sandbox", sb.ID, "err", err)
		}
		delete(f.members[k], sb.ID)
		if len(f.members[k]) == 0 {
			delete(f.members, k)
		}
		if was || ok {
			in = append(in, name)
		}
	}
	// Its node may be lost: then its devices went with it, or are taken
	// down when it returns (Destroy leaves the tunnels).
	if err := f.router.TunnelLeave(ctx, sb.ID); err != nil && !errdefs.Is(err, errdefs.ErrNotFound) {
		f.log.Debug("fleet: tunnel leave on the sandbox's node", "sandbox", sb.ID, "err", err)
	}
	for _, name := range in {
		t, err := f.st.GetTunnel(ctx, sb.OrgID, name)
		if err != nil {
			f.log.Warn("fleet: tunnel view after a member left", "tunnel", name, "sandbox", sb.ID, "err", err)
			continue
		}
		if _, err := f.push(ctx, t); err != nil {
			f.log.Warn("fleet: tunnel view after a member left", "tunnel", name, "sandbox", sb.ID, "err", err)
		}
	}
}

// resumed rejoins a sandbox this control plane found running at its start
// (its devices live on on its node: the node answers with the membership
// it has).
func (f *fleetTunnels) resumed(ctx context.Context, sb *store.Sandbox) {
	if len(sb.Tunnels) == 0 {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.join(ctx, sb); err != nil {
		// Its node may not answer yet (restarting too): the repair
		// tries again until it does or the sandbox ends.
		f.pending[sb.ID] = sb
		f.log.Warn("fleet: rejoin tunnels (the repair tries again)", "sandbox", sb.ID, "err", err)
	}
}

// nodeTunnels is noderpc.Tunnels on a node's tunnel.Manager.
type nodeTunnels struct {
	d    *Daemon
	host string // this node's address as other nodes and external peers reach it
}

var _ noderpc.Tunnels = nodeTunnels{}

func (n nodeTunnels) Join(_ context.Context, id string, slot int, k, ifname string, subnet netip.Prefix, addr netip.Addr) (tunnel.Member, error) {
	if n.d.cfg.Runtime == sandbox.RuntimeRunsc {
		// As in the all-in-one daemon: gVisor's network stack takes over
		// only the interfaces present when it starts.
		return tunnel.Member{}, fmt.Errorf("sandbox %s: tunnels are not available on this node: it runs sandboxes on gVisor (chalkd --runtime runsc), whose network stack cannot use the tunnel's device: %w", id, errdefs.ErrFailedPrecondition)
	}
	// The node keeps its sandboxes' veths away from its tunnel space
	// (sandboxnet's reserved ranges): a tunnel outside it would be routed
	// to from non-members.
	if !n.d.tun.base.Contains(subnet.Addr()) || subnet.Bits() < n.d.tun.base.Bits() {
		return tunnel.Member{}, fmt.Errorf("tunnel %s: subnet %s is outside this node's --tunnel-subnets %s: give the control plane and its nodes the same: %w", k, subnet, n.d.tun.base, errdefs.ErrFailedPrecondition)
	}
	// The device goes into the slot's namespace: only the slot this node
	// gave that sandbox (before a restarted node process is restored: the
	// slot kept with its egress policies).
	got, ok := n.d.Agent.Slots().Of(id)
	if !ok {
		got, ok = nodeEgress{n.d}.keptSlots()[id]
	}
	if !ok || got != slot {
		return tunnel.Member{}, fmt.Errorf("sandbox %q: slot %d is not its slot on this node: %w", id, slot, errdefs.ErrFailedPrecondition)
	}
	for _, mb := range n.d.Tunnels.Of(id) {
		if mb.Tunnel == k {
			mb.Endpoint = net.JoinHostPort(n.host, strconv.Itoa(mb.Port))
			return mb, nil
		}
	}
	nt := n.d.Agent.Net(id, slot)
	if nt == nil {
		return tunnel.Member{}, fmt.Errorf("sandbox %q: no network on this node: %w", id, errdefs.ErrFailedPrecondition)
	}
	mb, err := n.d.Tunnels.JoinAt(k, id, nt.NetnsPath, ifname, subnet, addr)
	if err != nil {
		return tunnel.Member{}, err
	}
	mb.Endpoint = net.JoinHostPort(n.host, strconv.Itoa(mb.Port))
	return mb, nil
}

func (n nodeTunnels) Leave(id string) { n.d.Tunnels.Leave(id) }

func (n nodeTunnels) Sync(k string, subnet netip.Prefix, remotes []tunnel.Remote, peers []tunnel.Peer) ([]tunnel.Member, error) {
	if err := n.d.Tunnels.SetView(k, subnet, remotes, peers); err != nil {
		return nil, err
	}
	here := n.d.Tunnels.Members(k)
	for i := range here {
		here[i].Endpoint = net.JoinHostPort(n.host, strconv.Itoa(here[i].Port))
	}
	return here, nil
}

// nodeTunnelHost is the address a node's tunnel devices are reached at by
// other nodes and external peers: --tunnel-endpoint, else the host of the
// node API's advertised URL (a name is resolved once, here: WireGuard
// endpoints are addresses).
func nodeTunnelHost(endpoint, advertise string) (string, error) {
	host := endpoint
	if host == "" {
		u, err := url.Parse(advertise)
		if err != nil {
			return "", err
		}
		host = u.Hostname()
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return a.String(), nil
	}
	addrs, err := net.LookupHost(host)
	if err != nil || len(addrs) == 0 {
		return "", fmt.Errorf("tunnel endpoint %q: not an address, and it does not resolve: %v: %w", host, err, errdefs.ErrInvalidArgument)
	}
	return addrs[0], nil
}

// startNodeTunnels starts the tunnel devices of `chalkd node` (members
// placed here; the control plane says who and where the others are).
func (d *Daemon) startNodeTunnels(advertise string) (err error) {
	host, err := nodeTunnelHost(d.cfg.TunnelEndpoint, advertise)
	if err != nil {
		return err
	}
	d.Tunnels = tunnel.NewManager(d.cfg.Logger)
	tunnelManagers.Store(d.Tunnels, struct{}{})
	d.tun, err = newTunnels(d.Tunnels, d.Agent, nil, d.cfg.TunnelSubnets, host)
	return err
}
