package chalkcompute

import (
	"context"
	"errors"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
)

// snapshotOptions configure Snapshot.
type snapshotOptions struct {
	progress func(*v1.SnapshotProgress)
}

// SnapshotOption configures Snapshot.
type SnapshotOption func(*snapshotOptions)

// SnapshotProgress calls fn with each progress message (freeze, layer,
// push with bytes of total, done).
func SnapshotProgress(fn func(*v1.SnapshotProgress)) SnapshotOption {
	return func(o *snapshotOptions) { o.progress = fn }
}

// Snapshot commits the sandbox's filesystem changes as a new layer on its
// image and returns the pushed image: its Ref is accepted by Create (as
// Base(ref)) and as the base of an image spec, in the caller's org only.
// The sandbox is frozen while the layer is taken, then thawed; the same
// filesystem on the same image gives the same digest.
func (s *Sandbox) Snapshot(ctx context.Context, opts ...SnapshotOption) (*v1.Image, error) {
	var o snapshotOptions
	for _, opt := range opts {
		opt(&o)
	}
	st, err := s.c.sandbox.Snapshot(ctx, connect.NewRequest(&v1.SnapshotSandboxRequest{SandboxId: s.id}))
	if err != nil {
		return nil, fromConnect(err)
	}
	defer st.Close()
	var img *v1.Image
	for st.Receive() {
		if o.progress != nil {
			o.progress(st.Msg())
		}
		if st.Msg().Image != nil {
			img = st.Msg().Image
		}
	}
	if err := st.Err(); err != nil {
		return nil, fromConnect(err)
	}
	if img == nil {
		return nil, errors.New("snapshot: stream ended without the image")
	}
	return img, nil
}

// Pause freezes every process of the sandbox (it uses no CPU until Resume;
// its memory and its timeouts keep going). Exec and file access fail with
// a failed precondition while it is paused.
func (s *Sandbox) Pause(ctx context.Context) (*v1.Sandbox, error) {
	resp, err := s.c.sandbox.Pause(ctx, connect.NewRequest(&v1.PauseSandboxRequest{SandboxId: s.id}))
	if err != nil {
		return nil, fromConnect(err)
	}
	s.Info = resp.Msg
	return resp.Msg, nil
}

// Resume thaws a paused sandbox.
func (s *Sandbox) Resume(ctx context.Context) (*v1.Sandbox, error) {
	resp, err := s.c.sandbox.Resume(ctx, connect.NewRequest(&v1.ResumeSandboxRequest{SandboxId: s.id}))
	if err != nil {
		return nil, fromConnect(err)
	}
	s.Info = resp.Msg
	return resp.Msg, nil
}
