package api

import (
	"context"
	"fmt"

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

// Snapshot commits the sandbox's filesystem changes as a layer on its image
// (the sandbox is frozen while the layer is taken), pushes the image to the
// embedded registry and puts it in the caller's org's view only.
func (h *sandboxService) Snapshot(ctx context.Context, req *connect.Request[v1.SnapshotSandboxRequest], stream *connect.ServerStream[v1.SnapshotProgress]) error {
	s := h.s
	p, err := user(ctx)
	if err != nil {
		return err
	}
	sb, err := s.liveFor(ctx, req.Msg.SandboxId)
	if err != nil {
		return err
	}
	exclude := make([]string, 0, len(sb.Mounts))
	for _, m := range sb.Mounts {
		exclude = append(exclude, m.Dst) // bind mounts: uploads, not the sandbox's writes
	}
	res, err := s.node.Snapshot(ctx, node.SnapshotRequest{
		ID: sb.ID, Slot: sb.Slot, ImageRef: sb.LocalRef, ImageDigest: sb.ImageDigest, Exclude: exclude,
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
