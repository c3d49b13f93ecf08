package egress

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// maxObserved bounds what learn mode records per sandbox.
const maxObserved = 4096

// observe records an address a learning sandbox reached without resolving
// it first. Direct DNS and DoT are not proposed: policies always drop them.
func (s *sbx) observe(p packetInfo) {
	if (p.proto == "tcp" || p.proto == "udp") && (p.port == 53 || p.port == 853) {
		return
	}
	if s.seenAddrs == nil {
		s.seenAddrs = map[netip.Addr]struct{}{}
	}
	if len(s.seenAddrs) < maxObserved {
		s.seenAddrs[p.dst] = struct{}{}
	}
}

// observeName records a name a learning sandbox resolved.
func (s *sbx) observeName(name string) {
	if s.seenNames == nil {
		s.seenNames = map[string]struct{}{}
	}
	if len(s.seenNames) < maxObserved {
		s.seenNames[name] = struct{}{}
	}
}

// Observed returns what a sandbox in learn mode has contacted: the names it
// resolved and the addresses it reached without resolving them.
func (m *Manager) Observed(id string) (names []string, addrs []netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.byID[id]
	if s == nil {
		return nil, nil
	}
	for n := range s.seenNames {
		names = append(names, n)
	}
	for a := range s.seenAddrs {
		addrs = append(addrs, a)
	}
	slices.Sort(names)
	slices.SortFunc(addrs, netip.Addr.Compare)
	return names, addrs
}

// Proposal suggests a policy that allows what a sandbox in learn mode has
// contacted: the names it resolved (three or more siblings under a parent
// of two or more labels become one wildcard) and the addresses it reached
// directly.
func (m *Manager) Proposal(id string) (Policy, error) {
	names, addrs := m.Observed(id)
	if names == nil && addrs == nil {
		m.mu.Lock()
		_, ok := m.byID[id]
		m.mu.Unlock()
		if !ok {
			return Policy{}, fmt.Errorf("egress: sandbox %q: %w", id, errdefs.ErrNotFound)
		}
	}
	return Policy{
		Name:             "learned-" + id,
		AllowedHostnames: proposeEntries(names, addrs),
		Description:      fmt.Sprintf("proposed from %d names and %d addresses sandbox %s contacted in learn mode", len(names), len(addrs), id),
	}, nil
}

func proposeEntries(names []string, addrs []netip.Addr) []string {
	siblings := map[string][]string{}
	for _, n := range names {
		if _, parent, ok := strings.Cut(n, "."); ok && strings.Contains(parent, ".") {
			siblings[parent] = append(siblings[parent], n)
		}
	}
	var out []string
	wild := map[string]bool{}
	for parent, ns := range siblings {
		if len(ns) >= 3 {
			wild[parent] = true
			out = append(out, "*."+parent)
		}
	}
	for _, n := range names {
		covered := false
		for p := range wild {
			if strings.HasSuffix(n, "."+p) {
				covered = true
			}
		}
		if !covered && ValidateEntry(n) == nil {
			out = append(out, n)
		}
	}
	for _, a := range addrs {
		out = append(out, a.String())
	}
	slices.Sort(out)
	return slices.Compact(out)
}
