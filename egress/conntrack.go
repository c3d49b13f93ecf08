package egress

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// cutFilter matches a sandbox's tracked flows to destinations its rules no
// longer allow. Flows that were DNATed (to the DNS proxy, the metadata
// service) are never cut.
type cutFilter struct {
	src     map[netip.Addr]bool
	allowed func(netip.Addr) bool
}

var _ netlink.CustomConntrackFilter = (*cutFilter)(nil)

func (f *cutFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, _ := netip.AddrFromSlice(flow.Forward.SrcIP)
	dst, _ := netip.AddrFromSlice(flow.Forward.DstIP)
	replySrc, _ := netip.AddrFromSlice(flow.Reverse.SrcIP)
	src, dst, replySrc = src.Unmap(), dst.Unmap(), replySrc.Unmap()
	if !f.src[src] || replySrc != dst {
		return false
	}
	return !f.allowed(dst)
}

// cutFlows deletes the conntrack entries of a sandbox's connections that
// its current rules do not allow, so that an update also ends established
// connections (their next packet is new, reaches chain "egress" and is
// dropped). Callers hold m.mu.
func (m *Manager) cutFlows(s *sbx) (uint, error) {
	h, err := m.conntrackHandle()
	if err != nil {
		return 0, err
	}
	defer h.Close()
	f := &cutFilter{src: map[netip.Addr]bool{}, allowed: func(a netip.Addr) bool {
		if m.addrAllowedByCIDR(s.rules, a) {
			return true
		}
		l := s.learned[a]
		return l != nil && l.expires.After(m.cfg.Now())
	}}
	for _, a := range []netip.Addr{s.SandboxIP, s.SandboxIP6} {
		if a.IsValid() {
			f.src[a.Unmap()] = true
		}
	}
	var total uint
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		n, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam, f)
		total += n
		if err != nil {
			return total, fmt.Errorf("delete conntrack entries: %w", err)
		}
	}
	return total, nil
}

func (m *Manager) conntrackHandle() (*netlink.Handle, error) {
	if m.nsFD == 0 {
		return netlink.NewHandle(unix.NETLINK_NETFILTER)
	}
	return netlink.NewHandleAt(netns.NsHandle(m.nsFD), unix.NETLINK_NETFILTER)
}

// addrAllowedByCIDR reports whether a CIDR entry accepts a (the blackholes
// never).
func (m *Manager) addrAllowedByCIDR(r *Rules, a netip.Addr) bool {
	return r.MatchAddr(a) && a != m.cfg.Blackhole4 && a != m.cfg.Blackhole6
}
