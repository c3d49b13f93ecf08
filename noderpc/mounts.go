package noderpc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs"
	nodev1 "github.com/chalkcompute/chalkcompute/gen/chalk/node/v1"
)

// Upload mounts in fleet mode (`--mount`: files uploaded to the control
// plane, bind-mounted read-only into a sandbox). The content lives in the
// control plane's blob store; before the sandbox starts, the control plane
// sends each piece to the sandbox's node (PutMount, by sha256 digest,
// which the node checks), the node keeps it (a directory extracted once
// per digest, confined as on one machine) and the start binds the node's
// copy. Content a node has is not sent again.

// MaxMount bounds the content of one upload mount a node takes.
const MaxMount = 4 << 30

// mountDigest is the form of an upload's digest.
var mountDigest = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// Mounts is where a node keeps upload mount content (daemon's nodeMounts).
type Mounts interface {
	// Path is the content's path on the node if it is there (for a
	// directory, its extracted tree).
	Path(digest string, isDir bool) (string, bool)
	// Put stores the content read from r (at most MaxMount bytes, hashing
	// to digest) and returns its path.
	Put(digest string, isDir bool, r io.Reader) (string, error)
}

// WithMounts lets the node take upload mount content (PutMount).
func (s *Server) WithMounts(m Mounts) *Server {
	s.mounts = m
	return s
}

func (s *Server) PutMount(ctx context.Context, stream *connect.ClientStream[nodev1.PutMountInput]) (*connect.Response[nodev1.PutMountResponse], error) {
	if s.mounts == nil {
		return nil, fmt.Errorf("upload mounts: this node takes none: %w", errdefs.ErrFailedPrecondition)
	}
	if !stream.Receive() {
		if err := stream.Err(); err != nil {
			return nil, err
		}
		return nil, invalid("put mount: no message")
	}
	first := stream.Msg()
	if !mountDigest.MatchString(first.Digest) {
		return nil, invalid("put mount: digest %.80q: want sha256:<64 hex>", first.Digest)
	}
	if p, ok := s.mounts.Path(first.Digest, first.IsDir); ok {
		return connect.NewResponse(&nodev1.PutMountResponse{Path: p}), nil
	}
	p, err := s.mounts.Put(first.Digest, first.IsDir, &chunkReader{stream: stream, buf: first.Chunk})
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&nodev1.PutMountResponse{Path: p}), nil
}

// chunkReader reads a PutMount stream's chunks in order.
type chunkReader struct {
	stream *connect.ClientStream[nodev1.PutMountInput]
	buf    []byte
}

func (c *chunkReader) Read(p []byte) (int, error) {
	for len(c.buf) == 0 {
		if !c.stream.Receive() {
			if err := c.stream.Err(); err != nil {
				return 0, err
			}
			return 0, io.EOF
		}
		c.buf = c.stream.Msg().Chunk
	}
	n := copy(p, c.buf)
	c.buf = c.buf[n:]
	return n, nil
}

// PutMount sends upload content (read from r) to the node and returns its
// path there; the node may answer before it is all sent (it has it).
func (c *Client) PutMount(ctx context.Context, digest string, isDir bool, r io.Reader) (string, error) {
	stream := c.rpc.PutMount(ctx)
	err := stream.Send(&nodev1.PutMountInput{Digest: digest, IsDir: isDir})
	buf := make([]byte, 256<<10)
	for err == nil {
		n, rerr := r.Read(buf)
		if n > 0 {
			err = stream.Send(&nodev1.PutMountInput{Chunk: buf[:n]})
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			_, _ = stream.CloseAndReceive()
			return "", rerr
		}
	}
	// A Send error (io.EOF: the node answered early) is reported by
	// CloseAndReceive with the node's answer.
	res, err := stream.CloseAndReceive()
	if err != nil {
		return "", wire(err)
	}
	return res.Msg.Path, nil
}

// mountPutter is a node that takes upload mount content (Client).
type mountPutter interface {
	PutMount(ctx context.Context, digest string, isDir bool, r io.Reader) (string, error)
}

var _ mountPutter = (*Client)(nil)

// PutMount sends upload content to the node sandbox id is placed on and
// returns its path there (for the sandbox's binds).
func (r *Router) PutMount(ctx context.Context, id, digest string, isDir bool, content io.Reader) (string, error) {
	m, err := r.on(id)
	if err != nil {
		return "", err
	}
	mp, ok := m.client.(mountPutter)
	if !ok {
		return "", fmt.Errorf("sandbox %q: node %s takes no upload mounts: %w", id, m.rec.ID, errdefs.ErrFailedPrecondition)
	}
	return mp.PutMount(ctx, digest, isDir, content)
}
