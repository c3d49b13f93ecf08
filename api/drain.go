package api

import (
	"context"
	"fmt"
	"time"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/periodic"
	"github.com/chalkcompute/chalkcompute/store"
)

// Drain deadlines (issue #17): `chalk admin node drain NODE --deadline 10m`
// drains a node and, once the deadline passes, terminates the sandboxes
// still running there (end_reason "drained", the error naming the node and
// its deadline). The leading control plane enforces it (RunDrains).

// MaxDrainDeadline bounds a drain deadline.
const MaxDrainDeadline = 30 * 24 * time.Hour

// NodeDrainer is the part of a FleetBackend that drains with a deadline
// (noderpc.Router).
type NodeDrainer interface {
	DrainNode(ctx context.Context, id string, deadline time.Time) (NodeStatus, error)
}

func (h *nodeAdminService) drainBy(ctx context.Context, f FleetBackend, req *v1.SetNodeStateRequest) (NodeStatus, error) {
	d := time.Duration(req.DeadlineSeconds) * time.Second
	switch {
	case req.State != store.NodeDraining:
		return NodeStatus{}, invalid("deadline_seconds: only with state draining, not %q", req.State)
	case req.DeadlineSeconds < 0 || d > MaxDrainDeadline:
		return NodeStatus{}, invalid("deadline_seconds %d: want 1 to %d (30 days)", req.DeadlineSeconds, int64(MaxDrainDeadline/time.Second))
	}
	dr, ok := f.(NodeDrainer)
	if !ok {
		return NodeStatus{}, invalid("this control plane has no drain deadlines")
	}
	return dr.DrainNode(ctx, req.Id, time.Now().Add(d).UTC())
}

// RunDrains ends, every interval until ctx ends and while this control
// plane leads, the running sandboxes of nodes whose drain deadline passed.
func (s *Server) RunDrains(ctx context.Context, interval time.Duration) {
	leading := func() bool { return s.cfg.Fleet != nil && s.leading() }
	periodic.WhileLeading(ctx, interval, leading, func() {
		if err := s.drainOnce(ctx, time.Now()); err != nil && ctx.Err() == nil {
			s.log.Warn("drain deadlines", "err", err)
		}
	})
}

// drainOnce ends the running sandboxes of the nodes whose drain deadline
// is before now.
func (s *Server) drainOnce(ctx context.Context, now time.Time) error {
	ns, err := s.cfg.Fleet.Nodes(ctx)
	if err != nil {
		return err
	}
	due := map[string]NodeStatus{}
	for _, n := range ns {
		if n.State == store.NodeDraining && !n.DrainDeadline.IsZero() && now.After(n.DrainDeadline) {
			due[n.ID] = n
		}
	}
	if len(due) == 0 {
		return nil
	}
	sbs, err := s.store.ListSandboxes(ctx, "", true)
	if err != nil {
		return err
	}
	nodeOf, _ := s.node.(interface{ NodeOf(id string) string })
	for _, sb := range sbs {
		if sb.State != store.StateRunning {
			continue
		}
		on := sb.Node
		if on == "" && nodeOf != nil {
			on = nodeOf.NodeOf(sb.ID)
		}
		n, ok := due[on]
		if !ok {
			continue
		}
		detail := fmt.Sprintf("node %s (%s) drained: its deadline %s passed", n.Name, n.ID, n.DrainDeadline.Format(time.RFC3339))
		s.log.Info("drain deadline: terminating", "sandbox", sb.ID, "node", n.ID)
		go s.endWith(sb.ID, "drained", detail)
	}
	return nil
}

// endWith is end with the error recorded as the sandbox's (detail).
func (s *Server) endWith(id, reason, detail string) {
	if l := s.liveHere(id); l != nil {
		s.live.mu.Lock()
		if l.reason == "" {
			l.detail = detail
		}
		s.live.mu.Unlock()
	}
	s.end(id, reason)
}
