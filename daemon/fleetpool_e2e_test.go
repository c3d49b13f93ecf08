package daemon_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chalkcompute/chalkcompute/chalkcompute"
	"github.com/chalkcompute/chalkcompute/internal/chalktest"
)

// TestFleetPrestarted: `chalkd control --prestart 1` has every node that
// joins keep one pre-started sandbox of the base image (node1 pre-starts
// nothing on its own: --prestart 0; nothing was used on node2 yet). Once
// `chalk compute image warm --sandboxes 1` says they are ready, a create of
// busybox is served by one of them: its id is the one a node journalled
// before the create (a claim, no container start). It runs like any
// other sandbox, with the request's environment, and its node pre-starts a
// new one in its place.
func TestFleetPrestarted(t *testing.T) {
	control := chalktest.StartControl(t, "--prestart", "1")
	n1 := chalktest.StartFleetNodeArgs(t, control, 1, "--prestart", "0")
	n2 := chalktest.StartFleetNode(t, control, 2)
	c := control.Client()

	// members are a node's pre-started sandboxes not yet claimed (its pool
	// journal).
	members := func(n *chalktest.Node) []string {
		ents, _ := os.ReadDir(filepath.Join(n.Dir, "prestarted"))
		var ids []string
		for _, e := range ents {
			ids = append(ids, e.Name())
		}
		return ids
	}
	deadline := time.Now().Add(2 * time.Minute)
	for _, n := range []*chalktest.Node{n1, n2} {
		for len(members(n)) != 1 {
			if time.Now().After(deadline) {
				t.Fatalf("node %s never got its pre-started busybox sandbox: %v", n.Dir, members(n))
			}
			time.Sleep(100 * time.Millisecond) // polling the node's pool journal
		}
	}
	// Ready on both (the call returns once they are).
	if _, errOut, code := control.CLI("compute", "image", "warm", "--image", "busybox", "--sandboxes", "1"); code != 0 {
		t.Fatalf("warm --sandboxes 1: %d %s", code, errOut)
	}
	ready := map[string]*chalktest.Node{}
	for _, n := range []*chalktest.Node{n1, n2} {
		for _, id := range members(n) {
			ready[id] = n
		}
	}
	ctx := ctxT(t, time.Minute)
	sb, err := c.Create(ctx, chalkcompute.Base("busybox"), chalkcompute.WithEnv(map[string]string{"GREETING": "from-the-pool"}))
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	on := ready[sb.ID()]
	if on == nil {
		t.Fatalf("sandbox %s was none of the nodes' pre-started sandboxes %v", sb.ID(), ready)
	}
	res, err := sb.Exec(ctx, []string{"sh", "-c", "echo $GREETING"})
	if err != nil || string(res.Stdout) != "from-the-pool\n" || res.Code != 0 {
		t.Fatalf("exec in the claimed sandbox: %+v %v", res, err)
	}
	// Its node pre-starts another in its place.
	for {
		now := members(on)
		if len(now) == 1 && now[0] != sb.ID() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pool of node %s did not refill: %v", on.Dir, now)
		}
		time.Sleep(100 * time.Millisecond) // polling the node's pool journal
	}
	if st, err := sb.Terminate(ctx); err != nil || st.State != "stopped" {
		t.Fatalf("terminate: %+v %v", st, err)
	}
	if slices.Contains(members(on), sb.ID()) || strings.TrimSpace(sb.ID()) == "" {
		t.Fatal("the claimed sandbox is still journalled as a member")
	}
}
