package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/imagebuild"
	"github.com/chalkcompute/chalkcompute/node"
	"github.com/chalkcompute/chalkcompute/noderpc"
	"github.com/chalkcompute/chalkcompute/sandbox"
	"github.com/chalkcompute/chalkcompute/store"
)

// Upload mounts in fleet mode (noderpc/mounts.go): the control plane sends
// a sandbox's upload content to its node before the start; the node keeps
// it as the all-in-one daemon keeps uploads (DataDir/blobs, directories
// extracted once per digest under DataDir/mounts) and the start binds its
// copy read-only.

// fleetMountBinds sends sb's upload mounts to its node and binds the
// node's copies (control plane).
func (d *Daemon) fleetMountBinds(ctx context.Context, sb *store.Sandbox, req *node.StartRequest) error {
	for _, m := range sb.Mounts {
		rc, err := d.im.blobs.Open(m.Digest)
		if err != nil {
			return fmt.Errorf("mount %s: %w", m.Dst, err)
		}
		path, err := d.router.PutMount(ctx, sb.ID, m.Digest, m.IsDir, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("mount %s: to the sandbox's node: %w", m.Dst, err)
		}
		req.Binds = append(req.Binds, sandbox.Bind{Source: path, Dest: m.Dst, ReadOnly: true})
	}
	return nil
}

// nodeMounts is a node's noderpc.Mounts. Each copy it hands out is held
// (pend) until a start binding it has run (the sandbox's bundle then
// refers to it, uploadgc.go) or startWindow passed.
type nodeMounts struct {
	im   *images
	pend *pendingMounts
}

var _ noderpc.Mounts = nodeMounts{}

// newNodeMounts keeps upload content in dataDir as the all-in-one daemon
// does (node mode).
func newNodeMounts(dataDir string) (nodeMounts, error) {
	blobs, err := imagebuild.NewBlobs(filepath.Join(dataDir, "blobs"))
	if err != nil {
		return nodeMounts{}, err
	}
	dir := filepath.Join(dataDir, "mounts")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nodeMounts{}, err
	}
	return nodeMounts{&images{blobs: blobs, dir: dir}, &pendingMounts{blobs: blobs, held: map[string][]pendingPin{}, now: time.Now}}, nil
}

// Started releases the hold of the copies a start bound (noderpc.Server.Start).
func (n nodeMounts) Started(binds []sandbox.Bind) {
	n.pend.started(binds, n.im.blobs.Dir(), n.im.dir)
}

// gc collects this node's copies that no sandbox here binds (grace <= 0:
// never).
func (n nodeMounts) gc(ctx context.Context, log *slog.Logger, dataDir string, grace time.Duration) {
	uploadGC(ctx, log, n.im.blobs, n.im.dir, grace, nil, nil, n.pend.refs,
		bundleRefs(filepath.Join(dataDir, "sandboxes"), n.im.blobs.Dir(), n.im.dir))
}

func (n nodeMounts) Path(digest string, isDir bool) (string, bool) {
	if !n.pend.hold(digest) {
		return "", false
	}
	if !isDir {
		return n.im.blobs.Path(digest), true
	}
	p := filepath.Join(n.im.dir, strings.TrimPrefix(digest, "sha256:"))
	if _, err := os.Stat(p); err != nil {
		n.pend.unhold(digest)
		return "", false
	}
	return p, true
}

func (n nodeMounts) Put(digest string, isDir bool, r io.Reader) (string, error) {
	if err := n.im.blobs.PutFrom(digest, r, noderpc.MaxMount); err != nil {
		return "", err
	}
	if !n.pend.hold(digest) {
		return "", fmt.Errorf("content %s: removed as it was stored: %w", digest, errdefs.ErrUnavailable)
	}
	if isDir {
		p, err := n.im.extracted(digest)
		if err != nil {
			n.pend.unhold(digest)
		}
		return p, err
	}
	return n.im.blobs.Path(digest), nil
}
