// Package sandboxnet gives each sandbox on a node its own network namespace:
// loopback, and a routed veth pair to the node (no bridge, so there is no L2
// path between sandboxes and the interface a packet arrives on identifies its
// sandbox), with NAT to the outside and isolation rules in nftables. It talks
// to the kernel through netlink and nf_tables directly; it never runs ip, nft
// or sysctl.
//
// # Addressing
//
// Slot n (1..MaxSlot) owns the IPv4 /30 at Subnet.base+4n (host side .1 = the
// sandbox's gateway and DNS server, sandbox .2) and the IPv6 /126 at
// Subnet6.base+4n (::1 host, ::2 sandbox). Slot 0 is reserved for the node's
// service addresses ServiceAddr (base+1) and ServiceAddr6 (base6+1), which
// live on a dummy interface named Prefix+"svc" (or on the node's loopback
// when the kernel has no dummy driver); the metadata service and the DNS
// proxy listen there. The host side of slot n's veth is named Prefix+"%04x"
// (its alias is the sandbox id); inside the sandbox's namespace, which is
// bind-mounted at NetnsDir/<id>, it is eth0.
//
// # nftables
//
// One table "inet <Table>" belongs to this package. "Sandbox interfaces" are
// those whose name starts with Prefix.
//
//	spoof       (filter, prerouting, raw priority) a packet from a sandbox interface must carry
//	            that sandbox's own address: (iifname . saddr) is looked up in the sets
//	            "src4"/"src6" (one element per sandbox), else it is dropped before conntrack
//	            sees it; IPv6 link-local/unspecified sources pass for ICMPv6 only (neighbour
//	            discovery, never forwarded)
//	prerouting  (nat, dstnat) sandbox → 169.254.169.254:80/tcp is DNATed to ServiceAddr:MetadataPort;
//	            sandbox → any gateway (host side ::1/.1) :53 tcp+udp to ServiceAddr(6):DNSPort
//	postrouting (nat, srcnat) traffic from Subnet/Subnet6 leaving through a non-sandbox
//	            interface is masqueraded (NAT44 and NAT66)
//	forward     (filter) established/related accept; sandbox → sandbox drop; anything new
//	            toward a sandbox drop; sandbox → 169.254.0.0/16 drop (a cloud's metadata
//	            service is the node's); from a sandbox: jump egress, then accept
//	egress      (regular chain) created empty and never flushed or written by this package
//	input       (filter) from sandbox interfaces only: established/related, ICMPv6 neighbour
//	            solicitation/advertisement, and TCP/UDP to ServiceAddr/ServiceAddr6 on
//	            ServicePorts (plus MetadataPort and DNSPort) are accepted; everything else is
//	            dropped, so the node's own services (and ping to it) are unreachable
//
// The contract with the egress package: chain "egress" of this table is
// egress's to fill. It is jumped to for every new forwarded packet from a
// sandbox (established traffic is accepted before, so cutting a connection
// means deleting its conntrack entry); the interface is the sandbox's HostIf
// and the source address is already verified. A packet that returns from
// "egress" is accepted; egress drops what it does not allow. Init may be run
// again at any time (daemon restart): it replaces the rules of the base
// chains in one transaction and keeps chain "egress", the anti-spoofing sets'
// elements and any other objects egress added to the table.
//
// # Node settings
//
// Init writes net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1.
// Enabling IPv6 forwarding makes the kernel ignore router advertisements on
// interfaces with accept_ra=1, so interfaces that have RA-learned routes get
// accept_ra=2 first (the host keeps its IPv6 default route). Init fails with
// ErrFailedPrecondition when IPv6 is disabled for new interfaces. Everything
// needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for the netns bind mounts).
//
// # Lifecycle and speed
//
// Slot allocation is the caller's (it is persisted in the store). Setup and
// Teardown of different slots may run concurrently. Setup takes a spare
// network made ahead of time (Config.NetnsPool of them, growing by one for
// each Setup that found none up to Config.NetnsPoolMax and back after a
// minute without a Setup: a namespace with lo
// and eth0 up, eth0's peer down in the node namespace under the temporary
// name Prefix+"q"+3 hex digits; with Config.UserNS, owned by a new user
// namespace; Init fills the pool, Refill tops it up after a Teardown, Close
// deletes it; spares vanish with the process), so it waits neither for unshare(2)
// nor for veth creation: it renames the peer to the slot's name and adds
// addresses and routes (in the sandbox's namespace through a netlink handle
// bound to it, no thread switches) and two set elements in one nf_tables
// transaction, about 1-2 ms.
// Teardown is dominated by the kernel's veth deletion (tens of ms under
// RTNL), which concurrent teardowns share (linkDeleter). After a
// daemon restart, Lookup gives the Net of a live sandbox and Leftovers (with
// RemoveLeftover) reconciles what no live sandbox owns.
package sandboxnet

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Defaults for the zero Config.
var (
	DefaultSubnet  = netip.MustParsePrefix("10.213.0.0/16")
	DefaultSubnet6 = netip.MustParsePrefix("fd63:6861:6c6b::/48")
)

const (
	DefaultPrefix       = "cx"
	DefaultTable        = "chalk"
	DefaultNetnsDir     = "/run/chalk/netns"
	DefaultMetadataPort = 80

	// The spare network pool: DefaultNetnsPool spares, growing after bursts
	// up to DefaultNetnsPoolMax (Config.NetnsPool, NetnsPoolMax); no
	// configuration may ask for more than MaxNetnsPool.
	DefaultNetnsPool    = 4
	DefaultNetnsPoolMax = 16
	MaxNetnsPool        = 1024
)

// Config configures a Manager. The zero value works: every empty field takes
// the default named in its comment.
type Config struct {
	Subnet       netip.Prefix // sandbox IPv4 addresses; default 10.213.0.0/16
	Subnet6      netip.Prefix // sandbox IPv6 addresses; default fd63:6861:6c6b::/48
	Prefix       string       // interface name prefix, default "cx"; at most 11 bytes
	Table        string       // nftables inet table, default "chalk"
	NetnsDir     string       // where netns files are bind-mounted, default /run/chalk/netns
	DNSPort      uint16       // DNS proxy port on the service address; 0 = no DNS DNAT
	MetadataPort uint16       // metadata port on the service address; default 80
	ServicePorts []uint16     // ports sandboxes may reach on the service address (DNSPort and MetadataPort are added)
	NetnsPool    int          // sandbox networks (netns + veth) made ahead for Setup; 0 = 4, negative = none
	// NetnsPoolMax bounds the pool's growth after bursts: each Setup that
	// finds no spare raises the pool's size by one up to it, and a minute
	// without a Setup brings the size back to NetnsPool. 0 = 16 (at least
	// NetnsPool), negative = no growth. At most MaxNetnsPool, as NetnsPool.
	NetnsPoolMax int
	// Reserved are destinations sandboxes never reach through the node,
	// whatever their egress policy: the WireGuard tunnels' address space,
	// reachable only over a tunnel's own interface inside the sandbox.
	Reserved []netip.Prefix
	// UserNS gives each sandbox a user namespace of its own, mapping its
	// ids 0..IDsPerSandbox-1 to UIDBase + slot*IDsPerSandbox on the host,
	// which owns its network namespace (see userns.go).
	UserNS  bool
	UIDBase uint32       // first host id of slot 0's range; default DefaultUIDBase
	Logger  *slog.Logger // nil = discard
}

// Manager sets up and tears down sandbox networks on this node.
type Manager struct {
	cfg       Config
	log       *slog.Logger
	svc, svc6 netip.Addr
	maxSlot   int
	ports     []uint16 // service ports, deduplicated, in order

	nftMu sync.Mutex     // serialises nf_tables transactions, guards nft
	nft   *nftables.Conn // lasting connection, opened on first use

	pool *sparePool

	flows flowForgetter // coalesces concurrent teardowns' conntrack walks
	links linkDeleter   // coalesces concurrent teardowns' veth deletions

	mu     sync.Mutex
	svcDev string // interface holding the service addresses, once known

	configured func() // tests: called where a network's configuration ends
}

// Net is one sandbox's network.
type Net struct {
	ID         string
	Slot       int
	NetnsPath  string     // bind-mounted network namespace, for runc
	HostIf     string     // host side of the veth
	HostIP     netip.Addr // the sandbox's gateway and DNS server address
	SandboxIP  netip.Addr
	HostIP6    netip.Addr
	SandboxIP6 netip.Addr
	UserNS     *UserNS // the sandbox's user namespace; nil without Config.UserNS
}

// New validates cfg, fills in defaults and returns a Manager. Call Init
// before Setup.
func New(cfg Config) (*Manager, error) {
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = DefaultSubnet
	}
	if !cfg.Subnet6.IsValid() {
		cfg.Subnet6 = DefaultSubnet6
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.Table == "" {
		cfg.Table = DefaultTable
	}
	if cfg.NetnsDir == "" {
		cfg.NetnsDir = DefaultNetnsDir
	}
	if cfg.MetadataPort == 0 {
		cfg.MetadataPort = DefaultMetadataPort
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 28 {
		return nil, fmt.Errorf("subnet %s: need an IPv4 prefix of /28 or larger: %w", cfg.Subnet, errdefs.ErrInvalidArgument)
	}
	if !cfg.Subnet6.Addr().Is6() || cfg.Subnet6.Addr().Is4In6() || cfg.Subnet6.Bits() > 124 {
		return nil, fmt.Errorf("subnet6 %s: need an IPv6 prefix of /124 or larger: %w", cfg.Subnet6, errdefs.ErrInvalidArgument)
	}
	// Interface names: Prefix + 4 hex digits, and Prefix+"svc", within IFNAMSIZ-1.
	if len(cfg.Prefix)+4 > 15 || strings.ContainsAny(cfg.Prefix, "/ \t\n\x00:") || cfg.Prefix == "eth" || cfg.Prefix == "lo" {
		return nil, fmt.Errorf("interface prefix %q: too long or invalid: %w", cfg.Prefix, errdefs.ErrInvalidArgument)
	}
	if !filepath.IsAbs(cfg.NetnsDir) {
		return nil, fmt.Errorf("netns dir %q: not absolute: %w", cfg.NetnsDir, errdefs.ErrInvalidArgument)
	}
	cfg.Subnet, cfg.Subnet6 = cfg.Subnet.Masked(), cfg.Subnet6.Masked()
	cfg.ServicePorts = append([]uint16(nil), cfg.ServicePorts...)
	switch {
	case cfg.NetnsPool == 0:
		cfg.NetnsPool = DefaultNetnsPool
	case cfg.NetnsPool < 0:
		cfg.NetnsPool = 0
	}
	switch {
	case cfg.NetnsPool == 0 || cfg.NetnsPoolMax < 0:
		cfg.NetnsPoolMax = cfg.NetnsPool
	case cfg.NetnsPoolMax == 0:
		cfg.NetnsPoolMax = max(DefaultNetnsPoolMax, cfg.NetnsPool)
	}
	if cfg.NetnsPool > MaxNetnsPool || cfg.NetnsPoolMax > MaxNetnsPool {
		return nil, fmt.Errorf("netns pool %d, growing to %d: at most %d: %w", cfg.NetnsPool, cfg.NetnsPoolMax, MaxNetnsPool, errdefs.ErrInvalidArgument)
	}
	if cfg.NetnsPoolMax < cfg.NetnsPool {
		return nil, fmt.Errorf("netns pool max %d: below the pool's size %d: %w", cfg.NetnsPoolMax, cfg.NetnsPool, errdefs.ErrInvalidArgument)
	}
	// A slot is 4 addresses (2 bits) in both families; names carry 4 hex digits.
	slotBits := min(32-cfg.Subnet.Bits(), 128-cfg.Subnet6.Bits(), 18) - 2
	maxSlot := 1<<slotBits - 1
	var hargv []string
	if cfg.UserNS {
		if cfg.UIDBase == 0 {
			cfg.UIDBase = DefaultUIDBase
		}
		if err := checkUIDRange(cfg.UIDBase, maxSlot); err != nil {
			return nil, err
		}
		var err error
		if hargv, err = holderArgv(); err != nil {
			return nil, err
		}
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, pool: newSparePool(cfg.NetnsPool, cfg.NetnsPoolMax, cfg.Prefix, hargv), maxSlot: maxSlot}
	m.links.group = groupOf(cfg.Prefix)
	m.svc = addN(cfg.Subnet.Addr(), 1)
	m.svc6 = addN(cfg.Subnet6.Addr(), 1)
	seen := map[uint16]bool{0: true}
	for _, p := range append([]uint16{cfg.MetadataPort, cfg.DNSPort}, cfg.ServicePorts...) {
		if !seen[p] {
			seen[p] = true
			m.ports = append(m.ports, p)
		}
	}
	return m, nil
}

// addN adds n to an address.
func addN(a netip.Addr, n uint64) netip.Addr {
	b := a.AsSlice()
	carry := n
	for i := len(b) - 1; i >= 0 && carry > 0; i-- {
		s := uint64(b[i]) + carry&0xff
		b[i] = byte(s)
		carry = carry>>8 + s>>8
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}

// offset returns a - p.base when a is in p and the offset fits in 64 bits.
func offset(p netip.Prefix, a netip.Addr) (uint64, bool) {
	if !p.Contains(a) {
		return 0, false
	}
	ab, bb := a.AsSlice(), p.Addr().AsSlice()
	var off uint64
	for i := range ab {
		d := ab[i] - bb[i]           // host bits only: the prefix bits are equal and base's host bits are 0
		if i < len(ab)-8 && d != 0 { // beyond 64 bits

			return 0, false
		}
		off = off<<8 | uint64(d)
	}
	return off, true
}

// ServiceAddr is the node's IPv4 service address (metadata, DNS proxy).
func (m *Manager) ServiceAddr() netip.Addr { return m.svc }

// ServiceAddr6 is the node's IPv6 service address.
func (m *Manager) ServiceAddr6() netip.Addr { return m.svc6 }

// Subnets are the sandboxes' IPv4 and IPv6 networks.
func (m *Manager) Subnets() (netip.Prefix, netip.Prefix) { return m.cfg.Subnet, m.cfg.Subnet6 }

// MaxSlot is the highest usable slot.
func (m *Manager) MaxSlot() int { return m.maxSlot }

// Table is the name of the inet nftables table this Manager owns.
func (m *Manager) Table() string { return m.cfg.Table }

// IfacePrefix is the prefix of every sandbox's host-side interface.
func (m *Manager) IfacePrefix() string { return m.cfg.Prefix }

// ServiceIf is the interface holding the service addresses ("" before Init).
func (m *Manager) ServiceIf() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.svcDev
}

// hostIf is slot's host-side interface name.
func (m *Manager) hostIf(slot int) string { return fmt.Sprintf("%s%04x", m.cfg.Prefix, slot) }

// SlotInUse reports whether slot's host-side interface exists: a sandbox
// (or a failed teardown) holds the slot.
func (m *Manager) SlotInUse(slot int) bool {
	_, err := netlink.LinkByName(m.hostIf(slot))
	var nf netlink.LinkNotFoundError
	return !errors.As(err, &nf) // any other answer: assume it is held
}

// slotOfIf parses a host-side interface name; ok is false for other names.
func (m *Manager) slotOfIf(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, m.cfg.Prefix)
	if !ok || len(rest) != 4 {
		return 0, false
	}
	s, err := strconv.ParseUint(rest, 16, 16)
	if err != nil || s < 1 || int(s) > m.maxSlot {
		return 0, false
	}
	return int(s), true
}

// Lookup returns the Net that Setup(ctx, id, slot) makes (for a restarted
// daemon). It does not check that it exists.
func (m *Manager) Lookup(id string, slot int) *Net {
	base := addN(m.cfg.Subnet.Addr(), uint64(slot)*4)
	base6 := addN(m.cfg.Subnet6.Addr(), uint64(slot)*4)
	return &Net{
		ID: id, Slot: slot,
		NetnsPath:  filepath.Join(m.cfg.NetnsDir, id),
		HostIf:     m.hostIf(slot),
		HostIP:     addN(base, 1),
		SandboxIP:  addN(base, 2),
		HostIP6:    addN(base6, 1),
		SandboxIP6: addN(base6, 2),
		UserNS:     m.userNS(id, slot),
	}
}

// SlotForAddr returns the slot whose sandbox address (IPv4 or IPv6) a is.
// Gateways, the service address and addresses outside the subnets are not
// sandbox addresses.
func (m *Manager) SlotForAddr(a netip.Addr) (int, bool) {
	a = a.Unmap()
	var off uint64
	var ok bool
	if a.Is4() {
		off, ok = offset(m.cfg.Subnet, a)
	} else {
		off, ok = offset(m.cfg.Subnet6, a)
	}
	if !ok || off%4 != 2 || off/4 < 1 || off/4 > uint64(m.maxSlot) {
		return 0, false
	}
	return int(off / 4), true
}

// retryDump runs a netlink dump again while the kernel reports it
// interrupted (the table changed meanwhile: other sandboxes come and go).
func retryDump(dump func() error) error {
	var err error
	for range 10 {
		if err = dump(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}

func validID(id string) bool {
	return id != "" && id != "." && id != ".." && len(id) <= 255 && !strings.ContainsAny(id, "/\x00")
}
