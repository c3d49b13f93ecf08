package api

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// Lifetime limits.
const (
	DefaultTimeout = 5 * time.Minute
	MaxTimeout     = 24 * time.Hour
)

// liveSandbox is the in-memory side of a running sandbox.
type liveSandbox struct {
	id       string
	slot     int
	ip       netip.Addr
	done     chan struct{} // closed once the sandbox has ended and is cleaned up
	cancel   context.CancelFunc
	timer    *time.Timer
	reason   string // why we are ending it (terminated, timeout, idle, lost); "" if it ended by itself
	detail   string // with reason lost: the error, recorded as the sandbox's
	lastUsed time.Time
	// idle is its idle timeout; stored is when lastUsed was last written
	// to the store (replicas: the leader enforces the idle timeout).
	idle   time.Duration
	stored time.Time
}

// NewSandboxID returns a fresh sandbox id (also for pre-started sandboxes,
// which carry the id of the sandbox they become).
func NewSandboxID() string { return newID() }

func newID() string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return "sb-" + hex.EncodeToString(b)
}

// launch installs a recorded sandbox's egress rules, starts it on the
// node and begins watching it.
func (s *Server) launch(ctx context.Context, sb *store.Sandbox, req node.StartRequest, policies []*store.Policy) error {
	req.ID, req.Slot = sb.ID, sb.Slot
	s.live.mu.Lock()
	s.live.starting[sb.ID] = true // its identity may be minted from now on
	s.live.mu.Unlock()
	defer func() {
		s.live.mu.Lock()
		delete(s.live.starting, sb.ID)
		s.live.mu.Unlock()
	}()
	t0 := time.Now()
	// The Prepare hook (identity token files: an RSA signature, ~1 ms)
	// runs while the egress rules are installed: both only read the
	// record, neither needs the other, and both are done before the node
	// starts anything of the sandbox's. A failure of either is recorded
	// once both have ended (fail's Ended hook undoes what the other made).
	prepared := make(chan error, 1)
	var prepareTook time.Duration // written before prepared is sent
	go func() {
		if s.cfg.Hooks.Prepare == nil {
			prepared <- nil
			return
		}
		err := s.cfg.Hooks.Prepare(ctx, sb, &req)
		prepareTook = time.Since(t0)
		prepared <- err
	}()
	// The egress rules are keyed by the slot's interface, so they are in force
	// before the sandbox's first packet: nothing runs unrestricted, not even briefly.
	var aerr error
	if s.cfg.Policies != nil {
		aerr = s.cfg.Policies.Apply(ctx, sb, policies)
	}
	egressTook := time.Since(t0)
	perr := <-prepared
	if err := cmp.Or(aerr, perr); err != nil {
		return s.fail(ctx, sb, err)
	}
	t1 := time.Now()
	st, err := s.node.Start(ctx, req)
	if err != nil {
		return s.fail(ctx, sb, err)
	}
	t2 := time.Now()
	defer func() {
		s.log.Debug("sandbox started", "sandbox", sb.ID, "egress_and_prepare", t1.Sub(t0), "egress", egressTook, "prepare", prepareTook,
			"node", t2.Sub(t1), "record_and_hooks", time.Since(t2))
	}()
	now := time.Now().UTC()
	sb.State = store.StateRunning
	sb.Pid = st.Pid
	sb.StartedAt = now
	sb.LastActive = now
	if st.Net != nil {
		sb.IP = st.Net.SandboxIP.String()
	}
	if err := s.store.UpdateSandbox(ctx, sb); err != nil {
		s.discard(ctx, sb, st.Pid)
		return s.fail(ctx, sb, err)
	}
	s.watch(sb)
	if s.cfg.Hooks.Started != nil {
		if err := s.cfg.Hooks.Started(ctx, sb, st); err != nil {
			s.end(sb.ID, "error")
			return fmt.Errorf("sandbox %q: %w", sb.ID, err)
		}
	}
	return nil
}

// discard removes a sandbox that started (init pid) but is not watched
// (its running state was not recorded): its init is killed and waited for
// (a node's Destroy does not reap it: nothing else would, and it would stay
// a zombie of the node's chalkd), then everything it had on its node goes,
// its slot too.
func (s *Server) discard(ctx context.Context, sb *store.Sandbox, pid int) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.node.Kill(ctx, sb.ID); err != nil {
		s.log.Warn("kill a sandbox whose start was not recorded", "sandbox", sb.ID, "err", err)
	}
	if _, err := s.node.Wait(ctx, sb.ID, pid); err != nil {
		s.log.Warn("reap a sandbox whose start was not recorded", "sandbox", sb.ID, "pid", pid, "err", err)
	}
	if err := s.node.Destroy(ctx, sb.ID, sb.Slot); err != nil {
		s.log.Warn("destroy a sandbox whose start was not recorded", "sandbox", sb.ID, "err", err)
	}
}

// fail records a failed start.
func (s *Server) fail(ctx context.Context, sb *store.Sandbox, cause error) error {
	sb.State = store.StateFailed
	sb.Error = cause.Error()
	sb.EndReason = "error"
	sb.EndedAt = time.Now().UTC()
	if err := s.store.UpdateSandbox(context.WithoutCancel(ctx), sb); err != nil {
		s.log.Error("record failed sandbox", "sandbox", sb.ID, "err", err)
	}
	if s.cfg.Hooks.Ended != nil {
		s.cfg.Hooks.Ended(context.WithoutCancel(ctx), sb)
	}
	return cause
}

// watch registers a running sandbox: it waits for its init to exit and arms
// its lifetime timer.
func (s *Server) watch(sb *store.Sandbox) {
	ctx, cancel := context.WithCancel(s.baseCtx)
	ip, _ := netip.ParseAddr(sb.IP)
	l := &liveSandbox{id: sb.ID, slot: sb.Slot, ip: ip, done: make(chan struct{}), cancel: cancel, lastUsed: sb.LastActive, idle: sb.IdleTimeout}
	if l.lastUsed.IsZero() {
		l.lastUsed = time.Now()
	}
	s.live.mu.Lock()
	if _, dup := s.live.m[sb.ID]; dup {
		// Watched already (replicas: adopted by the sync and a request at once).
		s.live.mu.Unlock()
		cancel()
		return
	}
	s.live.m[sb.ID] = l
	// Replicas: it fires on the leader only (expire).
	l.timer = time.AfterFunc(time.Until(sb.Deadline()), func() { s.expire(sb.ID, "timeout") })
	s.live.mu.Unlock()
	if sb.IdleTimeout > 0 {
		go s.idleLoop(ctx, l, sb.IdleTimeout)
	}
	go func() {
		ex, err := s.node.Wait(ctx, sb.ID, sb.Pid)
		for s.replicated() && errors.Is(err, node.ErrLost) && !s.leading() && ctx.Err() == nil {
			// Replicas: the leader decides that a sandbox is lost (this
			// replica may only be cut off from its node); wait again
			// while its end is not recorded.
			if !s.awaitLostOrBack(ctx, sb.ID) {
				break
			}
			ex, err = s.node.Wait(ctx, sb.ID, sb.Pid)
		}
		if err != nil && ctx.Err() != nil {
			return // daemon shutting down: the sandbox keeps running
		}
		if errors.Is(err, node.ErrLost) {
			// Its node stopped answering (fleet): whether it still runs
			// there is unknown; it is reported lost, not exited.
			s.live.mu.Lock()
			if l.reason == "" {
				l.reason, l.detail = "lost", err.Error()
			}
			s.live.mu.Unlock()
		}
		s.finish(sb.ID, ex)
	}()
}

// idleLoop ends the sandbox when nothing used it for d.
func (s *Server) idleLoop(ctx context.Context, l *liveSandbox, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.live.mu.Lock()
			idle := time.Since(l.lastUsed)
			s.live.mu.Unlock()
			if idle >= d && !s.leading() {
				// Replicas: only the leader ends it; look again.
				t.Reset(leaderPoll)
				continue
			}
			if idle >= d && s.replicated() {
				// Used through another replica meanwhile?
				idle = s.idleAcrossReplicas(ctx, l)
			}
			if idle >= d {
				s.end(l.id, "idle")
				return
			}
			t.Reset(d - idle)
		}
	}
}

// touch records activity for the idle timeout.
func (s *Server) touch(id string) {
	now := time.Now()
	persist := false
	s.live.mu.Lock()
	if l := s.live.m[id]; l != nil {
		l.lastUsed = now
		if s.replicated() && l.idle > 0 && now.Sub(l.stored) >= touchEvery(l.idle) {
			l.stored, persist = now, true
		}
	}
	s.live.mu.Unlock()
	if persist {
		s.storeTouch(id, now)
	}
}

// end ends a running sandbox for reason: it is recorded as stopping (with
// reason, so a restart in the middle keeps it), its processes are killed,
// and end returns once its end is recorded (finish). What it leaves on the
// node is removed in the background (node Teardown), its slot held until
// then.
func (s *Server) end(id, reason string) {
	l := s.liveHere(id)
	s.live.mu.Lock()
	first := l != nil && l.reason == ""
	if first {
		l.reason = reason
	}
	s.live.mu.Unlock()
	if l == nil {
		return
	}
	t0 := time.Now()
	if first {
		if err := s.store.MarkStopping(s.baseCtx, id, reason); err != nil {
			s.log.Warn("record sandbox stopping", "sandbox", id, "err", err)
		}
	}
	t1 := time.Now()
	defer func() {
		s.log.Debug("sandbox stopped", "sandbox", id, "record_stopping", t1.Sub(t0), "kill_to_recorded_end", time.Since(t1))
	}()
	if err := s.node.Kill(s.baseCtx, id); err != nil {
		// Not killed: remove it all now (what Kill could not kill, the
		// runtime's forced delete does).
		s.log.Warn("kill sandbox; destroying it", "sandbox", id, "err", err)
		if sb, gerr := s.store.GetSandbox(s.baseCtx, id); gerr == nil {
			if derr := s.node.Destroy(s.baseCtx, id, sb.Slot); derr != nil {
				s.log.Warn("destroy sandbox", "sandbox", id, "err", derr)
			}
		}
	}
	<-l.done
}

// finish records the end of a sandbox and frees everything it held: what
// the control plane keyed by it first (hooks: egress rules, identity,
// tunnels), then, in the background, what it left on the node (its slot is
// free once that is gone). It runs once per sandbox, from its watcher.
func (s *Server) finish(id string, ex sandbox.Exit) {
	ctx := s.baseCtx
	s.live.mu.Lock()
	l := s.live.m[id]
	s.live.mu.Unlock()
	if l == nil {
		return
	}
	defer func() {
		s.live.mu.Lock()
		delete(s.live.m, id)
		s.live.mu.Unlock()
		l.timer.Stop()
		l.cancel()
		close(l.done)
	}()
	if s.replicated() && !s.awaitRecord(id) {
		// The leader recorded its end and tears it down: what this
		// replica keeps of it (hooks) goes.
		if sb, err := s.store.GetSandbox(ctx, id); err == nil && s.cfg.Hooks.Ended != nil {
			s.cfg.Hooks.Ended(ctx, sb)
		}
		return
	}
	sb, err := s.store.GetSandbox(ctx, id)
	if err != nil {
		s.log.Error("finish sandbox", "sandbox", id, "err", err)
		return
	}
	t0 := time.Now()
	if s.cfg.Hooks.Ended != nil {
		s.live.mu.Lock()
		lost := l.reason == "lost"
		s.live.mu.Unlock()
		if lost {
			// The hooks see a loss as one (the ingress keeps the
			// exposures of a sandbox that may be re-adopted).
			sb.EndReason = "lost"
		}
		s.cfg.Hooks.Ended(ctx, sb)
	}
	t1 := time.Now()
	defer func() {
		s.log.Debug("sandbox end recorded", "sandbox", id, "hooks", t1.Sub(t0), "teardown_and_record", time.Since(t1))
	}()
	// Journalled before the end is recorded: a restart in between finishes
	// the teardown (its journal) rather than forget it (a stopped record
	// is not reconciled).
	// Its writable layer may be kept for a while, for a snapshot.
	if _, err := s.kept.teardown(s.node, sb); err != nil {
		s.log.Warn("journal sandbox teardown", "sandbox", id, "err", err)
	}
	s.live.mu.Lock()
	reason, detail := l.reason, l.detail
	s.live.mu.Unlock()
	if reason == "" && sb.State == store.StateStopping && sb.EndReason != "" {
		reason = sb.EndReason // asked for on another replica (MarkStopping precedes the kill)
	}
	if detail != "" {
		sb.Error = detail
	}
	sb.State = store.StateStopped
	sb.EndedAt = time.Now().UTC()
	sb.ExitCode = ex.Code
	switch {
	case reason != "":
		sb.EndReason = reason
	case ex.OOM:
		sb.EndReason = "oom"
	default:
		sb.EndReason = "exited"
	}
	if !ex.Known && (reason == "" || reason == "lost") {
		sb.ExitCode = -1
	}
	if !s.recordEnd(ctx, sb) {
		return
	}
	s.log.Info("sandbox ended", "sandbox", id, "reason", sb.EndReason, "exit_code", sb.ExitCode)
}

// Reconcile brings memory and the node in line with the store after a start:
// running sandboxes are watched again, those whose timeout passed are ended,
// those that died meanwhile are recorded and cleaned, and anything on the node
// that belongs to no live sandbox is removed.
func (s *Server) Reconcile(ctx context.Context) error {
	if s.replicated() {
		return s.reconcileReplica(ctx)
	}
	sbs, err := s.store.ListSandboxes(ctx, "", true)
	if err != nil {
		return err
	}
	live := map[string]int{}
	for _, sb := range sbs {
		pid, running, silent := s.runningOrSilent(ctx, sb.ID)
		switch {
		case silent != nil && sb.State == store.StateRunning && !time.Now().After(sb.Deadline()):
			// Its node did not answer (silent just before this start):
			// lost, as for a node that goes silent while the control
			// plane runs, so that its node's reconcile re-adopts it if
			// it still runs there within the grace.
			if err := s.endSilent(ctx, sb, silent); err != nil {
				return err
			}
		case running && sb.State == store.StateRunning && pid == sb.Pid:
			live[sb.ID] = sb.Slot
			s.node.Adopt(sb.ID, sb.ImageDigest)
			s.watch(sb)
			if s.cfg.Hooks.Resumed != nil {
				s.cfg.Hooks.Resumed(ctx, sb)
			}
			if time.Now().After(sb.Deadline()) {
				go s.end(sb.ID, "timeout")
			}
		default:
			reason := "exited"
			if sb.State == store.StateStopping && sb.EndReason != "" {
				reason = sb.EndReason // asked for before the restart
			}
			if sb.State == store.StateCreating {
				reason = "error"
				sb.Error = "chalkd stopped while the sandbox was being created"
			}
			if time.Now().After(sb.Deadline()) {
				reason = "timeout"
			}
			if err := s.node.Destroy(ctx, sb.ID, sb.Slot); err != nil {
				s.log.Warn("reconcile: destroy", "sandbox", sb.ID, "err", err)
			}
			sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode = store.StateStopped, reason, time.Now().UTC(), -1
			if reason == "error" {
				sb.State = store.StateFailed
			}
			if err := s.store.UpdateSandbox(ctx, sb); err != nil {
				return err
			}
			if s.cfg.Hooks.Ended != nil {
				s.cfg.Hooks.Ended(ctx, sb)
			}
		}
	}
	if f, ok := s.node.(startReconciler); ok {
		// A fleet: each node is reconciled as a returned node (lost
		// sandboxes it still runs re-adopted, the rest removed), in the
		// background for a node that does not answer now.
		f.ReconcileStart(ctx)
		return nil
	}
	if err := s.node.Restore(ctx, live); err != nil {
		s.log.Warn("reconcile: node state of the previous process", "err", err)
	}
	left, err := s.node.Leftovers(ctx, live)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		s.log.Warn("reconcile: node objects of no live sandbox", "objects", left)
	}
	return nil
}

// silentNodes is a node that tells a sandbox whose node did not answer
// from one not running there (the fleet's router): RunningOrSilent's
// silent is set then. Lose forgets the placement of a sandbox recorded
// lost, so that its node's reconcile finds it among the lost records.
type silentNodes interface {
	RunningOrSilent(ctx context.Context, id string) (pid int, running bool, silent error)
	Lose(id string)
}

// runningOrSilent is node.Running, and why it is not known (silent: the
// sandbox's node did not answer) when the node can tell.
func (s *Server) runningOrSilent(ctx context.Context, id string) (int, bool, error) {
	if sn, ok := s.node.(silentNodes); ok {
		return sn.RunningOrSilent(ctx, id)
	}
	pid, running := s.node.Running(ctx, id)
	return pid, running, nil
}

// endSilent records running sandbox sb lost because its node did not
// answer (why): not destroyed (it may run on there), its record stopped
// with end_reason lost on its node (store.LostOn), so that the node's
// reconcile re-adopts it if it still runs there with its pid within the
// grace, and removes it otherwise. The Ended hooks see the loss (the
// ingress keeps its exposures for the re-adoption).
func (s *Server) endSilent(ctx context.Context, sb *store.Sandbox, why error) error {
	sb.State, sb.EndReason, sb.EndedAt, sb.ExitCode = store.StateStopped, "lost", time.Now().UTC(), -1
	sb.Error = why.Error()
	if s.replicated() {
		if !s.recordEnd(ctx, sb) {
			return nil
		}
	} else if err := s.store.UpdateSandbox(ctx, sb); err != nil {
		return err
	}
	if sn, ok := s.node.(silentNodes); ok {
		sn.Lose(sb.ID) // after the record: a refresh places no live record again
	}
	if s.cfg.Hooks.Ended != nil {
		s.cfg.Hooks.Ended(ctx, sb)
	}
	s.log.Warn("sandbox lost: its node did not answer at the start", "sandbox", sb.ID, "node", sb.Node, "err", why)
	return nil
}

// startReconciler is a node that reconciles itself once Reconcile has
// watched the running sandboxes and ended the others (the fleet's router:
// noderpc.Router.ReconcileStart). Reconcile then neither restores it nor
// removes its leftovers itself: a sandbox reported lost before the start,
// which its node may still run, is not live, and only the router knows
// which of those to re-adopt.
type startReconciler interface {
	ReconcileStart(ctx context.Context)
}

// Leftovers lists node objects not belonging to live sandboxes (leak checks).
func (s *Server) Leftovers(ctx context.Context) ([]string, error) {
	s.live.mu.Lock()
	live := map[string]int{}
	for id, l := range s.live.m {
		live[id] = l.slot
	}
	s.live.mu.Unlock()
	return s.node.Leftovers(ctx, live)
}

// SandboxByAddr maps a sandbox's source address to its record (see
// Live.SandboxByAddr).
func (s *Server) SandboxByAddr(ctx context.Context, a netip.Addr) (*store.Sandbox, bool) {
	return s.live.SandboxByAddr(ctx, s.store, a)
}

// IsRunning reports whether sandbox id is running.
func (s *Server) IsRunning(ctx context.Context, id string) bool { return s.live.IsRunning(ctx, id) }

// IsActive reports whether sandbox id is starting or running (see Live.IsActive).
func (s *Server) IsActive(ctx context.Context, id string) bool { return s.live.IsActive(ctx, id) }

// WaitEnded blocks until sandbox id is no longer live, or ctx ends.
func (s *Server) WaitEnded(ctx context.Context, id string) error {
	l := s.liveHere(id)
	if l == nil {
		return nil
	}
	select {
	case <-l.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown stops watching (sandboxes keep running; a restart reattaches).
func (s *Server) Shutdown() {
	s.live.mu.Lock()
	defer s.live.mu.Unlock()
	for _, l := range s.live.m {
		l.timer.Stop()
		l.cancel()
	}
}

func notRunning(sb *store.Sandbox) error {
	if sb.State == store.StateRunning && sb.Paused {
		return fmt.Errorf("sandbox %q is paused (resume it first): %w", sb.ID, errdefs.ErrFailedPrecondition)
	}
	if sb.State == store.StateRunning {
		return nil
	}
	msg := fmt.Sprintf("sandbox %q is %s", sb.ID, sb.State)
	if sb.EndReason != "" {
		msg += " (" + sb.EndReason + ")"
	}
	return fmt.Errorf("%s: %w", msg, errdefs.ErrFailedPrecondition)
}

var errNoBackend = errors.New("not enabled on this chalkd")
