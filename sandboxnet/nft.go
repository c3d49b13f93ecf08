package sandboxnet

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names of the nftables objects in the table.
const (
	ChainEgress = "egress"
	setSrc4     = "src4"
	setSrc6     = "src6"
	metadataIP  = "169.254.169.254"
)

// ifname pads an interface name to the 16 bytes nftables compares.
func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// Expression helpers (each a short sequence, unit-tested byte for byte).

func iifPrefix(prefix string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)},
	}
}

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

// addrMatch matches the source (src) or destination address against p.
func addrMatch(p netip.Prefix, src bool) []expr.Any {
	var off, l uint32 = 16, 4
	if src {
		off = 12
	}
	if p.Addr().Is6() {
		off, l = 24, 16
		if src {
			off = 8
		}
	}
	out := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l}}
	if p.Bits() != p.Addr().BitLen() {
		mask := prefixNet(p).Mask
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: l, Mask: mask, Xor: make([]byte, l)})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()})
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

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// antiSpoof drops packets from a sandbox interface whose (interface, source)
// pair is not in the set.
func antiSpoof(prefix string, v6 bool, set *nftables.Set) []expr.Any {
	proto, off, l := byte(unix.NFPROTO_IPV4), uint32(12), uint32(4)
	if v6 {
		proto, off, l = unix.NFPROTO_IPV6, 8, 16
	}
	return cat(iifPrefix(prefix), nfproto(proto), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Payload{DestRegister: 2, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: l},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: true},
		&expr.Counter{},
		verdict(expr.VerdictDrop),
	})
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

// ruleset is every rule of the table, by chain, for the manager's config.
func (m *Manager) ruleset(src4, src6 *nftables.Set) map[string][][]expr.Any {
	p := m.cfg.Prefix
	meta := netip.PrefixFrom(netip.MustParseAddr(metadataIP), 32)
	pre := [][]expr.Any{
		cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV4), addrMatch(meta, false), l4proto(unix.IPPROTO_TCP), dport(80), dnat(m.svc, m.cfg.MetadataPort)),
	}
	if m.cfg.DNSPort != 0 {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			pre = append(pre,
				cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV4), addrMatch(m.cfg.Subnet, false), l4proto(proto), dport(53), dnat(m.svc, m.cfg.DNSPort)),
				cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV6), addrMatch(m.cfg.Subnet6, false), l4proto(proto), dport(53), dnat(m.svc6, m.cfg.DNSPort)))
		}
	}
	post := [][]expr.Any{
		cat(nfproto(unix.NFPROTO_IPV4), addrMatch(m.cfg.Subnet, true), oifPrefix(p, false), []expr.Any{&expr.Masq{}}),
		cat(nfproto(unix.NFPROTO_IPV6), addrMatch(m.cfg.Subnet6, true), oifPrefix(p, false), []expr.Any{&expr.Masq{}}),
	}
	fwd := [][]expr.Any{
		antiSpoof(p, false, src4),
		antiSpoof(p, true, src6),
		cat(ctEstablished(), []expr.Any{verdict(expr.VerdictAccept)}),
		cat(iifPrefix(p), oifPrefix(p, true), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)}),
		cat(iifPrefix(p), []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainEgress}}),
	}
	in := [][]expr.Any{
		cat(iifPrefix(p), ctEstablished(), []expr.Any{verdict(expr.VerdictAccept)}),
		// IPv6 neighbour discovery toward the gateway.
		cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV6), l4proto(unix.IPPROTO_ICMPV6), []expr.Any{verdict(expr.VerdictAccept)}),
	}
	ports := append([]uint16{m.cfg.MetadataPort}, m.cfg.ServicePorts...)
	if m.cfg.DNSPort != 0 {
		ports = append(ports, m.cfg.DNSPort)
	}
	seen := map[uint16]bool{}
	for _, port := range ports {
		if seen[port] {
			continue
		}
		seen[port] = true
		for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			in = append(in,
				cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV4), addrMatch(netip.PrefixFrom(m.svc, 32), false), l4proto(proto), dport(port), []expr.Any{verdict(expr.VerdictAccept)}),
				cat(iifPrefix(p), nfproto(unix.NFPROTO_IPV6), addrMatch(netip.PrefixFrom(m.svc6, 128), false), l4proto(proto), dport(port), []expr.Any{verdict(expr.VerdictAccept)}))
		}
	}
	in = append(in, cat(iifPrefix(p), []expr.Any{&expr.Counter{}, verdict(expr.VerdictDrop)}))
	return map[string][][]expr.Any{"prerouting": pre, "postrouting": post, "forward": fwd, "input": in}
}

func (m *Manager) table() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: m.cfg.Table}
}

func (m *Manager) sets() (*nftables.Set, *nftables.Set) {
	t := m.table()
	return &nftables.Set{Table: t, Name: setSrc4, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr), Concatenation: true},
		&nftables.Set{Table: t, Name: setSrc6, KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIP6Addr), Concatenation: true}
}

// installTable creates the table (or refreshes its base chains' rules),
// keeping the sets' elements and the egress chain's rules.
func (m *Manager) installTable() error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := c.AddTable(m.table())
	src4, src6 := m.sets()
	existing4, _ := c.GetSetByName(t, setSrc4)
	if existing4 == nil {
		if err := c.AddSet(src4, nil); err != nil {
			return err
		}
		if err := c.AddSet(src6, nil); err != nil {
			return err
		}
	} else {
		src4 = existing4
		if src6, err = c.GetSetByName(t, setSrc6); err != nil {
			return err
		}
	}
	c.AddChain(&nftables.Chain{Name: ChainEgress, Table: t})
	policy := nftables.ChainPolicyAccept
	chains := map[string]*nftables.Chain{
		"prerouting":  {Name: "prerouting", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest},
		"postrouting": {Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource},
		"forward":     {Name: "forward", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy},
		"input":       {Name: "input", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &policy},
	}
	for _, name := range []string{"prerouting", "postrouting", "forward", "input"} {
		ch := c.AddChain(chains[name])
		c.FlushChain(ch)
	}
	for name, rules := range m.ruleset(src4, src6) {
		for _, exprs := range rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: chains[name], Exprs: exprs})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables table %s: %w", m.cfg.Table, err)
	}
	return nil
}

// setSource adds (or removes) the sandbox's (interface, address) pairs.
func (m *Manager) setSource(n *Net, add bool) error {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	src4, src6 := m.sets()
	e4 := []nftables.SetElement{{Key: append(ifname(n.HostIf), n.SandboxIP.AsSlice()...)}}
	e6 := []nftables.SetElement{{Key: append(ifname(n.HostIf), n.SandboxIP6.AsSlice()...)}}
	if add {
		if err := c.SetAddElements(src4, e4); err != nil {
			return err
		}
		if err := c.SetAddElements(src6, e6); err != nil {
			return err
		}
		return c.Flush()
	}
	// Delete one at a time so a missing element does not stop the other.
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

// sourceElements lists the interface names in the anti-spoofing set.
func (m *Manager) sourceElements() ([]string, error) {
	m.nftMu.Lock()
	defer m.nftMu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	set, err := c.GetSetByName(m.table(), setSrc4)
	if err != nil {
		return nil, err
	}
	elems, err := c.GetSetElements(set)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range elems {
		if len(e.Key) >= 16 {
			name := string(e.Key[:16])
			for i := 0; i < len(name); i++ {
				if name[i] == 0 {
					name = name[:i]
					break
				}
			}
			out = append(out, name)
		}
	}
	return out, nil
}
