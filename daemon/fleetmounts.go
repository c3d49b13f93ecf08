package daemon

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

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

// nodeMounts is a node's noderpc.Mounts.
type nodeMounts struct{ im *images }

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
	return nodeMounts{&images{blobs: blobs, dir: dir}}, nil
}

func (n nodeMounts) Path(digest string, isDir bool) (string, bool) {
	if !n.im.blobs.Has(digest) {
		return "", false
	}
	if !isDir {
		return n.im.blobs.Path(digest), true
	}
	p := filepath.Join(n.im.dir, strings.TrimPrefix(digest, "sha256:"))
	if _, err := os.Stat(p); err != nil {
		return "", false
	}
	return p, true
}

func (n nodeMounts) Put(digest string, isDir bool, r io.Reader) (string, error) {
	if err := n.im.blobs.PutFrom(digest, r, noderpc.MaxMount); err != nil {
		return "", err
	}
	if isDir {
		return n.im.extracted(digest)
	}
	return n.im.blobs.Path(digest), nil
}
