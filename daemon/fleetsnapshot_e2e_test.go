package daemon_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetSnapshot: a snapshot of a sandbox on one node is taken there
// (frozen; the layer streamed to the control plane over the node API) and
// pushed by the control plane into its registry (no node holds a push
// credential: nodes keep no registry and their registry dir stays empty);
// a sandbox created from it on the other node (the first cordoned) sees the
// files and the deletion; the source runs on. The snapshot of a snapshot
// sandbox works too (its image is the control plane's as well), and so
// does one of a stopped sandbox (its layer kept on its node by its
// teardown).
func TestFleetSnapshot(t *testing.T) {
	control := chalktest.StartControl(t)
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0")
	n2 := chalktest.StartFleetNodeArgs(t, control, 2, "--prestart", "0")
	c := control.Client()
	ctx := ctxT(t, 3*time.Minute)
	waitNodesHealthy(t, control, "node1", "node2")

	on := func(n *chalktest.Node, id string) bool {
		_, err := os.Stat(filepath.Join(n.Dir, "sandboxes", id))
		return err == nil
	}
	nodeOf := func(id string) (*chalktest.Node, string) {
		switch {
		case on(n1, id):
			return n1, "node1"
		case on(n2, id):
			return n2, "node2"
		}
		t.Fatalf("sandbox %s is on no node", id)
		return nil, ""
	}
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEntrypoint("sh", "-c", "while true; do sleep 1; done"))
	if err != nil {
		t.Fatal(err)
	}
	src, srcName := nodeOf(sb.ID())
	if res, err := sb.Exec(ctx, []string{"sh", "-c", "mkdir -p /data && echo made-on-" + srcName + " > /data/state.txt && rm /bin/cat"}); err != nil || res.Code != 0 {
		t.Fatalf("write in the source: %+v %v", res, err)
	}
	var phases []string
	img, err := sb.Snapshot(ctx, chalkcompute.SnapshotProgress(func(p *v1.SnapshotProgress) { phases = append(phases, p.Phase) }))
	if err != nil {
		t.Fatalf("snapshot in fleet mode: %v", err)
	}
	if !strings.HasPrefix(img.Ref, "chalk.local/snapshot:") || !strings.HasPrefix(img.Digest, "sha256:") {
		t.Fatalf("snapshot image: %+v", img)
	}
	if got := strings.Join(phases, ","); !strings.Contains(got, "freeze") || !strings.Contains(got, "push") || !strings.HasSuffix(got, "done") {
		t.Errorf("progress phases %q: want freeze, layer, push..., done", got)
	}
	if res, err := sb.Exec(ctx, []string{"true"}); err != nil || res.Code != 0 {
		t.Fatalf("the source after its snapshot: %+v %v", res, err)
	}
	for _, n := range []*chalktest.Node{n1, n2} {
		if ents, err := os.ReadDir(filepath.Join(n.Dir, "registry")); err != nil || len(ents) != 0 {
			t.Errorf("node %s has a registry of its own: %v %v", n.Dir, ents, err)
		}
	}

	// On the other node.
	if _, errOut, code := control.CLI("admin", "node", "cordon", srcName); code != 0 {
		t.Fatalf("cordon %s: %s", srcName, errOut)
	}
	nb, err := c.Create(ctx, chalkcompute.Base(img.Ref), chalkcompute.WithEntrypoint("sh", "-c", "while true; do sleep 1; done"))
	if err != nil {
		t.Fatalf("create from the snapshot: %v", err)
	}
	if dst, _ := nodeOf(nb.ID()); dst == src {
		t.Fatalf("the sandbox from the snapshot is on the source's node %s (cordoned)", srcName)
	}
	res, err := nb.Exec(ctx, []string{"sh", "-c", "busybox cat /data/state.txt; test -e /bin/cat && echo cat-is-back"})
	if err != nil || string(res.Stdout) != "made-on-"+srcName+"\n" {
		t.Fatalf("the snapshot's files on the other node: %+v %v", res, err)
	}
	// A snapshot of it, on that node, carries both layers.
	if res, err := nb.Exec(ctx, []string{"sh", "-c", "echo second > /data/second.txt"}); err != nil || res.Code != 0 {
		t.Fatalf("%+v %v", res, err)
	}
	img2, err := nb.Snapshot(ctx)
	if err != nil || img2.Digest == img.Digest {
		t.Fatalf("snapshot of the snapshot sandbox: %+v %v", img2, err)
	}
	if _, errOut, code := control.CLI("admin", "node", "uncordon", srcName); code != 0 {
		t.Fatalf("uncordon: %s", errOut)
	}
	third, err := c.Create(ctx, chalkcompute.Base(img2.Ref))
	if err != nil {
		t.Fatal(err)
	}
	if res, err := third.Exec(ctx, []string{"sh", "-c", "busybox cat /data/state.txt /data/second.txt"}); err != nil || string(res.Stdout) != "made-on-"+srcName+"\nsecond\n" {
		t.Fatalf("the second snapshot's files: %+v %v", res, err)
	}
	for _, s := range []*chalkcompute.Sandbox{sb, nb} {
		if _, err := s.Terminate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// A stopped sandbox: its layer kept on its node by its teardown.
	if res, err := third.Exec(ctx, []string{"sh", "-c", "echo after-stop > /data/third.txt"}); err != nil || res.Code != 0 {
		t.Fatalf("%+v %v", res, err)
	}
	if st, err := third.Terminate(ctx); err != nil || st.State != "stopped" {
		t.Fatalf("terminate: %+v %v", st, err)
	}
	img3, err := third.Snapshot(ctx)
	if err != nil {
		t.Fatalf("snapshot of a stopped sandbox in fleet mode: %v", err)
	}
	fourth, err := c.Create(ctx, chalkcompute.Base(img3.Ref))
	if err != nil {
		t.Fatal(err)
	}
	if res, err := fourth.Exec(ctx, []string{"busybox", "cat", "/data/third.txt"}); err != nil || string(res.Stdout) != "after-stop\n" {
		t.Fatalf("the stopped sandbox's snapshot: %+v %v", res, err)
	}
	if _, err := fourth.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
}
