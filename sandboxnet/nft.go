package sandboxnet

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// Names of the nftables objects in the table.
const (
	// ChainEgress is the regular chain the egress package fills (see the
	// package doc for the contract).
	ChainEgress = "egress"

	chainSpoof       = "spoof"
	chainPrerouting  = "prerouting"
	chainPostrouting = "postrouting"
	chainForward     = "forward"
	chainInput       = "input"
	chainOutput      = "output"
	setSrc4          = "src4"
	setSrc6          = "src6"
)

// MetadataAddr is the address sandboxes reach the metadata service at.
var MetadataAddr = netip.MustParseAddr("169.254.169.254")

// ICMPv6 neighbour discovery types accepted from sandboxes.
const (
	icmp6NeighbourSolicitation  = 135
	icmp6NeighbourAdvertisement = 136
)

// ifname pads an interface name to the 16 bytes nftables compares.
func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// Expression helpers: each is a short sequence, pinned byte for byte by the
// unit tests.

// iifPrefix matches input interfaces whose name starts with prefix
// (a comparison of only len(prefix) bytes is nft's "iifname prefix*").
func iifPrefix(prefix string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)},
	}
}

// oifPrefix matches (eq) or excludes (!eq) output interfaces by prefix.
func oifPrefix(prefix string, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte(prefix)},
	}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// icmp6Type matches the ICMPv6 type (the caller has matched l4proto icmpv6).
func icmp6Type(t byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{t}},
	}
}

// addrOffset is the offset and length of the source or destination address
// in the network header.
func addrOffset(v6, src bool) (off, l uint32) {
	switch {
	case v6 && src:
		return 8, 16
	case v6:
		return 24, 16
	case src:
		return 12, 4
	default:
		return 16, 4
	}
}

// addrMasked matches the source or destination address: (addr & mask) == want.
// A full mask is a plain comparison.
func addrMasked(src bool, mask []byte, want netip.Addr) []expr.Any {
	off, l := addrOffset(want.Is6(), src)
	out := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l}}
	full := true
	for _, b := range mask {
		full = full && b == 0xff
	}
	if !full {
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: l, Mask: mask, Xor: make([]byte, l)})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: want.AsSlice()})
}

// addrIn matches a source or destination address in p.
func addrIn(p netip.Prefix, src bool) []expr.Any {
	return addrMasked(src, ipprefix.IPNet(p).Mask, p.Masked().Addr())
}

// gatewayDst matches a destination that is the host side (base+1) of any
// slot's block of four in p (slot 0's is the service address).
func gatewayDst(p netip.Prefix) []expr.Any {
	mask := []byte(ipprefix.IPNet(p).Mask)
	mask[len(mask)-1] |= 3
	return addrMasked(false, mask, addN(p.Masked().Addr(), 1))
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
	}
}

// notRootSocket matches packets of local sockets owned by a uid other than
// 0 (packets without a socket, which the kernel sends itself, do not match).
func notRootSocket() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func counted(k expr.VerdictKind) []expr.Any {
	return []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: k}}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// antiSpoof drops packets from a sandbox interface whose (interface, source
// address) pair is not in set: nft's
//
//	iifname "cx*" meta nfproto ipv4 iifname . ip saddr != @src4 counter drop
func antiSpoof(prefix string, v6 bool, set *nftables.Set) []expr.Any {
	proto := byte(unix.NFPROTO_IPV4)
	if v6 {
		proto = unix.NFPROTO_IPV6
	}
	off, l := addrOffset(v6, true)
	return cat(iifPrefix(prefix), nfproto(proto), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: true},
	}, counted(expr.VerdictDrop))
}

// dnat rewrites the destination to addr:port.
func dnat(addr netip.Addr, port uint16) []expr.Any {
	fam := uint32(unix.NFPROTO_IPV4)
	if addr.Is6() {
		fam = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: addr.AsSlice()},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: fam, RegAddrMin: 1, RegProtoMin: 2, Specified: true},
	}
}

// ruleset is every rule of the table's base chains, by chain, in order.
func (m *Manager) ruleset(src4, src6 *nftables.Set) map[string][][]expr.Any {
	p := m.cfg.Prefix
	const (
		v4, v6   = byte(unix.NFPROTO_IPV4), byte(unix.NFPROTO_IPV6)
		tcp, udp = byte(unix.IPPROTO_TCP), byte(unix.IPPROTO_UDP)
		icmp6    = byte(unix.IPPROTO_ICMPV6)
	)
	linkLocal := netip.MustParsePrefix("fe80::/10")
	linkLocal4 := netip.MustParsePrefix("169.254.0.0/16")
	unspecified := netip.PrefixFrom(netip.IPv6Unspecified(), 128)
	spoof := [][]expr.Any{
		// Neighbour discovery from link-local or unspecified sources (never forwarded).
		cat(iifPrefix(p), nfproto(v6), l4proto(icmp6), addrIn(linkLocal, true), verdict(expr.VerdictAccept)),
		cat(iifPrefix(p), nfproto(v6), l4proto(icmp6), addrIn(unspecified, true), verdict(expr.VerdictAccept)),
		antiSpoof(p, false, src4),
		antiSpoof(p, true, src6),
	}

	pre := [][]expr.Any{
		cat(iifPrefix(p), nfproto(v4), addrIn(netip.PrefixFrom(MetadataAddr, 32), false), l4proto(tcp), dport(80), dnat(m.svc, m.cfg.MetadataPort)),
	}
	if m.cfg.DNSPort != 0 {
		for _, proto := range []byte{udp, tcp} {
			pre = append(pre,
				cat(iifPrefix(p), nfproto(v4), gatewayDst(m.cfg.Subnet), l4proto(proto), dport(53), dnat(m.svc, m.cfg.DNSPort)),
				cat(iifPrefix(p), nfproto(v6), gatewayDst(m.cfg.Subnet6), l4proto(proto), dport(53), dnat(m.svc6, m.cfg.DNSPort)))
		}
	}

	post := [][]expr.Any{
		cat(nfproto(v4), addrIn(m.cfg.Subnet, true), oifPrefix(p, false), []expr.Any{&expr.Masq{}}),
		cat(nfproto(v6), addrIn(m.cfg.Subnet6, true), oifPrefix(p, false), []expr.Any{&expr.Masq{}}),
	}

	fwd := [][]expr.Any{
		cat(ctEstablished(), verdict(expr.VerdictAccept)),
		cat(iifPrefix(p), oifPrefix(p, true), counted(expr.VerdictDrop)), // sandbox → sandbox
		cat(oifPrefix(p, true), counted(expr.VerdictDrop)),               // unsolicited → sandbox
		// Link-local destinations beyond the node (a cloud's instance metadata,
		// DNS and time services) are the node's, not the sandboxes'.
		cat(iifPrefix(p), nfproto(v4), addrIn(linkLocal4, false), counted(expr.VerdictDrop)),
	}
	for _, r := range m.cfg.Reserved {
		fam := v4
		if r.Addr().Is6() {
			fam = v6
		}
		fwd = append(fwd, cat(iifPrefix(p), nfproto(fam), addrIn(r, false), counted(expr.VerdictDrop)))
	}
	fwd = append(fwd,
		cat(iifPrefix(p), []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainEgress}}),
		cat(iifPrefix(p), verdict(expr.VerdictAccept)),
	)

	in := [][]expr.Any{
		cat(iifPrefix(p), ctEstablished(), verdict(expr.VerdictAccept)),
		cat(iifPrefix(p), nfproto(v6), l4proto(icmp6), icmp6Type(icmp6NeighbourSolicitation), verdict(expr.VerdictAccept)),
		cat(iifPrefix(p), nfproto(v6), l4proto(icmp6), icmp6Type(icmp6NeighbourAdvertisement), verdict(expr.VerdictAccept)),
	}
	for _, port := range m.ports {
		for _, proto := range []byte{tcp, udp} {
			in = append(in,
				cat(iifPrefix(p), nfproto(v4), addrIn(netip.PrefixFrom(m.svc, 32), false), l4proto(proto), dport(port), verdict(expr.VerdictAccept)),
				cat(iifPrefix(p), nfproto(v6), addrIn(netip.PrefixFrom(m.svc6, 128), false), l4proto(proto), dport(port), verdict(expr.VerdictAccept)))
		}
	}
	in = append(in, cat(iifPrefix(p), counted(expr.VerdictDrop)))

	// The node's own sockets toward sandboxes: root's (chalkd: the ingress
	// dials exposed ports) may open connections; other local users' may
	// not, so a sandbox port is reachable from the node only through the
	// ingress. Replies to connections sandboxes opened (metadata, DNS) pass.
	out := [][]expr.Any{
		cat(oifPrefix(p, true), ctEstablished(), verdict(expr.VerdictAccept)),
		cat(oifPrefix(p, true), notRootSocket(), counted(expr.VerdictDrop)),
	}
	return map[string][][]expr.Any{chainSpoof: spoof, chainPrerouting: pre, chainPostrouting: post, chainForward: fwd, chainInput: in, chainOutput: out}
}

func (m *Manager) table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: m.cfg.Table}
}

func (m *Manager) sets() (*nftables.Set, *nftables.Set) {
	t := m.table()
	return &nftables.Set{Table: t, Name: setSrc4, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr), Concatenation: true},
		&nftables.Set{Table: t, Name: setSrc6, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIP6Addr), Concatenation: true}
}

// baseChains are the hooked chains, in the order they are created.
func (m *Manager) baseChains() []*nftables.Chain {
	t := m.table()
	accept := nftables.ChainPolicyAccept
	return []*nftables.Chain{
		{Name: chainSpoof, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw, Policy: &accept},
		{Name: chainPrerouting, Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest},
		{Name: chainPostrouting, Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource},
		{Name: chainForward, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept},
		{Name: chainInput, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept},
		{Name: chainOutput, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &accept},
	}
}

// installTable creates the table, or replaces the rules of its base chains,
// in one transaction; the sets' elements and chain "egress" are kept.
func (m *Manager) installTable() error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := m.conn()
	if err != nil {
		return err
	}
	t := c.AddTable(m.table())
	src4, src6 := m.sets()
	if existing, err := c.GetSetByName(t, setSrc4); err == nil {
		src4 = existing
	} else if err := c.AddSet(src4, nil); err != nil {
		return fmt.Errorf("set %s: %w", setSrc4, err)
	}
	if existing, err := c.GetSetByName(t, setSrc6); err == nil {
		src6 = existing
	} else if err := c.AddSet(src6, nil); err != nil {
		return fmt.Errorf("set %s: %w", setSrc6, err)
	}
	c.AddChain(&nftables.Chain{Name: ChainEgress, Table: t}) // no NLM_F_EXCL: an existing chain keeps its rules
	rules := m.ruleset(src4, src6)
	for _, ch := range m.baseChains() {
		c.AddChain(ch)
		c.FlushChain(ch)
		for _, exprs := range rules[ch.Name] {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: exprs})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables table inet %s: %w", m.cfg.Table, err)
	}
	return nil
}

// sourceElements are the anti-spoofing set elements of n.
func sourceElements(n *Net) (e4, e6 []nftables.SetElement) {
	return []nftables.SetElement{{Key: append(ifname(n.HostIf), n.SandboxIP.AsSlice()...)}},
		[]nftables.SetElement{{Key: append(ifname(n.HostIf), n.SandboxIP6.AsSlice()...)}}
}

// conn returns the Manager's lasting nf_tables connection (nftMu held).
func (m *Manager) conn() (*nftables.Conn, error) {
	if m.nft == nil {
		c, err := nftables.New(nftables.AsLasting())
		if err != nil {
			return nil, fmt.Errorf("nftables: %w", err)
		}
		m.nft = c
	}
	return m.nft, nil
}

// closeConn drops the lasting connection (nftMu held).
func (m *Manager) closeConn() {
	if m.nft != nil {
		_ = m.nft.CloseLasting()
		m.nft = nil
	}
}

// setSource adds (or removes) the sandbox's (interface, address) pairs in
// one transaction. Removing missing elements is not an error.
func (m *Manager) setSource(n *Net, add bool) error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := m.conn()
	if err != nil {
		return err
	}
	src4, src6 := m.sets()
	e4, e6 := sourceElements(n)
	op := c.SetAddElements
	if !add {
		op = c.SetDeleteElements
	}
	if err := errors.Join(op(src4, e4), op(src6, e6)); err != nil {
		return err
	}
	err = c.Flush()
	if err == nil || add || !errors.Is(err, unix.ENOENT) {
		return err
	}
	// An element was missing, so the transaction did nothing: delete the
	// elements one at a time.
	var errs []error
	for _, d := range []struct {
		s *nftables.Set
		e []nftables.SetElement
	}{{src4, e4}, {src6, e6}} {
		if err := c.SetDeleteElements(d.s, d.e); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sourceInterfaces lists the interface names in the anti-spoofing sets.
func (m *Manager) sourceInterfaces() ([]string, error) {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := m.conn()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, name := range []string{setSrc4, setSrc6} {
		set, err := c.GetSetByName(m.table(), name)
		if err != nil {
			return nil, fmt.Errorf("set %s: %w", name, err)
		}
		elems, err := c.GetSetElements(set)
		if err != nil {
			return nil, fmt.Errorf("set %s elements: %w", name, err)
		}
		for _, e := range elems {
			if len(e.Key) < 16 {
				continue
			}
			k := e.Key[:16]
			for i, b := range k {
				if b == 0 {
					k = k[:i]
					break
				}
			}
			if !seen[string(k)] {
				seen[string(k)] = true
				out = append(out, string(k))
			}
		}
	}
	return out, nil
}
