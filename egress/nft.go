package egress

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// Names of the node-wide objects egress keeps in the table.
const (
	egressChain    = "egress"          // created by sandboxnet, contents ours
	dispatchMap    = "egress_sbx"      // iifname -> goto eg_<n>
	dnsPortsSet    = "egress_dnsports" // {53, 853}
	blocked4Set    = "egress_blocked4" // BlockedPrefixes, IPv4
	blocked6Set    = "egress_blocked6" // BlockedPrefixes, IPv6
	logPrefixFmt   = "chalk-egress %d "
	learnPrefixFmt = "chalk-learn %d "
)

// sbxNames are the names of one sandbox's nftables objects.
type sbxNames struct {
	n                        uint32
	chain, deny              string
	cidr4, cidr6, dns4, dns6 string
}

func namesFor(n uint32) sbxNames {
	return sbxNames{
		n:     n,
		chain: fmt.Sprintf("eg_%d", n),
		deny:  fmt.Sprintf("egd_%d", n),
		cidr4: fmt.Sprintf("cidr4_%d", n),
		cidr6: fmt.Sprintf("cidr6_%d", n),
		dns4:  fmt.Sprintf("dns4_%d", n),
		dns6:  fmt.Sprintf("dns6_%d", n),
	}
}

// ifname pads an interface name to the 16 bytes of nftables' ifname type.
func ifname(s string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, s)
	return b
}

// dispatchRule is the one rule of chain "egress":
// iifname vmap @egress_sbx.
func dispatchRule() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: dispatchMap, DestRegister: 0, IsDestRegSet: true},
	}
}

// sandboxRules are the rules of chain eg_<n>, in order. blackholes are the
// DNS blackhole addresses that a CIDR entry would otherwise accept.
func sandboxRules(nm sbxNames, blackholes []netip.Addr) [][]expr.Any {
	deny := &expr.Verdict{Kind: expr.VerdictGoto, Chain: nm.deny}
	var rules [][]expr.Any
	// Direct DNS and DoT to any resolver but ours (whose traffic is DNATed to
	// a local address and never reaches the forward hook).
	for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		rules = append(rules, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Lookup{SourceRegister: 1, SetName: dnsPortsSet},
			deny,
		})
	}
	for _, a := range blackholes {
		rules = append(rules, append(daddr(a.Is4()), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a.AsSlice()}, deny))
	}
	for _, s := range []struct {
		v4   bool
		name string
	}{{true, nm.cidr4}, {true, nm.dns4}, {false, nm.cidr6}, {false, nm.dns6}} {
		rules = append(rules, append(daddr(s.v4),
			&expr.Lookup{SourceRegister: 1, SetName: s.name},
			&expr.Verdict{Kind: expr.VerdictAccept}))
	}
	rules = append(rules, []expr.Any{deny})
	return rules
}

// blockedRules send destinations in the blocked ranges to chain egd_<n>.
func blockedRules(nm sbxNames) [][]expr.Any {
	deny := &expr.Verdict{Kind: expr.VerdictGoto, Chain: nm.deny}
	return [][]expr.Any{
		append(daddr(true), &expr.Lookup{SourceRegister: 1, SetName: blocked4Set}, deny),
		append(daddr(false), &expr.Lookup{SourceRegister: 1, SetName: blocked6Set}, deny),
	}
}

// allowAllRules are the rules of chain eg_<n> when egress is unrestricted:
// what the CIDR entries open is accepted, the blocked ranges are dropped,
// the rest accepted.
func allowAllRules(nm sbxNames) [][]expr.Any {
	var rules [][]expr.Any
	for _, s := range []struct {
		v4   bool
		name string
	}{{true, nm.cidr4}, {false, nm.cidr6}} {
		rules = append(rules, append(daddr(s.v4),
			&expr.Lookup{SourceRegister: 1, SetName: s.name},
			&expr.Verdict{Kind: expr.VerdictAccept}))
	}
	rules = append(rules, blockedRules(nm)...)
	return append(rules, []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}})
}

// learnRules are the rules of chain eg_<n> in learn mode: addresses known
// from DNS are accepted silently, the blocked ranges dropped, others are
// sampled to NFLOG and accepted.
func learnRules(nm sbxNames, group uint16, ratePerSec uint64, burst uint32) [][]expr.Any {
	rules := [][]expr.Any{
		append(daddr(true), &expr.Lookup{SourceRegister: 1, SetName: nm.dns4}, &expr.Verdict{Kind: expr.VerdictAccept}),
		append(daddr(false), &expr.Lookup{SourceRegister: 1, SetName: nm.dns6}, &expr.Verdict{Kind: expr.VerdictAccept}),
	}
	rules = append(rules, blockedRules(nm)...)
	return append(rules, [][]expr.Any{
		{
			&expr.Limit{Type: expr.LimitTypePkts, Rate: ratePerSec, Unit: expr.LimitTimeSecond, Burst: burst},
			&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
				Group: group, Snaplen: 128, Data: []byte(fmt.Sprintf(learnPrefixFmt, nm.n))},
		},
		{&expr.Verdict{Kind: expr.VerdictAccept}},
	}...)
}

// daddr loads the IPv4 or IPv6 destination address into register 1, after
// checking the family (the table is inet).
func daddr(v4 bool) []expr.Any {
	if v4 {
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		}
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 24, Len: 16},
	}
}

// denyRules are the rules of chain egd_<n>: a rate-limited NFLOG sample, then
// count and drop. When the limit is exceeded the first rule stops early and
// the packet falls through to the second: every drop is counted, not every
// drop is logged.
func denyRules(nm sbxNames, group uint16, ratePerSec uint64, burst uint32) [][]expr.Any {
	prefix := fmt.Sprintf(logPrefixFmt, nm.n)
	return [][]expr.Any{
		{
			&expr.Limit{Type: expr.LimitTypePkts, Rate: ratePerSec, Unit: expr.LimitTimeSecond, Burst: burst},
			&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
				Group: group, Snaplen: 128, Data: []byte(prefix)},
		},
		{
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop},
		},
	}
}

// prefixElements turns merged, sorted prefixes of one family into interval
// set elements as nft makes them: [start, end+1) pairs, the end omitted when
// the range reaches the top of the address space, and an interval end at
// the zero address first unless a range starts there.
func prefixElements(ps []netip.Prefix) []nftables.SetElement {
	var els []nftables.SetElement
	if len(ps) > 0 && !ps[0].Masked().Addr().IsUnspecified() {
		els = append(els, nftables.SetElement{Key: make([]byte, ps[0].Addr().BitLen()/8), IntervalEnd: true})
	}
	for _, p := range ps {
		start := p.Masked().Addr()
		if n := len(els); n > 0 && els[n-1].IntervalEnd && slices.Equal(els[n-1].Key, start.AsSlice()) {
			els = els[:n-1] // adjacent to the previous range: extend it
		} else {
			els = append(els, nftables.SetElement{Key: start.AsSlice()})
		}
		if end, ok := nextAfter(ipprefix.Last(p)); ok {
			els = append(els, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return els
}

// mergePrefixes drops prefixes contained in others (nftables interval sets
// refuse overlaps). ps must be sorted by address, then by length.
func mergePrefixes(ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if n := len(out); n > 0 && out[n-1].Overlaps(p) {
			if p.Bits() < out[n-1].Bits() {
				out[n-1] = p
			}
			continue
		}
		out = append(out, p)
	}
	return out
}

func nextAfter(a netip.Addr) (netip.Addr, bool) {
	n := a.Next()
	return n, n.IsValid()
}

func split(ps []netip.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range ps {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	return mergePrefixes(v4), mergePrefixes(v6)
}

// sandboxSets returns the four sets of one sandbox.
func sandboxSets(t *nftables.Table, nm sbxNames) (cidr4, cidr6, dns4, dns6 *nftables.Set) {
	cidr4 = &nftables.Set{Table: t, Name: nm.cidr4, KeyType: nftables.TypeIPAddr, Interval: true}
	cidr6 = &nftables.Set{Table: t, Name: nm.cidr6, KeyType: nftables.TypeIP6Addr, Interval: true}
	dns4 = &nftables.Set{Table: t, Name: nm.dns4, KeyType: nftables.TypeIPAddr, HasTimeout: true}
	dns6 = &nftables.Set{Table: t, Name: nm.dns6, KeyType: nftables.TypeIP6Addr, HasTimeout: true}
	return
}

// learnedElement is one DNS-learned address with its timeout.
// The comment holds the names it was learned for, for a restarted process.
func learnedElement(a netip.Addr, timeout time.Duration, names string) nftables.SetElement {
	return nftables.SetElement{Key: a.AsSlice(), Timeout: timeout, Comment: names}
}
