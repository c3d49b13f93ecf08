package api

import (
	"context"
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/store"
)

// statePaused is the state the API shows for a running sandbox whose
// processes are frozen (store.Sandbox.Paused).
const statePaused = "paused"

// liveFor is sandboxFor for users, requiring the sandbox to run, paused or
// not (snapshot, pause, resume).
func (s *Server) liveFor(ctx context.Context, id string) (*store.Sandbox, error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	sb, err := s.sandboxFor(ctx, id)
	if err != nil {
		return nil, err
	}
	if sb.State != store.StateRunning || !s.IsRunning(ctx, sb.ID) {
		// A stopped sandbox's writable layer is removed when it ends.
		return nil, fmt.Errorf("sandbox %q is %s: snapshot, pause and resume need a running sandbox: %w", sb.ID, sb.State, errdefs.ErrFailedPrecondition)
	}
	return sb, nil
}

// keptLayers are the stopped sandboxes whose writable layer the node keeps
// for a snapshot: each for a grace period after its end, within a budget
// of bytes per org (host memory no cgroup counts once the sandbox is gone).
// The node removes a layer at the same expiry (and every one at a
// restart); this is the control plane's account of them.
type keptLayers struct {
	grace  time.Duration // <= 0: nothing is kept
	perOrg int64         // bytes

	mu    sync.Mutex
	byOrg map[string]int64     // org -> bytes kept
	until map[string]keptLayer // sandbox id -> its layer
}

type keptLayer struct {
	org   string
	size  int64
	until time.Time
}

func newKeptLayers(grace time.Duration, perOrg int64) *keptLayers {
	return &keptLayers{grace: grace, perOrg: perOrg, byOrg: map[string]int64{}, until: map[string]keptLayer{}}
}

// teardown has the node tear sandbox sb down, keeping its writable layer
// if the org's budget has room for it.
func (k *keptLayers) teardown(n Node, sb *store.Sandbox) (int64, error) {
	if k.grace <= 0 {
		return n.Teardown(sb.ID, sb.Slot, node.KeepUpper{})
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	room := k.perOrg - k.byOrg[sb.OrgID]
	keep := node.KeepUpper{}
	if room > 0 {
		keep = node.KeepUpper{For: k.grace, MaxBytes: room}
	}
	size, err := n.Teardown(sb.ID, sb.Slot, keep)
	if size > 0 {
		k.byOrg[sb.OrgID] += size
		k.until[sb.ID] = keptLayer{org: sb.OrgID, size: size, until: time.Now().Add(k.grace)}
		time.AfterFunc(k.grace, func() { k.expire(sb.ID) })
	}
	return size, err
}

func (k *keptLayers) expire(id string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l, ok := k.until[id]; ok {
		delete(k.until, id)
		if k.byOrg[l.org] -= l.size; k.byOrg[l.org] <= 0 {
			delete(k.byOrg, l.org)
		}
	}
}

// kept reports whether stopped sandbox id's layer is (still) kept.
func (k *keptLayers) kept(id string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	l, ok := k.until[id]
	return ok && time.Now().Before(l.until)
}

// Snapshot commits the sandbox's filesystem changes as a layer on its image
// (the sandbox is frozen while the layer is taken), pushes the image to the
// embedded registry and puts it in the caller's org's view only. A stopped
// sandbox can be snapshotted while its writable layer is kept (keptLayers).
func (h *sandboxService) Snapshot(ctx context.Context, req *connect.Request[v1.SnapshotSandboxRequest], stream *connect.ServerStream[v1.SnapshotProgress]) error {
	s := h.s
	p, err := user(ctx)
	if err != nil {
		return err
	}
	sb, err := s.snapshotFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return err
	}
	exclude := make([]string, 0, len(sb.Mounts))
	for _, m := range sb.Mounts {
		exclude = append(exclude, m.Dst) // bind mounts: uploads, not the sandbox's writes
	}
	res, err := s.node.Snapshot(ctx, node.SnapshotRequest{
		ID: sb.ID, Slot: sb.Slot, ImageRef: sb.LocalRef, ImageDigest: sb.ImageDigest, Exclude: exclude,
		Stopped: sb.State == store.StateStopped,
		Progress: func(phase string, cur, total int64) {
			_ = stream.Send(&v1.SnapshotProgress{Phase: phase, Current: cur, Total: total})
		},
	})
	if err != nil {
		return err
	}
	if err := s.store.AddOrgImages(ctx, p.OrgID, res.Digest, res.Ref, res.LocalRef); err != nil {
		return err
	}
	setAuditObject(ctx, res.Ref)
	return stream.Send(&v1.SnapshotProgress{Phase: "done", Current: res.Size, Total: res.Size, LayerDigest: res.DiffID,
		Image: &v1.Image{Ref: res.Ref, Digest: res.Digest, LocalRef: res.LocalRef, Size: res.Size}})
}

// snapshotFor is liveFor, also accepting a stopped sandbox whose writable
// layer is kept.
func (s *Server) snapshotFor(ctx context.Context, id string) (*store.Sandbox, error) {
	if _, err := user(ctx); err != nil {
		return nil, err
	}
	sb, err := s.sandboxFor(ctx, id)
	if err != nil {
		return nil, err
	}
	switch {
	case sb.State == store.StateRunning && s.IsRunning(ctx, sb.ID):
		return sb, nil
	case sb.State == store.StateStopped && s.kept.kept(sb.ID):
		return sb, nil
	case sb.State == store.StateStopped && s.kept.grace <= 0:
		return nil, fmt.Errorf("sandbox %q is stopped and this chalkd keeps no stopped sandbox's writable layer (chalkd --keep-stopped): snapshot it while it runs: %w", sb.ID, errdefs.ErrFailedPrecondition)
	case sb.State == store.StateStopped:
		return nil, fmt.Errorf("sandbox %q is stopped and its writable layer is gone: a stopped sandbox's layer is kept for %v after its end, while its org's kept layers hold at most %d MiB: %w",
			sb.ID, s.kept.grace, s.kept.perOrg>>20, errdefs.ErrFailedPrecondition)
	}
	return nil, fmt.Errorf("sandbox %q is %s: a snapshot needs a running sandbox, or a stopped one within its grace period: %w", sb.ID, sb.State, errdefs.ErrFailedPrecondition)
}

func (h *sandboxService) Pause(ctx context.Context, req *connect.Request[v1.PauseSandboxRequest]) (*connect.Response[v1.Sandbox], error) {
	return h.s.setPaused(ctx, req.Msg.SandboxId, true)
}

func (h *sandboxService) Resume(ctx context.Context, req *connect.Request[v1.ResumeSandboxRequest]) (*connect.Response[v1.Sandbox], error) {
	return h.s.setPaused(ctx, req.Msg.SandboxId, false)
}

// setPaused freezes or thaws a sandbox and records it. Its timeouts keep
// counting while it is paused (a paused sandbox still holds its memory,
// slot and quota).
func (s *Server) setPaused(ctx context.Context, id string, paused bool) (*connect.Response[v1.Sandbox], error) {
	sb, err := s.liveFor(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := s.node.SetPaused(ctx, sb.ID, paused); err != nil {
		return nil, fmt.Errorf("sandbox %q: %w", sb.ID, err)
	}
	if err := s.store.SetSandboxPaused(ctx, sb.ID, paused); err != nil {
		return nil, err
	}
	if !paused {
		s.touch(sb.ID)
	}
	if sb, err = s.store.GetSandbox(ctx, sb.ID); err != nil {
		return nil, err
	}
	return connect.NewResponse(toProto(sb)), nil
}
