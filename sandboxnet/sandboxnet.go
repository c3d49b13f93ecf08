// Package sandboxnet gives each sandbox its own network namespace on a node:
// loopback, and a routed veth pair to the node (no bridge, so there is no L2
// path between sandboxes and the interface a packet arrives on identifies its
// sandbox), with NAT to the outside and isolation rules in nftables.
//
// Addressing: slot n (1..MaxSlot) owns the IPv4 /30 at Subnet.base+4n (host
// side .1 = the sandbox's gateway and DNS server, sandbox .2) and the IPv6
// /126 at Subnet6.base+4n (::1 host, ::2 sandbox). Slot 0 is reserved for the
// node's service address (base+1 and base6+1), added to the node's loopback
// interface (the kernels we run on may lack the dummy driver): the metadata
// service and the DNS proxy listen there.
//
// nftables: one table `inet <Table>` owned by this package:
//
//	prerouting  (nat)    sandbox → 169.254.169.254:80 is DNATed to ServiceAddr:MetadataPort;
//	                     sandbox → any local address :53 to ServiceAddr:DNSPort (if DNSPort != 0)
//	postrouting (nat)    traffic from the subnets leaving through a non-sandbox interface is masqueraded
//	forward     (filter) anti-spoofing (a sandbox interface may only send its own addresses, sets
//	                     "src4"/"src6" of ifname . address), established/related accept,
//	                     sandbox → sandbox drop, then `jump egress`
//	egress      (regular) created empty and never flushed here: the egress package owns its
//	                     contents; a packet that returns from it is accepted
//	input       (filter) from sandbox interfaces only: established, ICMPv6 neighbour discovery,
//	                     and TCP/UDP to the service address on ServicePorts are accepted;
//	                     everything else (the node's own services) is dropped
//
// Slot allocation is the caller's (it is persisted in the store).
package sandboxnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Config configures a Manager. The zero value works.
type Config struct {
	Subnet       netip.Prefix // default 10.213.0.0/16
	Subnet6      netip.Prefix // default fd63:6861:6c6b::/48 (only the first /64's worth of slots is used)
	Prefix       string       // interface name prefix, default "cx"
	Table        string       // nftables table, default "chalk"
	NetnsDir     string       // default /run/chalk/netns
	DNSPort      uint16       // DNS proxy port on the service address; 0 = no DNS DNAT
	MetadataPort uint16       // metadata port on the service address; default 80
	ServicePorts []uint16     // ports sandboxes may reach on the service address (DNS and metadata are added)
	Logger       *slog.Logger
}

// Manager sets up and tears down sandbox networks on this node.
type Manager struct {
	cfg       Config
	log       *slog.Logger
	svc, svc6 netip.Addr
	maxSlot   int
	nftMu     sync.Mutex
}

// Net is one sandbox's network.
type Net struct {
	ID         string
	Slot       int
	NetnsPath  string
	HostIf     string
	HostIP     netip.Addr // the sandbox's gateway (and DNS server)
	SandboxIP  netip.Addr
	HostIP6    netip.Addr
	SandboxIP6 netip.Addr
}

// New validates cfg and returns a Manager. Call Init before Setup.
func New(cfg Config) (*Manager, error) {
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix("10.213.0.0/16")
	}
	if !cfg.Subnet6.IsValid() {
		cfg.Subnet6 = netip.MustParsePrefix("fd63:6861:6c6b::/48")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "cx"
	}
	if cfg.Table == "" {
		cfg.Table = "chalk"
	}
	if cfg.NetnsDir == "" {
		cfg.NetnsDir = "/run/chalk/netns"
	}
	if cfg.MetadataPort == 0 {
		cfg.MetadataPort = 80
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 28 {
		return nil, fmt.Errorf("subnet %s: need an IPv4 prefix of /28 or larger: %w", cfg.Subnet, errdefs.ErrInvalidArgument)
	}
	if !cfg.Subnet6.Addr().Is6() || cfg.Subnet6.Bits() > 120 {
		return nil, fmt.Errorf("subnet6 %s: need an IPv6 prefix of /120 or larger: %w", cfg.Subnet6, errdefs.ErrInvalidArgument)
	}
	if len(cfg.Prefix)+4 > 15 || strings.ContainsAny(cfg.Prefix, "/ \t") {
		return nil, fmt.Errorf("interface prefix %q: too long or invalid: %w", cfg.Prefix, errdefs.ErrInvalidArgument)
	}
	cfg.Subnet, cfg.Subnet6 = cfg.Subnet.Masked(), cfg.Subnet6.Masked()
	m := &Manager{cfg: cfg, log: cfg.Logger}
	m.maxSlot = (1<<(32-cfg.Subnet.Bits()))/4 - 1
	m.maxSlot = min(m.maxSlot, 0xffff) // four hex digits in interface names
	m.svc = addN(cfg.Subnet.Addr(), 1)
	m.svc6 = addN(cfg.Subnet6.Addr(), 1)
	return m, nil
}

// addN adds n to an address.
func addN(a netip.Addr, n uint64) netip.Addr {
	b := a.AsSlice()
	carry := n
	for i := len(b) - 1; i >= 0 && carry > 0; i-- {
		s := uint64(b[i]) + carry
		b[i] = byte(s)
		carry = s >> 8
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}

// ServiceAddr is the node's service address (metadata, DNS proxy).
func (m *Manager) ServiceAddr() netip.Addr { return m.svc }

// ServiceAddr6 is the node's IPv6 service address.
func (m *Manager) ServiceAddr6() netip.Addr { return m.svc6 }

// MaxSlot is the highest usable slot.
func (m *Manager) MaxSlot() int { return m.maxSlot }

// Table is the nftables table name.
func (m *Manager) Table() string { return m.cfg.Table }

// IfacePrefix is the prefix of every sandbox's host-side interface.
func (m *Manager) IfacePrefix() string { return m.cfg.Prefix }

// Lookup returns the Net that Setup(id, slot) makes.
func (m *Manager) Lookup(id string, slot int) *Net {
	base := addN(m.cfg.Subnet.Addr(), uint64(slot)*4)
	base6 := addN(m.cfg.Subnet6.Addr(), uint64(slot)*4)
	return &Net{
		ID: id, Slot: slot,
		NetnsPath:  filepath.Join(m.cfg.NetnsDir, id),
		HostIf:     fmt.Sprintf("%s%04x", m.cfg.Prefix, slot),
		HostIP:     addN(base, 1),
		SandboxIP:  addN(base, 2),
		HostIP6:    addN(base6, 1),
		SandboxIP6: addN(base6, 2),
	}
}

// SlotForAddr returns the slot whose sandbox address a is.
func (m *Manager) SlotForAddr(a netip.Addr) (int, bool) {
	a = a.Unmap()
	var base netip.Addr
	switch {
	case a.Is4() && m.cfg.Subnet.Contains(a):
		base = m.cfg.Subnet.Addr()
	case a.Is6() && m.cfg.Subnet6.Contains(a):
		base = m.cfg.Subnet6.Addr()
	default:
		return 0, false
	}
	ab, bb := a.AsSlice(), base.AsSlice()
	var diff uint64
	for i := max(0, len(ab)-8); i < len(ab); i++ {
		diff = diff<<8 | uint64(ab[i]-bb[i])
	}
	slot := int(diff / 4)
	if diff%4 != 2 || slot < 1 || slot > m.maxSlot {
		return 0, false
	}
	return slot, true
}

func writeSysctl(path, value string) error {
	return os.WriteFile(filepath.Join("/proc/sys", path), []byte(value), 0o644)
}

// Init prepares the node: forwarding, the service dummy interface and the
// nftables table. It is idempotent and keeps the state of live sandboxes.
func (m *Manager) Init(ctx context.Context) error {
	if err := os.MkdirAll(m.cfg.NetnsDir, 0o755); err != nil {
		return err
	}
	// Keep router advertisements working where they were relied on.
	if ents, err := os.ReadDir("/proc/sys/net/ipv6/conf"); err == nil {
		for _, e := range ents {
			p := filepath.Join("net/ipv6/conf", e.Name(), "accept_ra")
			if b, err := os.ReadFile(filepath.Join("/proc/sys", p)); err == nil && strings.TrimSpace(string(b)) == "1" {
				_ = writeSysctl(p, "2")
			}
		}
	}
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	if err := writeSysctl("net/ipv6/conf/all/forwarding", "1"); err != nil {
		m.log.Warn("enable IPv6 forwarding", "err", err)
	}
	if err := m.ensureServiceIf(); err != nil {
		return err
	}
	return m.installTable()
}

func (m *Manager) serviceAddrs() []netip.Prefix {
	return []netip.Prefix{netip.PrefixFrom(m.svc, 32), netip.PrefixFrom(m.svc6, 128)}
}

func (m *Manager) ensureServiceIf() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return err
	}
	for _, a := range m.serviceAddrs() {
		addr := &netlink.Addr{IPNet: prefixNet(a), Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrReplace(lo, addr); err != nil {
			return fmt.Errorf("service address %s: %w", a, err)
		}
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Close removes the table and the service interface (tests, uninstall). It is
// not called on a daemon restart.
func (m *Manager) Close(ctx context.Context) error {
	var errs []error
	m.nftMu.Lock()
	c, err := nftables.New()
	if err == nil {
		c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: m.cfg.Table})
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	m.nftMu.Unlock()
	if lo, err := netlink.LinkByName("lo"); err == nil {
		for _, a := range m.serviceAddrs() {
			if err := netlink.AddrDel(lo, &netlink.Addr{IPNet: prefixNet(a)}); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Setup creates the sandbox's netns, veth, addresses, routes and rules. On
// error it removes what it made.
func (m *Manager) Setup(ctx context.Context, id string, slot int) (_ *Net, err error) {
	if slot < 1 || slot > m.maxSlot {
		return nil, fmt.Errorf("network slot %d: out of range 1..%d: %w", slot, m.maxSlot, errdefs.ErrInvalidArgument)
	}
	if id == "" || strings.ContainsAny(id, "/\x00") || id == "." || id == ".." {
		return nil, fmt.Errorf("sandbox id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	n := m.Lookup(id, slot)
	if _, err := netlink.LinkByName(n.HostIf); err == nil {
		return nil, fmt.Errorf("network slot %d is in use (%s exists): %w", slot, n.HostIf, errdefs.ErrAlreadyExists)
	}
	defer func() {
		if err != nil {
			_ = m.Teardown(context.WithoutCancel(ctx), id, slot)
		}
	}()
	ns, err := newNamedNetns(n.NetnsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	peer := fmt.Sprintf("%sp%04x", m.cfg.Prefix, slot)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: n.HostIf, TxQLen: 1000},
		PeerName:      peer,
		PeerNamespace: netlink.NsFd(int(ns)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("veth %s: %w", n.HostIf, err)
	}
	host, err := netlink.LinkByName(n.HostIf)
	if err != nil {
		return nil, err
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(n.HostIP, 30), netip.PrefixFrom(n.HostIP6, 126)} {
		if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: prefixNet(a), Flags: unix.IFA_F_NODAD}); err != nil {
			return nil, fmt.Errorf("address %s on %s: %w", a, n.HostIf, err)
		}
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in sandbox netns: %w", err)
	}
	defer h.Close()
	if err := m.configureInside(h, peer, n); err != nil {
		return nil, err
	}
	if err := m.setSource(n, true); err != nil {
		return nil, fmt.Errorf("anti-spoofing rules: %w", err)
	}
	return n, nil
}

func (m *Manager) configureInside(h *netlink.Handle, peer string, n *Net) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return err
	}
	eth, err := h.LinkByName(peer)
	if err != nil {
		return err
	}
	if err := h.LinkSetName(eth, "eth0"); err != nil {
		return err
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(n.SandboxIP, 30), netip.PrefixFrom(n.SandboxIP6, 126)} {
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: prefixNet(a), Flags: unix.IFA_F_NODAD}); err != nil {
			return fmt.Errorf("address %s in sandbox: %w", a, err)
		}
	}
	if err := h.LinkSetUp(eth); err != nil {
		return err
	}
	for _, gw := range []netip.Addr{n.HostIP, n.HostIP6} {
		r := &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: gw.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	return nil
}

// Teardown removes everything Setup made. It is idempotent.
func (m *Manager) Teardown(ctx context.Context, id string, slot int) error {
	n := m.Lookup(id, slot)
	var errs []error
	if slot >= 1 && slot <= m.maxSlot {
		if err := m.setSource(n, false); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("anti-spoofing rules: %w", err))
		}
		if link, err := netlink.LinkByName(n.HostIf); err == nil {
			if err := netlink.LinkDel(link); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", n.HostIf, err))
			}
		}
	}
	if id != "" && !strings.ContainsAny(id, "/\x00") {
		if err := unix.Unmount(n.NetnsPath, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount netns: %w", err))
		}
		if err := os.Remove(n.NetnsPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Leftovers lists netns files, host interfaces and anti-spoofing entries that
// belong to no sandbox in live (id → slot).
func (m *Manager) Leftovers(ctx context.Context, live map[string]int) ([]string, error) {
	var out []string
	slots := map[string]bool{}
	for _, s := range live {
		slots[fmt.Sprintf("%s%04x", m.cfg.Prefix, s)] = true
	}
	ents, _ := os.ReadDir(m.cfg.NetnsDir)
	for _, e := range ents {
		if _, ok := live[e.Name()]; !ok {
			out = append(out, "netns:"+e.Name())
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		name := l.Attrs().Name
		if rest, ok := strings.CutPrefix(name, m.cfg.Prefix); ok && len(rest) == 4 {
			if _, err := strconv.ParseUint(rest, 16, 16); err == nil && !slots[name] {
				out = append(out, "link:"+name)
			}
		}
	}
	elems, err := m.sourceElements()
	if err == nil {
		for _, ifname := range elems {
			if !slots[ifname] {
				out = append(out, "nft-src:"+ifname)
			}
		}
	}
	return out, nil
}

// RemoveLeftover removes one object reported by Leftovers.
func (m *Manager) RemoveLeftover(ctx context.Context, obj string) error {
	kind, name, _ := strings.Cut(obj, ":")
	switch kind {
	case "netns":
		return m.Teardown(ctx, name, 0)
	case "link", "nft-src":
		rest := strings.TrimPrefix(name, m.cfg.Prefix)
		slot, err := strconv.ParseUint(rest, 16, 16)
		if err != nil {
			return err
		}
		n := m.Lookup("", int(slot))
		err = m.setSource(n, false)
		if link, lerr := netlink.LinkByName(name); lerr == nil {
			err = errors.Join(err, netlink.LinkDel(link))
		}
		return err
	}
	return fmt.Errorf("leftover %q: %w", obj, errdefs.ErrInvalidArgument)
}

// newNamedNetns creates a network namespace and bind-mounts it at path.
func newNamedNetns(path string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return 0, err
	}
	defer orig.Close()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return 0, fmt.Errorf("netns %s: %w", path, errdefs.ErrAlreadyExists)
		}
		return 0, err
	}
	f.Close()
	ns, err := netns.New() // unshares and switches this thread
	if err != nil {
		os.Remove(path)
		return 0, fmt.Errorf("new netns: %w", err)
	}
	src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
	merr := unix.Mount(src, path, "none", unix.MS_BIND, "")
	if err := netns.Set(orig); err != nil {
		// The thread stays locked (and is discarded) rather than run Go code in the wrong netns.
		ns.Close()
		panic(fmt.Sprintf("sandboxnet: cannot return to the node netns: %v", err))
	}
	if merr != nil {
		ns.Close()
		os.Remove(path)
		return 0, fmt.Errorf("bind netns to %s: %w", path, merr)
	}
	return ns, nil
}
