package tunnel

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// The kernel path between members on this node (router.go).
//
// Each tunnel with members here has a router: a network namespace of its
// own, held by a file descriptor of this process only (never mounted, so
// it vanishes with chalkd, and with it every port and, by the kernel's
// veth semantics, every port's other end in the sandboxes). Each local
// member has a veth pair from its namespace (localIfname, no address) to a
// port of the router; in the member's namespace a /32 route per other local
// member goes through it (more specific than the subnet's route on the
// TUN, which remote members and external peers keep). The router forwards
// between ports by its /32 routes, one per port's member. Nothing in that
// namespace has an address and it has no IPv6 at all, its nftables
// input and output hooks drop everything (nothing is delivered to it and it
// originates nothing), and strict reverse-path filtering (rp_filter=1) on
// its ports drops any packet whose source is not the member of the port it
// came in by — the check WireGuard's cryptokey routing made (AllowedIPs =
// the sender's /32). Neighbours are static on both sides (no ARP): the
// router knows each member's MAC, each member the MAC of its port.
//
// Packets between members never leave the host and never cross the node's
// namespace (so, as on the TUN path, the sandbox's egress rules, which
// live there, do not see them).

// localIfname is the name of member's veth into the router, inside its
// namespace, or "" if the TUN's name leaves no room for it.
func localIfname(ifname string) string {
	if n := ifname + "-local"; len(n) < unix.IFNAMSIZ {
		return n
	}
	return ""
}

// router is a tunnel's router namespace on this node.
type router struct {
	ns    netns.NsHandle
	h     *netlink.Handle
	next  int              // number of the next port's name
	ports map[string]*port // sandbox id -> its port
	// work counts what the members' routes cost: member namespaces
	// entered and routes written there (tests).
	work routeWork
}

// routeWork is the work of setting members' routes.
type routeWork struct{ namespaces, routes int }

// port is a member's veth pair into the router.
type port struct {
	name   string // in the router
	mac    net.HardwareAddr
	inner  string // in the member's namespace
	index  int    // inner's interface index there
	memMAC net.HardwareAddr
	addr   netip.Addr
}

// routerSysctls make the router forward, check sources strictly and have
// no IPv6; the "default" entries are what ports moved in later start with,
// the "all" ones what rp_filter takes the maximum with.
var routerSysctls = [][2]string{
	{"net/ipv6/conf/all/disable_ipv6", "1"},
	{"net/ipv6/conf/default/disable_ipv6", "1"},
	{"net/ipv4/conf/all/rp_filter", "1"},
	{"net/ipv4/conf/default/rp_filter", "1"},
	{"net/ipv4/conf/all/send_redirects", "0"},
	{"net/ipv4/conf/default/send_redirects", "0"},
	{"net/ipv4/conf/all/accept_source_route", "0"},
	{"net/ipv4/ip_forward", "1"},
}

// newRouter makes a router namespace: sysctls set, nftables dropping its
// input and output.
func newRouter() (*router, error) {
	type res struct {
		ns  netns.NsHandle
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.New() // unshares this thread's namespace
		if err != nil {
			if netns.Set(orig) == nil {
				runtime.UnlockOSThread()
			}
			ch <- res{err: fmt.Errorf("new namespace: %w", err)}
			return
		}
		for _, s := range routerSysctls {
			if err = os.WriteFile("/proc/sys/"+s[0], []byte(s[1]), 0); err != nil {
				err = fmt.Errorf("sysctl %s: %w", s[0], err)
				break
			}
		}
		if serr := netns.Set(orig); serr != nil {
			// The thread stays locked: the runtime discards it.
			ns.Close()
			ch <- res{err: fmt.Errorf("return to node netns: %w", serr)}
			return
		}
		runtime.UnlockOSThread()
		if err != nil {
			ns.Close()
			ns = -1
		}
		ch <- res{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		return nil, fmt.Errorf("tunnel router: %w", r.err)
	}
	if err := routerFirewall(r.ns); err != nil {
		r.ns.Close()
		return nil, fmt.Errorf("tunnel router: %w", err)
	}
	h, err := netlink.NewHandleAt(r.ns)
	if err != nil {
		r.ns.Close()
		return nil, fmt.Errorf("tunnel router: netlink: %w", err)
	}
	return &router{ns: r.ns, h: h, ports: map[string]*port{}}, nil
}

var (
	routerTable   = &nftables.Table{Family: nftables.TableFamilyINet, Name: "chalk-tunnel-router"}
	routerForward = &nftables.Chain{Name: "forward", Table: routerTable}
)

// routerFirewall drops, in the router namespace ns, every packet delivered
// to it or sent from it (both families): it only forwards. Two counters in
// its forward chain count what it forwards: every packet, and those longer
// than the MTU (TCP segments that went whole).
func routerFirewall(ns netns.NsHandle) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	t := c.AddTable(routerTable)
	drop, accept := nftables.ChainPolicyDrop, nftables.ChainPolicyAccept
	c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	fwd := c.AddChain(&nftables.Chain{Name: routerForward.Name, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: []expr.Any{&expr.Counter{}}})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyLEN, Register: 1},
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 4, Size: 4},
		&expr.Cmp{Op: expr.CmpOpGt, Register: 1, Data: binaryutil.BigEndian.PutUint32(MTU)},
		&expr.Counter{},
	}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return nil
}

// routerCounts are a router's forwarded packets and bytes, those of them
// over the MTU, and the packets its source check dropped.
type routerCounts struct{ packets, bytes, gso, spoofed uint64 }

func (c *counters) add(rc routerCounts) {
	c.local.Add(rc.packets)
	c.localBytes.Add(rc.bytes)
	c.localGSO.Add(rc.gso)
	c.spoofed.Add(rc.spoofed)
}

// counts reads the router's counters.
func (r *router) counts() (routerCounts, error) {
	var rc routerCounts
	c, err := nftables.New(nftables.WithNetNSFd(int(r.ns)))
	if err != nil {
		return rc, err
	}
	rules, err := c.GetRules(routerTable, routerForward)
	if err != nil {
		return rc, err
	}
	for i, rule := range rules {
		for _, e := range rule.Exprs {
			if ctr, ok := e.(*expr.Counter); ok {
				if i == 0 {
					rc.packets, rc.bytes = ctr.Packets, ctr.Bytes
				} else {
					rc.gso = ctr.Packets
				}
			}
		}
	}
	err = inNetns(fmt.Sprintf("/proc/self/fd/%d", int(r.ns)), func() error {
		b, err := os.ReadFile("/proc/thread-self/net/netstat")
		if err != nil {
			return err
		}
		rc.spoofed = rpFilterDrops(string(b))
		return nil
	}, nil)
	return rc, err
}

// rpFilterDrops is TcpExt's IPReversePathFilter in /proc/net/netstat's
// text.
func rpFilterDrops(netstat string) uint64 {
	lines := strings.Split(netstat, "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" || len(vals) != len(names) {
			continue
		}
		for j, n := range names {
			if n == "IPReversePathFilter" {
				v, _ := strconv.ParseUint(vals[j], 10, 64)
				return v
			}
		}
	}
	return 0
}

// close deletes the ports left and lets the namespace go (its counters
// are folded into the Manager's first: Manager.dropRouterLocked).
func (r *router) close() {
	for id := range r.ports {
		r.remove(id)
	}
	r.h.Close()
	r.ns.Close()
}

func randomMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	_, _ = rand.Read(mac)
	mac[0] = mac[0]&^1 | 2 // unicast, locally administered
	return mac
}

// add gives member mb (namespace netnsPath) a port: the veth pair, the
// router's route and static neighbour for mb's address, the member's end
// up. The member's routes to the others, and theirs to it, are set by
// joined.
func (r *router) add(id string, mb *member) (err error) {
	inner := localIfname(mb.Interface)
	if inner == "" {
		return fmt.Errorf("no veth name fits next to interface %s", mb.Interface)
	}
	h, ns, err := handleAt(mb.netnsPath)
	if err != nil {
		return err
	}
	defer ns.Close()
	defer h.Close()
	// A stale end from a router that went with a chalkd killed before
	// (the kernel removes it, but asynchronously): it is ours (the sandbox
	// cannot make links), remove it.
	if l, err := h.LinkByName(inner); err == nil {
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("stale %s: %w", inner, err)
		}
	}
	p := &port{name: "m" + strconv.Itoa(r.next), mac: randomMAC(), inner: inner, memMAC: randomMAC(), addr: mb.Addr}
	r.next++
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: p.name, MTU: MTU, HardwareAddr: p.mac},
		PeerName:         inner,
		PeerHardwareAddr: p.memMAC,
		PeerNamespace:    netlink.NsFd(ns),
		PeerMTU:          MTU,
	}
	if err := r.h.LinkAdd(veth); err != nil {
		return fmt.Errorf("veth %s into the tunnel router: %w", inner, err)
	}
	defer func() {
		if err != nil {
			_ = r.h.LinkDel(veth)
		}
	}()
	l, err := r.h.LinkByName(p.name)
	if err != nil {
		return fmt.Errorf("router port %s: %w", p.name, err)
	}
	if err := r.h.LinkSetUp(l); err != nil {
		return fmt.Errorf("router port %s up: %w", p.name, err)
	}
	if err := r.h.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: net.IP(p.addr.AsSlice()), HardwareAddr: p.memMAC}); err != nil {
		return fmt.Errorf("router neighbour %s: %w", p.addr, err)
	}
	if err := r.h.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipprefix.IPNet(netip.PrefixFrom(p.addr, 32)), Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("router route %s: %w", p.addr, err)
	}
	il, err := h.LinkByName(inner)
	if err != nil {
		return fmt.Errorf("%s in the sandbox: %w", inner, err)
	}
	// No IPv6 link-local address on the member's end (the router has no
	// IPv6 to speak to it); where the namespace has no IPv6 there is
	// nothing to turn off.
	_ = h.LinkSetIP6AddrGenMode(il, 1) // IN6_ADDR_GEN_MODE_NONE
	if err := h.LinkSetUp(il); err != nil {
		return fmt.Errorf("%s up: %w", inner, err)
	}
	// Up is not yet ready: until the kernel's link watch has seen the
	// carrier (asynchronously) each end's queue drops what it is given.
	// No route leads here before both ends say so; meanwhile the TUN path
	// carries the member's packets.
	if err := operUp(r.h, p.name); err != nil {
		return err
	}
	if err := operUp(h, inner); err != nil {
		return err
	}
	p.index = il.Attrs().Index
	r.ports[id] = p
	return nil
}

// operUp waits until link name's operational state is up (the link
// watch's work done), for at most 5 s.
func operUp(h *netlink.Handle, name string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if l.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: still %s after 5 s", name, l.Attrs().OperState)
		}
		time.Sleep(time.Millisecond)
	}
}

// remove deletes id's port (its pair's other end goes with it, and the
// member's routes through it); a pair already gone with the sandbox's
// namespace is no error.
func (r *router) remove(id string) {
	p := r.ports[id]
	if p == nil {
		return
	}
	delete(r.ports, id)
	if l, err := r.h.LinkByName(p.name); err == nil {
		_ = r.h.LinkDel(l)
	}
}

// joined sets the routes of member id, whose port was just added: its
// own to every other member with a port (setRoutes), and in each of those
// one to it. Linear in the members: the others' routes to each other
// stand. members are the tunnel's members here (by sandbox id).
func (r *router) joined(id string, members map[string]*member) []error {
	p := r.ports[id]
	if p == nil {
		return nil
	}
	var errs []error
	if err := r.setRoutes(id, members[id]); err != nil {
		errs = append(errs, fmt.Errorf("sandbox %s: %w", id, err))
	}
	for oid := range r.ports {
		if oid == id {
			continue
		}
		if err := r.routeOne(oid, members[oid], p.addr, true); err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", oid, err))
		}
	}
	return errs
}

// left removes, in every member with a port, its route to addr (a
// member whose port was removed; the other end of its route is gone).
func (r *router) left(addr netip.Addr, members map[string]*member) []error {
	var errs []error
	for id := range r.ports {
		if err := r.routeOne(id, members[id], addr, false); err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", id, err))
		}
	}
	return errs
}

// routeOne adds (add) or removes the route and static neighbour of
// member id's namespace for addr through its port.
func (r *router) routeOne(id string, mb *member, addr netip.Addr, add bool) error {
	p := r.ports[id]
	if p == nil || mb == nil {
		return nil
	}
	h, ns, err := handleAt(mb.netnsPath)
	if err != nil {
		return err
	}
	r.work.namespaces++
	defer ns.Close()
	defer h.Close()
	dst := ipprefix.IPNet(netip.PrefixFrom(addr, 32))
	r.work.routes++
	if add {
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: p.index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: net.IP(addr.AsSlice()), HardwareAddr: p.mac}); err != nil {
			return fmt.Errorf("neighbour %s on %s: %w", addr, p.inner, err)
		}
		if err := h.RouteReplace(&netlink.Route{LinkIndex: p.index, Dst: dst, Src: net.IP(p.addr.AsSlice()), Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("route %s via %s: %w", addr, p.inner, err)
		}
		return nil
	}
	if err := h.RouteDel(&netlink.Route{LinkIndex: p.index, Dst: dst, Scope: netlink.SCOPE_LINK}); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("route %s via %s: %w", addr, p.inner, err)
	}
	if err := h.NeighDel(&netlink.Neigh{LinkIndex: p.index, Family: unix.AF_INET, IP: net.IP(addr.AsSlice())}); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("neighbour %s on %s: %w", addr, p.inner, err)
	}
	return nil
}

// setRoutes makes the routes of mb's namespace through its port exactly
// one /32 per other member with a port (source mb's address, static
// neighbour the port's MAC).
func (r *router) setRoutes(id string, mb *member) error {
	p := r.ports[id]
	if p == nil {
		return nil
	}
	h, ns, err := handleAt(mb.netnsPath)
	if err != nil {
		return err
	}
	r.work.namespaces++
	defer ns.Close()
	defer h.Close()
	l, err := h.LinkByName(p.inner)
	if err != nil {
		return fmt.Errorf("%s: %w", p.inner, err)
	}
	idx := l.Attrs().Index
	want := map[netip.Addr]bool{}
	for oid, o := range r.ports {
		if oid == id {
			continue
		}
		want[o.addr] = true
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: net.IP(o.addr.AsSlice()), HardwareAddr: p.mac}); err != nil {
			return fmt.Errorf("neighbour %s on %s: %w", o.addr, p.inner, err)
		}
		r.work.routes++
		if err := h.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: ipprefix.IPNet(netip.PrefixFrom(o.addr, 32)), Src: net.IP(p.addr.AsSlice()), Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("route %s via %s: %w", o.addr, p.inner, err)
		}
	}
	routes, err := h.RouteList(l, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("routes of %s: %w", p.inner, err)
	}
	for _, rt := range routes {
		if rt.Dst == nil {
			continue
		}
		a, _ := netip.AddrFromSlice(rt.Dst.IP.To4())
		if !want[a] {
			r.work.routes++
			if err := h.RouteDel(&rt); err != nil {
				return fmt.Errorf("route %s via %s: %w", a, p.inner, err)
			}
		}
	}
	neighs, err := h.NeighList(idx, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("neighbours of %s: %w", p.inner, err)
	}
	for _, n := range neighs {
		a, _ := netip.AddrFromSlice(n.IP.To4())
		if !want[a] {
			if err := h.NeighDel(&n); err != nil {
				return fmt.Errorf("neighbour %s on %s: %w", a, p.inner, err)
			}
		}
	}
	return nil
}
