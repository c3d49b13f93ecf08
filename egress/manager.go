package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/periodic"
)

// Config configures a Manager. The zero value works for a node whose table
// is "chalk", whose DNS upstream is in /etc/resolv.conf, and that listens on
// ListenAddrs (required for the DNS proxy).
type Config struct {
	// Table is the inet nftables table holding chain "egress" (sandboxnet's).
	Table string
	// Upstream is the DNS server allowed names are forwarded to, host:port.
	// Default: the first nameserver of /etc/resolv.conf, port 53.
	Upstream string
	// ListenAddrs are the DNS proxy's addresses (ServiceAddr:DNSPort, IPv4
	// and IPv6), each served over UDP and TCP.
	ListenAddrs []string
	Logger      *slog.Logger
	Now         func() time.Time

	// NetNS is the path of the network namespace that holds the table, the
	// proxy's listeners and its upstream sockets ("" = the process's own;
	// tests run the node in a namespace of its own).
	NetNS string
	// MinTTL is the least time a DNS-learned address stays allowed
	// (default 60 s): addresses are allowed for max(TTL, MinTTL).
	MinTTL time.Duration
	// LogGroup is the NFLOG group of drop samples (default 4272).
	LogGroup uint16
	// LogRate is the number of drop samples per second and sandbox the
	// kernel sends (default 10, burst 2×). Every drop is counted regardless.
	LogRate uint64
	// Blackhole4 and Blackhole6 are what denied names resolve to: addresses
	// that every restricted sandbox drops (default 198.18.0.1, the benchmark
	// range of RFC 2544, and 100::1, the discard prefix of RFC 6666).
	Blackhole4, Blackhole6 netip.Addr
	// UpstreamTimeout bounds one upstream exchange (default 2 s).
	UpstreamTimeout time.Duration
	// DropRing is the number of distinct destinations Blocked keeps per
	// sandbox (default 256).
	DropRing int
	// Local answers names the node knows itself, for the sandbox asking
	// (nil: none). handled reports that qname is one of them: it is then
	// never forwarded upstream nor checked against the egress policy, and
	// no addresses means NXDOMAIN. The tunnels' <sandbox-id>.<tunnel>.tunnel.internal.
	Local func(sandboxID, qname string) (addrs []netip.Addr, handled bool)
	// MaxLearned bounds the DNS-learned addresses per sandbox (default
	// 16384); beyond it lookups of new addresses fail (SERVFAIL) until
	// entries expire.
	MaxLearned int
}

// Sandbox identifies one sandbox's network: its host-side interface and its
// addresses (the DNS proxy knows a sandbox by the query's source address).
type Sandbox struct {
	ID         string
	HostIf     string
	SandboxIP  netip.Addr
	SandboxIP6 netip.Addr
}

// Drop is one blocked destination in a sandbox's egress log. Count is the
// number of sampled drops (a lower bound: samples are rate-limited; see
// Dropped for the exact total). Proto "dns" records a denied name lookup.
type Drop struct {
	Time  time.Time
	Proto string
	Dst   string
	Port  int
	Name  string
	Count int64
}

// Manager enforces compiled rules for the sandboxes of one node.
type Manager struct {
	cfg    Config
	log    *slog.Logger
	nsFD   int
	nsFile *os.File
	up     *upstream

	mu       sync.Mutex
	conn     *nftables.Conn
	table    *nftables.Table
	dispatch *nftables.Set
	dnsPorts *nftables.Set
	next     uint32
	byID     map[string]*sbx
	byIP     map[netip.Addr]*sbx
	byN      map[uint32]*sbx
	inflight map[string]int        // forwarded DNS queries per sandbox ID
	adopted  map[string]adoptedSbx // left by a previous process, by sandbox ID
	started  bool
	stopping chan struct{}
	done     chan struct{}
	stats    stats
}

// adoptedSbx is a sandbox whose rules a previous process installed.
type adoptedSbx struct {
	n      uint32
	hostIf string
}

type sbx struct {
	Sandbox
	names     sbxNames
	rules     *Rules
	installed bool                    // chains and sets exist
	learned   map[netip.Addr]*learned // DNS-learned addresses in dns4/dns6
	recent    map[netip.Addr]string   // address -> name it was an answer for
	drops     []*Drop                 // most recent last
	logWindow time.Time
	logged    int
	seenNames map[string]struct{}     // learn mode: names resolved
	seenAddrs map[netip.Addr]struct{} // learn mode: addresses reached without DNS
}

// logPerSecond bounds the egress log lines of one sandbox.
const logPerSecond = 10

type learned struct {
	expires time.Time
	names   map[string]struct{}
}

// New validates cfg and returns a Manager; Start brings it up.
func New(cfg Config) (*Manager, error) {
	if cfg.Table == "" {
		cfg.Table = "chalk"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MinTTL <= 0 {
		cfg.MinTTL = 60 * time.Second
	}
	if cfg.LogGroup == 0 {
		cfg.LogGroup = 4272
	}
	if cfg.LogRate == 0 {
		cfg.LogRate = 10
	}
	if !cfg.Blackhole4.IsValid() {
		cfg.Blackhole4 = netip.MustParseAddr("198.18.0.1")
	}
	if !cfg.Blackhole6.IsValid() {
		cfg.Blackhole6 = netip.MustParseAddr("100::1")
	}
	if !cfg.Blackhole4.Is4() || !cfg.Blackhole6.Is6() || cfg.Blackhole6.Is4In6() {
		return nil, fmt.Errorf("egress: blackholes %s, %s: want an IPv4 and an IPv6 address: %w", cfg.Blackhole4, cfg.Blackhole6, errdefs.ErrInvalidArgument)
	}
	if cfg.UpstreamTimeout <= 0 {
		cfg.UpstreamTimeout = 2 * time.Second
	}
	if cfg.DropRing <= 0 {
		cfg.DropRing = 256
	}
	if cfg.MaxLearned <= 0 {
		cfg.MaxLearned = 16384
	}
	if cfg.Upstream == "" {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil || len(cc.Servers) == 0 {
			return nil, fmt.Errorf("egress: no Upstream and no nameserver in /etc/resolv.conf: %w", errdefs.ErrInvalidArgument)
		}
		cfg.Upstream = netip.AddrPortFrom(netip.MustParseAddr(cc.Servers[0]), 53).String()
	}
	for _, a := range append([]string{cfg.Upstream}, cfg.ListenAddrs...) {
		if _, err := netip.ParseAddrPort(a); err != nil {
			return nil, fmt.Errorf("egress: address %q: %v: %w", a, err, errdefs.ErrInvalidArgument)
		}
	}
	m := &Manager{
		cfg:      cfg,
		log:      cfg.Logger,
		byID:     map[string]*sbx{},
		byIP:     map[netip.Addr]*sbx{},
		byN:      map[uint32]*sbx{},
		inflight: map[string]int{},
		next:     1,
		adopted:  map[string]adoptedSbx{},
		done:     make(chan struct{}),
		stopping: make(chan struct{}),
	}
	m.table = &nftables.Table{Family: nftables.TableFamilyINet, Name: cfg.Table}
	return m, nil
}

// Start opens the nftables connection, installs the dispatch rule in chain
// "egress", starts the DNS proxy's listeners, the drop-log reader and the
// expiry loop. They stop when ctx ends. The table and chain "egress" must
// exist (sandboxnet creates them).
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.started {
		return fmt.Errorf("egress: already started: %w", errdefs.ErrFailedPrecondition)
	}
	if m.cfg.NetNS != "" {
		f, err := os.Open(m.cfg.NetNS)
		if err != nil {
			return fmt.Errorf("egress: netns %s: %w", m.cfg.NetNS, err)
		}
		m.nsFile, m.nsFD = f, int(f.Fd())
	}
	opts := []nftables.ConnOption{nftables.AsLasting()}
	if m.nsFD != 0 {
		opts = append(opts, nftables.WithNetNSFd(m.nsFD))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("egress: nftables: %w", err)
	}
	m.conn = conn
	if err := m.installBase(); err != nil {
		return err
	}
	m.up = &upstream{addr: m.cfg.Upstream, nsFD: m.nsFD, timeout: m.cfg.UpstreamTimeout}
	servers, err := m.listen()
	if err != nil {
		return err
	}
	nfl, err := dialNFLOG(m.nsFD, m.cfg.LogGroup, 128)
	if err != nil {
		for _, s := range servers {
			s.Shutdown()
		}
		return err
	}
	m.started = true
	go m.readDrops(nfl)
	go m.expireLoop(ctx)
	go func() {
		<-ctx.Done()
		close(m.stopping)
		for _, s := range servers {
			s.Shutdown()
		}
		nfl.Close()
		m.mu.Lock()
		m.conn.CloseLasting()
		if m.nsFile != nil {
			m.nsFile.Close()
		}
		m.mu.Unlock()
		close(m.done)
	}()
	return nil
}

// Done is closed when the Manager has stopped after its Start context
// ended: listeners closed, the NFLOG group released. The rules stay in the
// kernel (sandboxes keep their policies while chalkd restarts).
func (m *Manager) Done() <-chan struct{} { return m.done }

// installBase creates the node-wide sets and makes the dispatch rule the
// only rule of chain "egress". Per-sandbox objects a previous process left
// are adopted by index so that new ones do not collide with them.
func (m *Manager) installBase() error {
	chain, err := m.conn.ListChain(m.table, egressChain)
	if err != nil {
		return fmt.Errorf("egress: table inet %s chain %s (created by sandboxnet): %v: %w", m.cfg.Table, egressChain, err, errdefs.ErrFailedPrecondition)
	}
	m.dispatch = &nftables.Set{Table: m.table, Name: dispatchMap, KeyType: nftables.TypeIFName, DataType: nftables.TypeVerdict, IsMap: true}
	m.dnsPorts = &nftables.Set{Table: m.table, Name: dnsPortsSet, KeyType: nftables.TypeInetService, Constant: true}
	// Created once; a restarted process finds them (a constant set cannot be
	// added to again).
	if _, err := m.conn.GetSetByName(m.table, dispatchMap); err != nil {
		if err := m.conn.AddSet(m.dispatch, nil); err != nil {
			return err
		}
	}
	if _, err := m.conn.GetSetByName(m.table, dnsPortsSet); err != nil {
		if err := m.conn.AddSet(m.dnsPorts, []nftables.SetElement{{Key: port(53)}, {Key: port(853)}}); err != nil {
			return err
		}
	}
	if err := m.installBlocked(); err != nil {
		return err
	}
	m.conn.FlushChain(chain)
	m.conn.AddRule(&nftables.Rule{Table: m.table, Chain: chain, Exprs: dispatchRule()})
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("egress: install dispatch rule: %w", err)
	}
	return m.adopt()
}

// installBlocked queues the node-wide sets of blocked ranges, their
// elements replaced (a new version's list takes effect at Start).
func (m *Manager) installBlocked() error {
	v4, v6 := split(blockedPrefixes)
	for _, b := range []struct {
		set *nftables.Set
		els []nftables.SetElement
	}{
		{&nftables.Set{Table: m.table, Name: blocked4Set, KeyType: nftables.TypeIPAddr, Interval: true}, prefixElements(v4)},
		{&nftables.Set{Table: m.table, Name: blocked6Set, KeyType: nftables.TypeIP6Addr, Interval: true}, prefixElements(v6)},
	} {
		if _, err := m.conn.GetSetByName(m.table, b.set.Name); err != nil {
			if err := m.conn.AddSet(b.set, b.els); err != nil {
				return fmt.Errorf("egress: set %s: %w", b.set.Name, err)
			}
			continue
		}
		m.conn.FlushSet(b.set)
		if err := m.conn.SetAddElements(b.set, b.els); err != nil {
			return fmt.Errorf("egress: set %s: %w", b.set.Name, err)
		}
	}
	return nil
}

// adopt takes over the per-sandbox objects a previous process left: those
// the dispatch map still points to are kept (Apply for the same sandbox ID
// takes them over, Remove deletes them; see Adopted), the rest are deleted.
func (m *Manager) adopt() error {
	els, err := m.conn.GetSetElements(m.dispatch)
	if err != nil {
		return fmt.Errorf("egress: read %s: %w", dispatchMap, err)
	}
	keep := map[uint32]bool{}
	for _, el := range els {
		var (
			n  uint32
			id string
		)
		if _, err := fmt.Sscanf(el.Comment, "%d %s", &n, &id); err != nil {
			continue
		}
		m.adopted[id] = adoptedSbx{n: n, hostIf: strings.TrimRight(string(el.Key), "\x00")}
		keep[n] = true
		m.next = max(m.next, n+1)
	}
	chains, err := m.conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("egress: list chains: %w", err)
	}
	sets, err := m.conn.GetSets(m.table)
	if err != nil {
		return fmt.Errorf("egress: list sets: %w", err)
	}
	orphans := map[uint32]bool{}
	for _, c := range chains {
		if c.Table.Name != m.cfg.Table {
			continue
		}
		if n, ok := objectIndex(c.Name); ok {
			m.next = max(m.next, n+1)
			if !keep[n] {
				orphans[n] = true
			}
		}
	}
	for _, st := range sets {
		if n, ok := objectIndex(st.Name); ok {
			m.next = max(m.next, n+1)
			if !keep[n] {
				orphans[n] = true
			}
		}
	}
	if len(orphans) == 0 {
		return nil
	}
	present := map[string]bool{}
	for _, c := range chains {
		if c.Table.Name == m.cfg.Table {
			present[c.Name] = true
		}
	}
	for _, st := range sets {
		present[st.Name] = true
	}
	for n := range orphans {
		nm := namesFor(n)
		for _, c := range []string{nm.chain, nm.deny} {
			if present[c] {
				m.conn.FlushChain(&nftables.Chain{Table: m.table, Name: c})
			}
		}
		for _, c := range []string{nm.chain, nm.deny} {
			if present[c] {
				m.conn.DelChain(&nftables.Chain{Table: m.table, Name: c})
			}
		}
		for _, st := range []string{nm.cidr4, nm.cidr6, nm.dns4, nm.dns6} {
			if present[st] {
				m.conn.DelSet(&nftables.Set{Table: m.table, Name: st})
			}
		}
	}
	if err := m.conn.Flush(); err != nil {
		return fmt.Errorf("egress: delete orphaned sandbox objects: %w", err)
	}
	m.log.Info("egress: deleted orphaned sandbox rules", "count", len(orphans))
	return nil
}

// objectIndex reads n from the name of a per-sandbox chain or set.
func objectIndex(name string) (uint32, bool) {
	for _, p := range []string{"eg_", "egd_", "cidr4_", "cidr6_", "dns4_", "dns6_"} {
		if rest, ok := strings.CutPrefix(name, p); ok {
			n, err := strconv.ParseUint(rest, 10, 32)
			return uint32(n), err == nil
		}
	}
	return 0, false
}

// Adopted returns the IDs of sandboxes whose rules a previous process
// installed and that have not been applied or removed since: after a
// restart, Apply the live ones and Remove the others.
func (m *Manager) Adopted() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var ids []string
	for id := range m.adopted {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

func port(p uint16) []byte { return []byte{byte(p >> 8), byte(p)} }

// Apply installs or replaces the rules of one sandbox. A replacement is one
// nftables transaction and takes effect at once: addresses learned for names
// the new rules no longer allow are removed in it.
func (m *Manager) Apply(ctx context.Context, sb Sandbox, rules *Rules) error {
	if sb.ID == "" || sb.HostIf == "" || len(sb.HostIf) >= 16 {
		return fmt.Errorf("egress: sandbox %q interface %q: %w", sb.ID, sb.HostIf, errdefs.ErrInvalidArgument)
	}
	if rules == nil {
		return fmt.Errorf("egress: sandbox %q: nil rules: %w", sb.ID, errdefs.ErrInvalidArgument)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.started {
		return fmt.Errorf("egress: not started: %w", errdefs.ErrFailedPrecondition)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s := m.byID[sb.ID]
	adopted, wasAdopted := m.adopted[sb.ID]
	if s == nil {
		if wasAdopted {
			var err error
			if s, err = m.takeOver(sb.ID, adopted); err != nil {
				return err
			}
		} else {
			s = &sbx{names: namesFor(m.next), learned: map[netip.Addr]*learned{}, recent: map[netip.Addr]string{}}
			m.next++
		}
	}
	old := *s
	s.Sandbox, s.rules = sb, rules
	var err error
	// Every sandbox has a chain, unrestricted ones too: the blocked ranges
	// hold for all.
	switch {
	case !s.installed:
		m.evictInterface(sb.HostIf, sb.ID)
		err = m.install(s)
		if err == nil {
			s.installed = true
		}
	default:
		err = m.update(s, &old)
	}
	if err != nil {
		s.Sandbox, s.rules = old.Sandbox, old.rules
		if wasAdopted {
			m.adopted[sb.ID] = adopted // still the kernel's; try again or Remove
		}
		return fmt.Errorf("egress: apply rules of sandbox %s: %w", sb.ID, err)
	}
	if old.rules != nil {
		// Established connections were accepted before the update; end
		// those the new rules do not allow.
		if n, err := m.cutFlows(s); err != nil {
			m.log.Warn("egress: ending disallowed connections", "sandbox", sb.ID, "err", err)
		} else if n > 0 {
			m.log.Info("egress: ended connections the new policy disallows", "sandbox", sb.ID, "count", n)
		}
	}
	for _, a := range []netip.Addr{old.SandboxIP, old.SandboxIP6} {
		if a.IsValid() && m.byIP[a] == s {
			delete(m.byIP, a)
		}
	}
	m.byID[sb.ID], m.byN[s.names.n] = s, s
	for _, a := range []netip.Addr{sb.SandboxIP, sb.SandboxIP6} {
		if a.IsValid() {
			m.byIP[a.Unmap()] = s
		}
	}
	m.log.Debug("egress rules applied", "sandbox", sb.ID, "policy", rules.Hash())
	return nil
}

// evictInterface queues the removal of the rules of other sandboxes that
// still hold hostIf (a slot reused before the previous sandbox's Remove), so
// that the new sandbox's dispatch element can take its place in the same
// transaction.
func (m *Manager) evictInterface(hostIf, id string) {
	for oid, o := range m.byID {
		if oid != id && o.installed && o.HostIf == hostIf {
			m.log.Warn("egress: interface reused before its sandbox was removed", "interface", hostIf, "old", oid, "new", id)
			m.teardown(o, o.HostIf)
			o.installed = false
			clear(o.learned)
		}
	}
	for oid, a := range m.adopted {
		if oid != id && a.hostIf == hostIf {
			m.teardown(&sbx{names: namesFor(a.n), Sandbox: Sandbox{ID: oid, HostIf: a.hostIf}}, a.hostIf)
			delete(m.adopted, oid)
		}
	}
}

// takeOver turns an adopted sandbox into a managed one, reading back the
// addresses it had learned (their names are in the elements' comments).
func (m *Manager) takeOver(id string, a adoptedSbx) (*sbx, error) {
	s := &sbx{names: namesFor(a.n), installed: true, learned: map[netip.Addr]*learned{}, recent: map[netip.Addr]string{}}
	s.ID, s.HostIf = id, a.hostIf
	_, _, dns4, dns6 := sandboxSets(m.table, s.names)
	now := m.cfg.Now()
	for _, set := range []*nftables.Set{dns4, dns6} {
		els, err := m.conn.GetSetElements(set)
		if err != nil {
			return nil, fmt.Errorf("egress: sandbox %s: read %s: %w", id, set.Name, err)
		}
		for _, el := range els {
			addr, ok := netip.AddrFromSlice(el.Key)
			if !ok || el.Comment == "" {
				continue
			}
			l := &learned{expires: now.Add(el.Expires), names: map[string]struct{}{}}
			for n := range strings.SplitSeq(el.Comment, ",") {
				l.names[n] = struct{}{}
			}
			s.learned[addr] = l
		}
	}
	delete(m.adopted, id)
	return s, nil
}

// chainRules are the rules of the sandbox's chain eg_<n>.
func (m *Manager) chainRules(s *sbx) [][]expr.Any {
	switch {
	case s.rules.Learn():
		return learnRules(s.names, m.cfg.LogGroup, m.cfg.LogRate, uint32(2*m.cfg.LogRate))
	case s.rules.AllowAll():
		return allowAllRules(s.names)
	}
	return sandboxRules(s.names, m.blackholesAllowed(s.rules))
}

// blackholesAllowed are the blackhole addresses a CIDR entry would accept
// (they need an explicit drop rule).
func (m *Manager) blackholesAllowed(r *Rules) []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{m.cfg.Blackhole4, m.cfg.Blackhole6} {
		if r.MatchAddr(a) {
			out = append(out, a)
		}
	}
	return out
}

func (m *Manager) install(s *sbx) error {
	t := m.table
	cidr4, cidr6, dns4, dns6 := sandboxSets(t, s.names)
	v4, v6 := split(s.rules.allowedPrefixes())
	for _, st := range []struct {
		set *nftables.Set
		els []nftables.SetElement
	}{{cidr4, prefixElements(v4)}, {cidr6, prefixElements(v6)}, {dns4, nil}, {dns6, nil}} {
		if err := m.conn.AddSet(st.set, st.els); err != nil {
			return err
		}
	}
	chain := m.conn.AddChain(&nftables.Chain{Table: t, Name: s.names.chain})
	deny := m.conn.AddChain(&nftables.Chain{Table: t, Name: s.names.deny})
	for _, r := range denyRules(s.names, m.cfg.LogGroup, m.cfg.LogRate, uint32(2*m.cfg.LogRate)) {
		m.conn.AddRule(&nftables.Rule{Table: t, Chain: deny, Exprs: r})
	}
	for _, r := range m.chainRules(s) {
		m.conn.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: r})
	}
	if err := m.conn.SetAddElements(m.dispatch, []nftables.SetElement{dispatchElement(s, s.HostIf)}); err != nil {
		return err
	}
	if err := m.conn.Flush(); err != nil {
		// Undo what part of the batch may have left (a batch is atomic, so
		// normally nothing).
		m.teardown(s, s.HostIf)
		_ = m.conn.Flush()
		return err
	}
	return nil
}

// dispatchElement maps a sandbox's interface to its chain; the comment
// ("<n> <sandbox ID>") lets a restarted process adopt it.
func dispatchElement(s *sbx, hostIf string) nftables.SetElement {
	return nftables.SetElement{Key: ifname(hostIf), VerdictData: &expr.Verdict{Kind: expr.VerdictGoto, Chain: s.names.chain},
		Comment: fmt.Sprintf("%d %s", s.names.n, s.ID)}
}

// update replaces the CIDR sets and rules of an installed sandbox and drops
// learned addresses that no allowed name vouches for any more.
func (m *Manager) update(s *sbx, old *sbx) error {
	t := m.table
	cidr4, cidr6, dns4, dns6 := sandboxSets(t, s.names)
	v4, v6 := split(s.rules.allowedPrefixes())
	m.conn.FlushSet(cidr4)
	m.conn.FlushSet(cidr6)
	if els := prefixElements(v4); len(els) > 0 {
		if err := m.conn.SetAddElements(cidr4, els); err != nil {
			return err
		}
	}
	if els := prefixElements(v6); len(els) > 0 {
		if err := m.conn.SetAddElements(cidr6, els); err != nil {
			return err
		}
	}
	chain := &nftables.Chain{Table: t, Name: s.names.chain}
	m.conn.FlushChain(chain)
	for _, r := range m.chainRules(s) {
		m.conn.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: r})
	}
	if old.HostIf != s.HostIf {
		if err := m.conn.SetDeleteElements(m.dispatch, []nftables.SetElement{dispatchElement(s, old.HostIf)}); err != nil {
			return err
		}
		if err := m.conn.SetAddElements(m.dispatch, []nftables.SetElement{dispatchElement(s, s.HostIf)}); err != nil {
			return err
		}
	}
	now := m.cfg.Now()
	var del4, del6 []nftables.SetElement
	var stale []netip.Addr
	for a, l := range s.learned {
		for n := range l.names {
			if !s.rules.MatchName(n) {
				delete(l.names, n)
			}
		}
		if len(l.names) > 0 && m.addrAllowed(s.rules, a) {
			continue
		}
		stale = append(stale, a)
		if l.expires.Before(now) {
			continue // the kernel has let it go already
		}
		if a.Is4() {
			del4 = append(del4, nftables.SetElement{Key: a.AsSlice()})
		} else {
			del6 = append(del6, nftables.SetElement{Key: a.AsSlice()})
		}
	}
	if len(del4) > 0 {
		if err := m.conn.SetDeleteElements(dns4, del4); err != nil {
			return err
		}
	}
	if len(del6) > 0 {
		if err := m.conn.SetDeleteElements(dns6, del6); err != nil {
			return err
		}
	}
	if err := m.conn.Flush(); err != nil {
		if len(del4)+len(del6) == 0 {
			return err
		}
		// An element may have expired in the kernel between our bookkeeping
		// and the batch: flush both DNS sets instead (names re-resolve).
		m.log.Warn("egress: removing learned addresses failed; flushing learned sets", "sandbox", s.ID, "err", err)
		return m.updateFlushingLearned(s, old)
	}
	for _, a := range stale {
		delete(s.learned, a)
	}
	return nil
}

func (m *Manager) updateFlushingLearned(s *sbx, old *sbx) error {
	clear(s.learned)
	_, _, dns4, dns6 := sandboxSets(m.table, s.names)
	m.conn.FlushSet(dns4)
	m.conn.FlushSet(dns6)
	if err := m.conn.Flush(); err != nil {
		return err
	}
	return m.update(s, old)
}

// teardown queues the removal of a sandbox's chains and sets.
func (m *Manager) teardown(s *sbx, hostIf string) {
	t := m.table
	_ = m.conn.SetDeleteElements(m.dispatch, []nftables.SetElement{dispatchElement(s, hostIf)})
	chain := &nftables.Chain{Table: t, Name: s.names.chain}
	deny := &nftables.Chain{Table: t, Name: s.names.deny}
	m.conn.FlushChain(chain)
	m.conn.FlushChain(deny)
	m.conn.DelChain(chain)
	m.conn.DelChain(deny)
	cidr4, cidr6, dns4, dns6 := sandboxSets(t, s.names)
	for _, set := range []*nftables.Set{cidr4, cidr6, dns4, dns6} {
		m.conn.DelSet(set)
	}
}

// Remove deletes a sandbox's rules and sets. It is idempotent.
func (m *Manager) Remove(ctx context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.byID[id]
	if s == nil {
		a, ok := m.adopted[id]
		if !ok {
			return nil
		}
		s = &sbx{names: namesFor(a.n), installed: true}
		s.ID, s.HostIf = id, a.hostIf
		m.teardown(s, s.HostIf)
		if err := m.conn.Flush(); err != nil {
			return fmt.Errorf("egress: remove adopted rules of sandbox %s: %w", id, err)
		}
		delete(m.adopted, id)
		return nil
	}
	if s.installed {
		m.teardown(s, s.HostIf)
		if err := m.conn.Flush(); err != nil {
			return fmt.Errorf("egress: remove rules of sandbox %s: %w", id, err)
		}
	}
	delete(m.byID, id)
	delete(m.byN, s.names.n)
	for _, a := range []netip.Addr{s.SandboxIP, s.SandboxIP6} {
		if a.IsValid() && m.byIP[a.Unmap()] == s {
			delete(m.byIP, a.Unmap())
		}
	}
	return nil
}

// Blocked returns a sandbox's recent blocked destinations, oldest first.
func (m *Manager) Blocked(id string) []Drop {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.byID[id]
	if s == nil {
		return nil
	}
	out := make([]Drop, len(s.drops))
	for i, d := range s.drops {
		out[i] = *d
	}
	return out
}

// Dropped returns the exact number of packets the sandbox's rules dropped
// (the kernel's counter).
func (m *Manager) Dropped(ctx context.Context, id string) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.byID[id]
	if s == nil {
		return 0, fmt.Errorf("egress: sandbox %q: %w", id, errdefs.ErrNotFound)
	}
	if !s.installed {
		return 0, nil
	}
	rules, err := m.conn.GetRules(m.table, &nftables.Chain{Table: m.table, Name: s.names.deny})
	if err != nil {
		return 0, fmt.Errorf("egress: read drop counter of sandbox %s: %w", id, err)
	}
	for _, r := range rules {
		for _, e := range r.Exprs {
			if c, ok := e.(*expr.Counter); ok {
				return int64(c.Packets), nil
			}
		}
	}
	return 0, fmt.Errorf("egress: sandbox %s: drop counter missing: %w", id, errdefs.ErrNotFound)
}

// Policy returns the hash of the rules applied to a sandbox.
func (m *Manager) Policy(id string) (string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.byID[id]; s != nil {
		return s.rules.Hash(), true
	}
	return "", false
}

// recordDrop adds one sample to a sandbox's ring; callers hold m.mu.
func (m *Manager) recordDrop(s *sbx, d Drop) {
	for i, o := range s.drops {
		if o.Proto == d.Proto && o.Dst == d.Dst && o.Port == d.Port && o.Name == d.Name {
			o.Count++
			o.Time = d.Time
			s.drops = append(slices.Delete(s.drops, i, i+1), o)
			return
		}
	}
	d.Count = 1
	s.drops = append(s.drops, &d)
	if len(s.drops) > m.cfg.DropRing {
		s.drops = slices.Delete(s.drops, 0, len(s.drops)-m.cfg.DropRing)
	}
	// Logged once per destination while it stays in the ring (repeats only
	// raise the count), and at most logPerSecond lines a second per sandbox.
	if d.Time.Sub(s.logWindow) >= time.Second {
		s.logWindow, s.logged = d.Time, 0
	}
	if s.logged < logPerSecond {
		s.logged++
		m.log.Info("egress blocked", "sandbox", s.ID, "proto", d.Proto, "dst", d.Dst, "port", d.Port, "name", d.Name)
	}
}

func (m *Manager) readDrops(l *nflog) {
	for {
		pkts, err := l.receive()
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				// The kernel dropped samples while we were slow; the
				// counters still have every drop.
				m.log.Debug("egress: drop log overrun")
				continue
			}
			select {
			case <-m.stopping:
			default:
				m.log.Warn("egress: drop log reader stopped", "err", err)
			}
			return
		}
		now := m.cfg.Now()
		m.mu.Lock()
		for _, p := range pkts {
			n, learn, ok := sandboxIndex(p.prefix)
			if !ok {
				continue
			}
			s := m.byN[n]
			info, err := parsePacket(p.payload)
			if s == nil || err != nil {
				continue
			}
			if learn {
				s.observe(info)
				continue
			}
			m.recordDrop(s, Drop{Time: now, Proto: info.proto, Dst: info.dst.String(), Port: info.port, Name: s.recent[info.dst]})
		}
		m.mu.Unlock()
	}
}

// expireLoop forgets learned addresses the kernel has expired.
func (m *Manager) expireLoop(ctx context.Context) {
	periodic.WhileLeading(ctx, time.Second, nil, func() {
		now := m.cfg.Now()
		m.mu.Lock()
		for _, s := range m.byID {
			for a, l := range s.learned {
				if !l.expires.After(now) {
					delete(s.learned, a)
				}
			}
		}
		m.mu.Unlock()
	})
}
