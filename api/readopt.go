package api

import (
	"context"
	"time"
)

// ReadoptLost revives sandbox id, reported lost when its node went silent,
// now that the node is back and still runs it (issue #17; the fleet's
// router asks, on the leader only): if its record is stopped with
// end_reason "lost", on node, with init pid, and ended at since or later,
// it is running again (store.ReviveLost, a compare-and-swap: replicas
// revive it once) and watched again (Wait, its lifetime and idle timers,
// its identity served again); the Resumed hook runs for it, as for a
// sandbox found running at a restart. It reports whether it revived it.
//
// A client's Wait that returned at the loss is not undone: it saw the
// record stopped (lost); a later read shows it running again.
func (s *Server) ReadoptLost(ctx context.Context, id, node string, pid int, since time.Time) bool {
	if !s.leading() {
		return false
	}
	s.live.mu.Lock()
	_, watched := s.live.m[id]
	s.live.mu.Unlock()
	if watched {
		return false // its end is still being recorded
	}
	sb, err := s.store.ReviveLost(ctx, id, node, pid, since)
	if err != nil {
		s.log.Warn("re-adopt a lost sandbox", "sandbox", id, "err", err)
		return false
	}
	if sb == nil {
		return false
	}
	s.watch(sb)
	if s.cfg.Hooks.Resumed != nil {
		s.cfg.Hooks.Resumed(ctx, sb)
	}
	if time.Now().After(sb.Deadline()) {
		go s.end(sb.ID, "timeout")
	}
	s.log.Info("sandbox re-adopted: its node returned and still runs it", "sandbox", id, "node", node, "pid", pid)
	return true
}
