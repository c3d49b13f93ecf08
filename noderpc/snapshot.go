package noderpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
)

// Snapshots in fleet mode. A node holds only the read-only pull
// credential, and gets no other: giving it one scoped to "its" snapshot
// repositories would let a node (or whoever owns one) write images that
// every node then pulls. Instead the node takes the layer (it has the
// sandbox's writable layer) and streams it to the control plane over the
// node API (SnapshotLayer), and the control plane appends it to the
// sandbox's image and pushes the result into its registry itself
// (Router.Snapshot with SnapshotPush). The layer is as hostile as any
// image layer (it is what the sandbox wrote): it is bounded here
// (MaxSnapshotLayer) and unpacked only by nodes' caches, which treat every
// layer so.

// MaxSnapshotLayer bounds a snapshot layer the control plane takes from a
// node (uncompressed tar); a sandbox's disk quota bounds it well below.
const MaxSnapshotLayer = 16 << 30

// snapshotChunk is the size of a layer chunk on the wire.
const snapshotChunk = 256 << 10

// layerTaker is a node that hands out a sandbox's snapshot layer
// (node.Agent).
type layerTaker interface {
	SnapshotLayer(ctx context.Context, req node.SnapshotRequest) (string, error)
}

var _ layerTaker = (*node.Agent)(nil)

func (s *Server) SnapshotLayer(ctx context.Context, req *connect.Request[nodev1.SnapshotRequest], stream *connect.ServerStream[nodev1.SnapshotLayerEvent]) error {
	lt, ok := s.node.(layerTaker)
	if !ok {
		return fmt.Errorf("snapshot layer: this node cannot take one: %w", errdefs.ErrFailedPrecondition)
	}
	sp := req.Msg.Spec
	if sp == nil {
		return invalid("snapshot layer: spec is required")
	}
	r := node.SnapshotRequest{ID: sp.Id, Slot: int(sp.Slot), ImageRef: sp.ImageRef, ImageDigest: sp.ImageDigest, Exclude: sp.Exclude, Stopped: sp.Stopped}
	var mu sync.Mutex
	if sp.Progress {
		r.Progress = func(phase string, cur, total int64) {
			mu.Lock()
			defer mu.Unlock()
			_ = stream.Send(&nodev1.SnapshotLayerEvent{Event: &nodev1.SnapshotLayerEvent_Progress{Progress: &nodev1.Progress{Phase: phase, Current: cur, Total: total}}})
		}
	}
	path, err := lt.SnapshotLayer(ctx, r)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	mu.Lock()
	defer mu.Unlock()
	buf := make([]byte, snapshotChunk)
	for {
		n, rerr := io.ReadFull(f, buf)
		eof := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)
		if rerr != nil && !eof {
			return rerr
		}
		ev := &nodev1.SnapshotLayerEvent{Event: &nodev1.SnapshotLayerEvent_Chunk{Chunk: buf[:n]}, Eof: eof}
		if err := stream.Send(ev); err != nil {
			return err
		}
		if eof {
			return nil
		}
	}
}

// SnapshotLayer streams sandbox req.ID's snapshot layer from the node into
// w, at most max bytes (more fails the call: resource exhausted), and
// returns its size. A stream that ends before the node says the layer is
// complete fails.
func (c *Client) SnapshotLayer(ctx context.Context, req node.SnapshotRequest, w io.Writer, max int64) (int64, error) {
	stream, err := c.rpc.SnapshotLayer(ctx, connect.NewRequest(&nodev1.SnapshotRequest{Spec: &nodev1.SnapshotSpec{
		Id: req.ID, Slot: int32(req.Slot), ImageRef: req.ImageRef, ImageDigest: req.ImageDigest, Exclude: req.Exclude, Progress: req.Progress != nil,
		Stopped: req.Stopped}}))
	if err != nil {
		return 0, wire(err)
	}
	defer stream.Close()
	var n int64
	for stream.Receive() {
		msg := stream.Msg()
		switch e := msg.Event.(type) {
		case *nodev1.SnapshotLayerEvent_Progress:
			if req.Progress != nil {
				req.Progress(e.Progress.Phase, e.Progress.Current, e.Progress.Total)
			}
		case *nodev1.SnapshotLayerEvent_Chunk:
			if n+int64(len(e.Chunk)) > max {
				return n, fmt.Errorf("sandbox %q: snapshot layer larger than %d bytes: %w", req.ID, max, errdefs.ErrResourceExhausted)
			}
			if _, err := w.Write(e.Chunk); err != nil {
				return n, err
			}
			n += int64(len(e.Chunk))
		}
		if msg.Eof {
			return n, nil
		}
	}
	if err := stream.Err(); err != nil {
		return n, wire(err)
	}
	return n, fmt.Errorf("sandbox %q: the node ended the snapshot layer early (%d bytes): %w", req.ID, n, errdefs.ErrUnavailable)
}

// layerSource is a node the router can take a snapshot layer from
// (Client).
type layerSource interface {
	SnapshotLayer(ctx context.Context, req node.SnapshotRequest, w io.Writer, max int64) (int64, error)
}

var _ layerSource = (*Client)(nil)

// SnapshotPush appends the layer tar at layerPath to the image of
// req (ImageRef, ImageDigest: as recorded for the sandbox) and pushes the
// result into the control plane's registry.
type SnapshotPush func(ctx context.Context, req node.SnapshotRequest, layerPath string) (*imagebuild.SnapshotResult, error)

// fleetSnapshots is how a Router takes snapshots (SetSnapshots).
type fleetSnapshots struct {
	dir  string
	push SnapshotPush
}

// SetSnapshots makes snapshots work through this router: layers are taken
// from the sandbox's node into dir (temporary files) and pushed with push.
// Without it Snapshot is refused.
func (r *Router) SetSnapshots(dir string, push SnapshotPush) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	r.mu.Lock()
	r.snapshots = &fleetSnapshots{dir: dir, push: push}
	r.mu.Unlock()
	return nil
}

// Snapshot takes the snapshot layer of a running sandbox from its node and
// pushes its image with the layer from the control plane (SetSnapshots).
func (r *Router) Snapshot(ctx context.Context, req node.SnapshotRequest) (*imagebuild.SnapshotResult, error) {
	r.mu.Lock()
	fs := r.snapshots
	r.mu.Unlock()
	if fs == nil {
		return nil, fmt.Errorf("sandbox %q: snapshots are not available on this control plane: %w", req.ID, errdefs.ErrFailedPrecondition)
	}
	var m *member
	var err error
	if req.Stopped {
		m, err = r.keptAt(req.ID)
	} else {
		m, err = r.on(req.ID)
	}
	if err != nil {
		return nil, err
	}
	src, ok := m.client.(layerSource)
	if !ok {
		return nil, fmt.Errorf("sandbox %q: node %s cannot hand out a snapshot layer: %w", req.ID, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	f, err := os.CreateTemp(fs.dir, "layer-*.tar")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	_, err = src.SnapshotLayer(ctx, req, f, MaxSnapshotLayer)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("sandbox %q: snapshot layer from node %s: %w", req.ID, m.rec.ID, err)
	}
	return fs.push(ctx, req, f.Name())
}

// keptLayer is the node an ended sandbox's writable layer is kept on, and
// until when at most.
type keptLayer struct {
	node  string
	until time.Time
}

// keptOn records that node keeps sandbox id's layer for at most d (its
// teardown kept it: the node says at snapshot time whether it still does).
func (r *Router) keptOn(id, nodeID string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.kept == nil {
		r.kept = map[string]keptLayer{}
	}
	now := r.now()
	for k, v := range r.kept {
		if now.After(v.until) {
			delete(r.kept, k)
		}
	}
	r.kept[id] = keptLayer{node: nodeID, until: now.Add(d)}
}

// keptAt is the healthy node keeping ended sandbox id's layer.
func (r *Router) keptAt(id string) (*member, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, ok := r.kept[id]
	if !ok || r.now().After(k.until) {
		return nil, fmt.Errorf("sandbox %q is stopped and its writable layer is kept on no node: %w", id, errdefs.ErrFailedPrecondition)
	}
	m := r.members[k.node]
	if m == nil || !m.healthy {
		return nil, fmt.Errorf("sandbox %q: node %s, which keeps its layer: %w", id, k.node, node.ErrLost)
	}
	return m, nil
}
