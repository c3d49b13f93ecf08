// Package ipprefix holds the netip.Prefix helpers the network code shares:
// a prefix's last address, and its form for netlink.
package ipprefix

import (
	"net"
	"net/netip"
)

// Last is p's last address (its broadcast address in IPv4), IPv4 or IPv6.
func Last(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// IPNet is p as a *net.IPNet (address and mask, the address not masked:
// netlink takes an interface address with its prefix length this way).
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
