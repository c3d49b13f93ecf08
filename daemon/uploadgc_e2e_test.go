package daemon_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/errdefs"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetUploadGC: with --upload-gc-grace 3s on the control plane and
// the node, the uploads of a sandbox that ended (its blob on the control
// plane, the node's copy) are removed once the grace passed, while those a
// running sandbox binds (a file and an extracted directory) stay through
// the same passes and still read in the sandbox; once it ends they go too,
// on both machines. Without the GC nothing is ever removed.
func TestFleetUploadGC(t *testing.T) {
	control := chalktest.StartControl(t, "--upload-gc-grace", "3s")
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0", "--upload-gc-grace", "3s")
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)
	waitNodesHealthy(t, control, "node1")

	ctlBlobs, nodeBlobs, nodeTrees := filepath.Join(control.Dir, "blobs"), filepath.Join(n1.Dir, "blobs"), filepath.Join(n1.Dir, "mounts")
	// added: what dir holds now that it did not hold in before.
	added := func(dir string, before map[string]bool) []string {
		var out []string
		for n := range uploadNames(dir) {
			if !before[n] {
				out = append(out, n)
			}
		}
		return out
	}

	dir := t.TempDir()
	writeFile(t, dir, "src/a.txt", "A")
	kept := chalkcompute.Base("busybox").
		AddLocalFile(writeFile(t, dir, "data.txt", "mounted"), "/data/data.txt", chalkcompute.Mount).
		AddLocalDir(filepath.Join(dir, "src"), "/srcdir", chalkcompute.Mount)
	a, err := c.Create(ctx, kept, chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	if out := mustExec(t, a, "sh", "-c", "cat /data/data.txt /srcdir/a.txt"); out != "mountedA" {
		t.Fatalf("mounts: %q", out)
	}
	aCtl, aNode, aTrees := uploadNames(ctlBlobs), uploadNames(nodeBlobs), uploadNames(nodeTrees)
	if len(aCtl) != 2 || len(aNode) != 2 || len(aTrees) != 1 {
		t.Fatalf("uploads of the running sandbox: control %v, node %v, trees %v; want 2, 2, 1", aCtl, aNode, aTrees)
	}

	// Another sandbox's upload, ended: it goes from both machines, in
	// passes that keep the running sandbox's (older than the grace too).
	b, err := c.Create(ctx, chalkcompute.Base("busybox").
		AddLocalFile(writeFile(t, dir, "other.txt", "other"), "/data/other.txt", chalkcompute.Mount))
	if err != nil {
		t.Fatal(err)
	}
	bCtl, bNode := added(ctlBlobs, aCtl), added(nodeBlobs, aNode)
	if len(bCtl) != 1 || len(bNode) != 1 {
		t.Fatalf("the second sandbox's upload: control %v, node %v", bCtl, bNode)
	}
	if _, err := b.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	waitUploadsGone(t, "the ended sandbox's upload on the control plane", ctlBlobs, bCtl)
	waitUploadsGone(t, "the ended sandbox's copy on its node", nodeBlobs, bNode)
	// The GC passes that removed them (3 s after their last use, after
	// the running sandbox's) kept what the running sandbox binds.
	if got := uploadNames(ctlBlobs); !maps.Equal(got, aCtl) {
		t.Fatalf("control plane blobs while a sandbox binds them: %v, want %v", got, aCtl)
	}
	if got, gotTrees := uploadNames(nodeBlobs), uploadNames(nodeTrees); !maps.Equal(got, aNode) || !maps.Equal(gotTrees, aTrees) {
		t.Fatalf("node copies while a sandbox binds them: %v %v, want %v %v", got, gotTrees, aNode, aTrees)
	}
	if out := mustExec(t, a, "sh", "-c", "cat /data/data.txt /srcdir/a.txt"); out != "mountedA" {
		t.Fatalf("mounts of the running sandbox after GC passes: %q", out)
	}
	if !strings.Contains(n1.Log(), "upload GC: removed unreferenced uploads") || !strings.Contains(control.Log(), "upload GC: removed unreferenced uploads") {
		t.Error("the removals were not logged")
	}

	// It ends: its uploads go too.
	if _, err := a.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	waitUploadsGone(t, "the uploads of the sandbox that ended, on the control plane", ctlBlobs, slices.Collect(maps.Keys(aCtl)))
	waitUploadsGone(t, "the copies of the sandbox that ended, on its node", nodeBlobs, slices.Collect(maps.Keys(aNode)))
	waitUploadsGone(t, "the extracted tree of the sandbox that ended, on its node", nodeTrees, slices.Collect(maps.Keys(aTrees)))
}

// TestUploadGC: the all-in-one daemon with --upload-gc-grace 3s: an ended
// sandbox's upload goes, while a running sandbox's file and extracted
// directory (referred to by its record and its bundle) stay through the
// same passes and still read; once it ends they go too, tree included.
func TestUploadGC(t *testing.T) {
	n := chalktest.Start(t, "--upload-gc-grace", "3s")
	c := n.Client()
	ctx := ctxT(t, 3*time.Minute)
	blobs, trees := filepath.Join(n.Dir, "blobs"), filepath.Join(n.Dir, "mounts")
	waitGone := func(what, dir string, gone map[string]bool) {
		waitUploadsGone(t, what, dir, slices.Collect(maps.Keys(gone)))
	}
	dir := t.TempDir()
	writeFile(t, dir, "src/a.txt", "A")
	a, err := c.Create(ctx, chalkcompute.Base("busybox").
		AddLocalFile(writeFile(t, dir, "data.txt", "mounted"), "/data/data.txt", chalkcompute.Mount).
		AddLocalDir(filepath.Join(dir, "src"), "/srcdir", chalkcompute.Mount), chalkcompute.WithEntrypoint("sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	aBlobs, aTrees := uploadNames(blobs), uploadNames(trees)
	if len(aBlobs) != 2 || len(aTrees) != 1 {
		t.Fatalf("uploads of the running sandbox: %v %v", aBlobs, aTrees)
	}
	b, err := c.Create(ctx, chalkcompute.Base("busybox").
		AddLocalFile(writeFile(t, dir, "other.txt", "other"), "/data/other.txt", chalkcompute.Mount))
	if err != nil {
		t.Fatal(err)
	}
	bBlobs := uploadNames(blobs)
	for n := range aBlobs {
		delete(bBlobs, n)
	}
	if len(bBlobs) != 1 {
		t.Fatalf("the second sandbox's upload: %v", bBlobs)
	}
	if _, err := b.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	waitGone("the ended sandbox's upload", blobs, bBlobs)
	if got, gotTrees := uploadNames(blobs), uploadNames(trees); !maps.Equal(got, aBlobs) || !maps.Equal(gotTrees, aTrees) {
		t.Fatalf("uploads while a sandbox binds them: %v %v, want %v %v", got, gotTrees, aBlobs, aTrees)
	}
	if out := mustExec(t, a, "sh", "-c", "cat /data/data.txt /srcdir/a.txt"); out != "mountedA" {
		t.Fatalf("mounts of the running sandbox after GC passes: %q", out)
	}
	if q, err := c.Quota(ctx, ""); err != nil || q.UploadBytes == 0 {
		t.Fatalf("the org's uploads while a sandbox binds them: %v %v, want charged", q, err)
	}
	if _, err := a.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	waitGone("the uploads of the sandbox that ended", blobs, aBlobs)
	waitGone("the extracted tree of the sandbox that ended", trees, aTrees)
	// The org's records of removed content go with it: its budget is
	// charged for them no more.
	if q, err := c.Quota(ctx, ""); err != nil || q.UploadBytes != 0 {
		t.Fatalf("the org's uploads after the GC removed them all: %v %v, want 0 bytes", q, err)
	}
}

// TestUploadBudgetE2E: through the Go SDK, a create whose local files
// exceed the org's upload quota (--org-max-upload-bytes) fails with
// resource_exhausted naming the quota and the numbers, and nothing of
// the refused content is on disk; within the quota it runs.
func TestUploadBudgetE2E(t *testing.T) {
	n := chalktest.Start(t, "--org-max-upload-bytes", "100")
	c := n.Client()
	ctx := ctxT(t, 2*time.Minute)
	dir := t.TempDir()
	small := writeFile(t, dir, "small.txt", strings.Repeat("s", 60))
	big := writeFile(t, dir, "big.txt", strings.Repeat("b", 60))
	sb, err := c.Create(ctx, chalkcompute.Base("busybox").AddLocalFile(small, "/data/small.txt", chalkcompute.Mount))
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Terminate(context.Background())
	blobs := filepath.Join(n.Dir, "blobs")
	before := uploadNames(blobs)
	_, err = c.Create(ctx, chalkcompute.Base("busybox").AddLocalFile(big, "/data/big.txt", chalkcompute.Mount))
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("a create past the upload quota: %v, want resource_exhausted", err)
	}
	for _, want := range []string{"upload quota is 100 bytes", "60 bytes of uploads recorded", "max_upload_bytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("the SDK's error %q does not say %q", err, want)
		}
	}
	if after := uploadNames(blobs); !maps.Equal(before, after) {
		t.Fatalf("the refused upload left content: %v, before %v", after, before)
	}
	q, err := c.Quota(ctx, "")
	if err != nil || q.MaxUploadBytes != 100 || q.UploadBytes != 60 {
		t.Fatalf("quota: %v %v, want 60 of 100 bytes", q, err)
	}
}

// uploadNames lists the uploads (blobs, extracted trees) in dir, not the
// hidden entries (temporary files, locks).
func uploadNames(dir string) map[string]bool {
	out := map[string]bool{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".") {
			out[e.Name()] = true
		}
	}
	return out
}

// waitUploadsGone waits until none of gone is in dir any more (the upload
// GC removed them; grace 3 s in these tests), within 60 s.
func waitUploadsGone(t *testing.T, what, dir string, gone []string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		now := uploadNames(dir)
		if !slices.ContainsFunc(gone, func(n string) bool { return now[n] }) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v still in %s after 60 s (grace 3 s)", what, gone, dir)
		}
		time.Sleep(100 * time.Millisecond) // polling the data dir for the GC's removals
	}
}
