package api

import (
	"context"
	"time"

	"github.com/chalkcompute/chalkcompute/store"
)

// Control-plane replicas (issue #17). Several control planes may serve one
// fleet on one PostgreSQL database (Config.Leader set). Each replica watches
// every running sandbox (SyncReplicas adopts those another replica started),
// so any replica answers any request and knows which sandboxes live (the
// identity issuer's revocation, Wait, Terminate). Leader-only work waits
// for the lease: lifetime and idle timeouts fire on the leader only; the
// end of a sandbox is recorded by the leader (store.EndSandbox, a
// compare-and-swap: two replicas that both believe they lead for a moment
// still record it once), and its teardown on the node is the leader's.
// A follower whose watch sees the end waits for the record, then forgets the
// sandbox.

// Leadership says whether this replica holds the control plane's leader
// lease now.
type Leadership interface {
	Leading() bool
}

// leaderPoll is how often a replica that does not lead looks again: for a
// sandbox's end to be recorded, or for a timer that fired while it did not
// lead.
const leaderPoll = 250 * time.Millisecond

// replicated reports whether other control-plane replicas may share the store.
func (s *Server) replicated() bool { return s.cfg.Leader != nil }

// leading reports whether this process does leader-only work now (always,
// without replicas).
func (s *Server) leading() bool { return s.cfg.Leader == nil || s.cfg.Leader.Leading() }

// expire ends sandbox id for reason (timeout) when this replica leads;
// else it looks again after leaderPoll for as long as the sandbox is live
// here (a leader elsewhere ends it, or this replica takes the lease).
func (s *Server) expire(id, reason string) {
	if s.leading() {
		s.end(id, reason)
		return
	}
	s.live.mu.Lock()
	_, live := s.live.m[id]
	s.live.mu.Unlock()
	if live {
		time.AfterFunc(leaderPoll, func() { s.expire(id, reason) })
	}
}

// awaitRecord is a follower's side of a sandbox's end: it waits until the
// end is in the store (recorded by the leader) and reports false, or until
// this replica leads and reports true (then it records the end itself).
func (s *Server) awaitRecord(id string) bool {
	t := time.NewTicker(leaderPoll)
	defer t.Stop()
	for {
		if s.leading() {
			return true
		}
		sb, err := s.store.GetSandbox(s.baseCtx, id)
		if err == nil && !sb.Live() {
			return false
		}
		<-t.C
	}
}

// SyncReplicas keeps this replica's live set in line with the store every
// interval until ctx ends: running sandboxes another replica started are
// watched here too, and on the leader, records a dead replica left half
// made are ended.
func (s *Server) SyncReplicas(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := s.syncOnce(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("replicas: sync live sandboxes", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// staleCreate is how long a sandbox may stay in state creating before the
// leader takes its replica for dead and fails it.
const staleCreate = 2 * time.Minute

func (s *Server) syncOnce(ctx context.Context) error {
	sbs, err := s.store.ListSandboxes(ctx, "", true)
	if err != nil {
		return err
	}
	for _, sb := range sbs {
		switch sb.State {
		case store.StateRunning, store.StateStopping:
			s.adopt(sb)
		case store.StateCreating:
			if s.leading() && time.Since(sb.CreatedAt) > staleCreate && !s.isStarting(sb.ID) {
				s.failStale(ctx, sb)
			}
		}
	}
	return nil
}

// adopt watches a running (or stopping) sandbox this replica does not watch
// yet (started by another replica, or before this one started). It reports
// whether it is watched here now.
func (s *Server) adopt(sb *store.Sandbox) bool {
	s.live.mu.Lock()
	_, watched := s.live.m[sb.ID]
	starting := s.live.starting[sb.ID]
	s.live.mu.Unlock()
	if watched {
		return true
	}
	if starting || sb.Pid == 0 {
		return false
	}
	if runs, silent := s.runsAsRecorded(sb); !runs {
		// Gone (its init's pid may be another process's by now: never
		// watched by pid). The leader records its end: lost if its node
		// did not answer (it may still run there: re-adoptable), else
		// as found.
		switch {
		case !s.leading():
		case silent != nil && sb.State == store.StateRunning:
			if err := s.endSilent(s.baseCtx, sb, silent); err != nil {
				s.log.Error("replicas: record a sandbox of a silent node lost", "sandbox", sb.ID, "err", err)
			}
		default:
			s.endGone(sb)
		}
		return false
	}
	s.watch(sb)
	if sb.State == store.StateStopping && sb.EndReason != "" {
		// Its end was asked for on a replica that died: finish it.
		go s.expire(sb.ID, sb.EndReason)
	} else if time.Now().After(sb.Deadline()) {
		go s.expire(sb.ID, "timeout")
	}
	return true
}

func (s *Server) isStarting(id string) bool {
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	return s.live.starting[id]
}

// failStale ends a record a replica left in state creating (it died before
// the sandbox ran): whatever its node holds of it is destroyed.
func (s *Server) failStale(ctx context.Context, sb *store.Sandbox) {
	if err := s.node.Destroy(ctx, sb.ID, sb.Slot); err != nil {
		s.log.Warn("replicas: destroy a stale create", "sandbox", sb.ID, "err", err)
	}
	sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode = store.StateFailed, "error", time.Now().UTC(), -1
	sb.Error = "the control-plane replica creating it stopped"
	if ok, err := s.store.EndSandbox(ctx, sb); err != nil || !ok {
		return
	}
	if s.cfg.Hooks.Ended != nil {
		s.cfg.Hooks.Ended(ctx, sb)
	}
	s.log.Info("replicas: failed a create a stopped replica left", "sandbox", sb.ID)
}

// liveHere returns this replica's watch of sandbox id, adopting it from
// the store when another replica started it moments ago (before this
// one's next sync).
func (s *Server) liveHere(id string) *liveSandbox {
	s.live.mu.Lock()
	l := s.live.m[id]
	s.live.mu.Unlock()
	if l != nil || !s.replicated() {
		return l
	}
	sb, err := s.store.GetSandbox(s.baseCtx, id)
	if err != nil || (sb.State != store.StateRunning && sb.State != store.StateStopping) || !s.adopt(sb) {
		return nil
	}
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	return s.live.m[id]
}

// reconcileReplica is Reconcile with other replicas about: running
// sandboxes are watched (a dead one's Wait ends at once); nothing is
// destroyed as left over, since another replica may be creating it now.
// Each node learns the slots of every live sandbox placed on it.
func (s *Server) reconcileReplica(ctx context.Context) error {
	sbs, err := s.store.ListSandboxes(ctx, "", true)
	if err != nil {
		return err
	}
	live := map[string]int{}
	for _, sb := range sbs {
		live[sb.ID] = sb.Slot
		if sb.State != store.StateCreating {
			s.adopt(sb)
		}
	}
	if err := s.node.Restore(ctx, live); err != nil {
		s.log.Warn("reconcile: restore nodes", "err", err)
	}
	if f, ok := s.node.(startReconciler); ok {
		// Each node is reconciled as a returned node by the leader (now
		// if this replica leads, else once it takes the lease): a
		// sandbox recorded lost before this start, which its node runs
		// on, is re-adopted or removed, as on one control plane. Without
		// it a lost sandbox on a node that answered at this start (every
		// replica restarted, or the only one) ran on unmanaged.
		f.ReconcileStart(ctx)
	}
	return nil
}

// recordEnd writes the end of sb (compare-and-swap): false when another
// replica recorded it first.
func (s *Server) recordEnd(ctx context.Context, sb *store.Sandbox) bool {
	ok, err := s.store.EndSandbox(ctx, sb)
	if err != nil {
		s.log.Error("record sandbox end", "sandbox", sb.ID, "err", err)
		return false
	}
	if !ok {
		s.log.Debug("sandbox end recorded by another replica", "sandbox", sb.ID)
	}
	return ok
}

// touchEvery is how often a replica writes a sandbox's last activity to
// the store, for an idle timeout d: often enough that the leader never
// ends a sandbox in use elsewhere (it looks at the store before ending).
func touchEvery(d time.Duration) time.Duration {
	return min(max(d/4, 100*time.Millisecond), 5*time.Second)
}

// storeTouch writes sandbox id's last activity to the store in the
// background (replicas).
func (s *Server) storeTouch(id string, at time.Time) {
	go func() {
		if err := s.store.TouchSandbox(s.baseCtx, id, at); err != nil {
			s.log.Debug("replicas: record sandbox activity", "sandbox", id, "err", err)
		}
	}()
}

// idleAcrossReplicas returns how long sandbox l has been idle as far as
// every replica saw: its activity here, or the latest another replica
// recorded in the store.
func (s *Server) idleAcrossReplicas(ctx context.Context, l *liveSandbox) time.Duration {
	sb, err := s.store.GetSandbox(ctx, l.id)
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	if err == nil && sb.LastActive.After(l.lastUsed) {
		l.lastUsed = sb.LastActive
	}
	return time.Since(l.lastUsed)
}

// runsAsRecorded reports whether sb runs on its node with the init pid
// recorded; a sandbox on a node that stopped answering counts (its watch
// reports it lost). silent is set when its node, counted as answering
// (the start's window), did not answer.
func (s *Server) runsAsRecorded(sb *store.Sandbox) (runs bool, silent error) {
	if l, ok := s.node.(interface{ Lost(id string) bool }); ok && l.Lost(sb.ID) {
		return true, nil
	}
	ctx, cancel := context.WithTimeout(s.baseCtx, 10*time.Second)
	defer cancel()
	pid, running, silent := s.runningOrSilent(ctx, sb.ID)
	return running && pid == sb.Pid, silent
}

// endGone records the end of a sandbox found not running (its replica
// died before it saw the end), as Reconcile does on one control plane.
func (s *Server) endGone(sb *store.Sandbox) {
	ctx := s.baseCtx
	reason := "exited"
	if sb.State == store.StateStopping && sb.EndReason != "" {
		reason = sb.EndReason
	}
	if time.Now().After(sb.Deadline()) {
		reason = "timeout"
	}
	if err := s.node.Destroy(ctx, sb.ID, sb.Slot); err != nil {
		s.log.Warn("replicas: destroy a sandbox found gone", "sandbox", sb.ID, "err", err)
	}
	sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode = store.StateStopped, reason, time.Now().UTC(), -1
	if !s.recordEnd(ctx, sb) {
		return
	}
	if s.cfg.Hooks.Ended != nil {
		s.cfg.Hooks.Ended(ctx, sb)
	}
	s.log.Info("sandbox ended", "sandbox", sb.ID, "reason", reason, "exit_code", -1, "found", "not running")
}

// awaitLostOrBack is a follower's wait on a sandbox its node stopped
// answering for: after leaderPoll, true to wait on it again (it is still
// live in the store, and this replica does not lead), false when its end
// is recorded or this replica leads now (then it is finished here).
func (s *Server) awaitLostOrBack(ctx context.Context, id string) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(leaderPoll):
	}
	if s.leading() {
		return false
	}
	sb, err := s.store.GetSandbox(ctx, id)
	return err == nil && sb.Live()
}
