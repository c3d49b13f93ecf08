package daemon_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetMounts: `--mount` uploads (a file and a directory) reach a
// sandbox on a node: the control plane sends the content to the node,
// which keeps it in its own data dir (the directory extracted there) and
// binds it read-only; the sandbox reads both and cannot write the file.
func TestFleetMounts(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0")
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)
	waitNodesHealthy(t, control, "node1")

	dir := t.TempDir()
	writeFile(t, dir, "src/a.txt", "A")
	writeFile(t, dir, "src/sub/b.txt", "B")
	img := chalkcompute.Base("busybox").
		AddLocalFile(writeFile(t, dir, "data.txt", "mounted"), "/data/data.txt", chalkcompute.Mount).
		AddLocalDir(filepath.Join(dir, "src"), "/srcdir", chalkcompute.Mount)
	for i := range 2 { // the second time the node has the content already
		sb, err := c.Create(ctx, img)
		if err != nil {
			t.Fatalf("create with upload mounts in fleet mode: %v", err)
		}
		if out := mustExec(t, sb, "sh", "-c", "cat /data/data.txt /srcdir/a.txt /srcdir/sub/b.txt"); out != "mountedAB" {
			t.Fatalf("mounts on the node (create %d): %q", i, out)
		}
		if res, _ := sb.Exec(ctx, []string{"sh", "-c", "echo x > /data/data.txt"}); res == nil || res.Code == 0 {
			t.Fatal("a mounted file is writable")
		}
		if _, err := sb.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, sub := range []string{"blobs", "mounts"} {
		if ents, err := os.ReadDir(filepath.Join(n1.Dir, sub)); err != nil || len(ents) == 0 {
			t.Errorf("the node's %s: %v %v, want the uploads kept there", sub, ents, err)
		}
	}
}
