package api

import (
	"context"
	"net/netip"
	"sync"

	"github.com/chalkcompute/chalkcompute/store"
)

// Live is the set of live sandboxes: those being started (between their
// record and their watch) and those running or whose end is being
// recorded. The API server fills it; others read it. It exists before the
// server, so that what is built first (the identity issuer) needs no
// reference to a server built later. (Network slots are the node's:
// node.Slots.)
type Live struct {
	mu       sync.Mutex
	m        map[string]*liveSandbox // running sandboxes the server watches
	starting map[string]bool         // sandboxes between their record and their watch
}

// NewLive returns an empty set.
func NewLive() *Live {
	return &Live{m: map[string]*liveSandbox{}, starting: map[string]bool{}}
}

// IsRunning reports whether sandbox id is running (or ending).
func (l *Live) IsRunning(_ context.Context, id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.m[id]
	return ok
}

// IsActive reports whether sandbox id is starting or running: its identity
// may be used. Once it ends, its tokens are refused (revocation).
func (l *Live) IsActive(_ context.Context, id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.m[id]
	return ok || l.starting[id]
}

// RunningAt returns the id of the live sandbox at address a, unless it is
// being ended (terminate, timeout, idle): in memory, for callers on every
// request (the metadata service). A sandbox is live from its watch until
// it is cleaned up after its end.
func (l *Live) RunningAt(a netip.Addr) (string, bool) {
	a = a.Unmap()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, sb := range l.m {
		if sb.ip == a && sb.reason == "" {
			return sb.id, true
		}
	}
	return "", false
}

// SandboxByAddr maps a sandbox's source address to its record (metadata
// service, MCP gateway). Only running sandboxes match.
func (l *Live) SandboxByAddr(ctx context.Context, st *store.Store, a netip.Addr) (*store.Sandbox, bool) {
	l.mu.Lock()
	var id string
	for _, sb := range l.m {
		if sb.ip == a.Unmap() {
			id = sb.id
			break
		}
	}
	l.mu.Unlock()
	if id == "" {
		return nil, false
	}
	sb, err := st.GetSandbox(ctx, id)
	if err != nil || sb.State != store.StateRunning {
		return nil, false
	}
	return sb, true
}
