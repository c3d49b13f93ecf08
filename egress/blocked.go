package egress

import (
	"net/netip"
	"slices"

	"github.com/chalkcompute/chalkcompute/internal/ipprefix"
)

// blockedPrefixes are the destinations no sandbox reaches unless a CIDR
// entry of its policy names them (see Rules.MatchAddr): the node's private
// networks and the special-purpose ranges a cloud or a LAN puts services
// on. They hold whatever the policy, allow-all and learn mode included.
//
// Not listed: the documentation ranges 198.51.100.0/24, 203.0.113.0/24 and
// 2001:db8::/32 (the tests' fake internet; never routed on the internet, so
// reaching them costs nothing). 192.0.2.0/24 is listed: the uplink of the
// machines this project is built on uses it.
var blockedPrefixes = mustPrefixes(
	// IPv4
	"0.0.0.0/8",          // "this network"
	"10.0.0.0/8",         // RFC 1918
	"100.64.0.0/10",      // CGNAT (Alibaba's metadata 100.100.100.200, tunnels)
	"127.0.0.0/8",        // loopback
	"169.254.0.0/16",     // link-local (cloud metadata; sandboxnet drops it too)
	"172.16.0.0/12",      // RFC 1918
	"192.0.0.0/24",       // IETF protocol assignments
	"192.0.2.0/24",       // TEST-NET-1 (this project's machines' uplink)
	"192.168.0.0/16",     // RFC 1918
	"198.18.0.0/15",      // benchmarking (the DNS blackhole)
	"224.0.0.0/4",        // multicast
	"240.0.0.0/4",        // reserved, 255.255.255.255 broadcast
	"168.63.129.16/32",   // Azure's WireServer and DNS
	"100.100.100.200/32", // Alibaba Cloud metadata (also inside CGNAT, kept apart so a CGNAT entry does not open it)
	// IPv6
	"::/96",             // unspecified, loopback, IPv4-compatible
	"::ffff:0:0/96",     // IPv4-mapped
	"64:ff9b:1::/48",    // local-use NAT64
	"100::/64",          // discard (the DNS blackhole)
	"fc00::/7",          // unique local (AWS's metadata fd00:ec2::254)
	"fd00:ec2::254/128", // AWS metadata (kept apart so a ULA entry does not open it)
	"fe80::/10",         // link-local
	"ff00::/8",          // multicast
)

// embeddingV6 are IPv6 prefixes that carry an IPv4 address in their low
// (NAT64, RFC 6052) or high (6to4, RFC 3056) bits: the blocked IPv4 ranges
// inside them are blocked too, so a NAT64 gateway or a 6to4 relay is no way
// around the IPv4 list.
var embeddingV6 = []struct {
	prefix netip.Prefix
	offset int // bit offset of the IPv4 address
}{
	{netip.MustParsePrefix("64:ff9b::/96"), 96},
	{netip.MustParsePrefix("2002::/16"), 16},
}

func mustPrefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	for _, e := range embeddingV6 {
		for _, p := range out {
			if !p.Addr().Is4() {
				continue
			}
			b := e.prefix.Addr().As16()
			v4 := p.Addr().As4()
			for i := 0; i < 32; i++ {
				if v4[i/8]&(0x80>>(i%8)) != 0 {
					bit := e.offset + i
					b[bit/8] |= 0x80 >> (bit % 8)
				}
			}
			out = append(out, netip.PrefixFrom(netip.AddrFrom16(b), e.offset+p.Bits()))
		}
	}
	slices.SortFunc(out, comparePrefix)
	return out
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// BlockedPrefixes returns the destinations sandboxes do not reach unless a
// CIDR entry of their policy lies inside one of them.
func BlockedPrefixes() []netip.Prefix { return slices.Clone(blockedPrefixes) }

// isBlocked reports whether a is in a blocked range.
func isBlocked(a netip.Addr) bool {
	a = a.Unmap().WithZone("")
	for _, p := range blockedPrefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// entryAllows reports whether the CIDR entry e allows a: e holds a, and
// every blocked range holding a holds all of e (an entry opens blocked space
// only when it lies inside it: 10.1.0.0/16 opens itself, 0.0.0.0/0 opens no
// private range, 100.64.0.0/10 opens CGNAT but not 100.100.100.200).
func entryAllows(e netip.Prefix, a netip.Addr) bool {
	if !e.Contains(a) {
		return false
	}
	for _, b := range blockedPrefixes {
		if b.Contains(a) && b.Bits() > e.Bits() {
			return false
		}
	}
	return true
}

// opensBlocked reports whether the entry lies inside blocked space (and so
// matters even when egress is otherwise unrestricted).
func opensBlocked(e netip.Prefix) bool {
	for _, b := range blockedPrefixes {
		if b.Bits() <= e.Bits() && b.Contains(e.Addr()) {
			return true
		}
	}
	return false
}

// effectivePrefixes turns CIDR entries into what they allow: each entry
// minus the blocked ranges strictly inside it.
func effectivePrefixes(entries []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, e := range entries {
		var holes []netip.Prefix
		for _, b := range blockedPrefixes {
			if b.Addr().BitLen() == e.Addr().BitLen() && b.Bits() > e.Bits() && e.Contains(b.Addr()) {
				holes = append(holes, b)
			}
		}
		out = append(out, subtract(e, holes)...)
	}
	slices.SortFunc(out, comparePrefix)
	return out
}

// subtract returns p without the holes, as prefixes.
func subtract(p netip.Prefix, holes []netip.Prefix) []netip.Prefix {
	for _, h := range holes {
		if !p.Overlaps(h) {
			continue
		}
		if h.Bits() <= p.Bits() {
			return nil // p lies inside the hole
		}
		lo := netip.PrefixFrom(p.Addr(), p.Bits()+1)
		hi := netip.PrefixFrom(nextAfterPrefix(lo), p.Bits()+1)
		return append(subtract(lo, holes), subtract(hi, holes)...)
	}
	return []netip.Prefix{p}
}

// nextAfterPrefix is the first address after p.
func nextAfterPrefix(p netip.Prefix) netip.Addr {
	return ipprefix.Last(p).Next()
}
