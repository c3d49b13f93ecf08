package metadata

import (
	"context"
	"net/netip"
	"sync"
)

// StaticResolver is a Resolver backed by a table the owner keeps current
// (Set when a sandbox's network comes up, Delete when it goes away). The
// zero value is empty and ready to use.
type StaticResolver struct {
	mu sync.RWMutex
	m  map[netip.Addr]Sandbox
}

var _ Resolver = (*StaticResolver)(nil)

// Set maps addr to sb, replacing any previous mapping.
func (r *StaticResolver) Set(addr netip.Addr, sb Sandbox) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = make(map[netip.Addr]Sandbox)
	}
	r.m[addr.Unmap()] = sb
}

// Delete removes the mapping of addr.
func (r *StaticResolver) Delete(addr netip.Addr) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.m, addr.Unmap())
}

// SandboxByAddr implements Resolver.
func (r *StaticResolver) SandboxByAddr(_ context.Context, addr netip.Addr) (Sandbox, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	sb, ok := r.m[addr.Unmap()]
	return sb, ok
}
